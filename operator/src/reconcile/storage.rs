//! `spec.storage`: a volume per node as the node's data directory (`cluster.storage = "disk"`),
//! and the check that it still matches the StatefulSet's volume claim templates, which the API
//! server never lets change.

use chat_node::config::{NodeConfig, StorageMode};
use k8s_openapi::api::apps::v1::StatefulSet;

use super::validate::{Invalid, invalid};
use crate::crd::StorageSpec;
use crate::resources::{DATA_DIR, DATA_VOLUME};

/// Points the node config at the volume, or refuses a disk config that has none.
pub fn render(storage: Option<&StorageSpec>, cfg: &mut NodeConfig) -> Result<(), Invalid> {
    if cfg.cluster.data_dir.is_some() {
        return Err(invalid(
            "OperatorOwnedField",
            format!(
                "spec.config.cluster.data_dir is set by the operator (the volume of spec.storage is mounted at {DATA_DIR})"
            ),
        ));
    }
    match storage {
        Some(storage) => {
            match bytes(&storage.size) {
                Some((n, _)) if n > 0 => {}
                _ => {
                    return Err(invalid(
                        "InvalidStorage",
                        format!("spec.storage.size {:?} must be a positive quantity such as \"1Gi\"", storage.size),
                    ));
                }
            }
            cfg.cluster.storage = StorageMode::Disk;
            cfg.cluster.data_dir = Some(DATA_DIR.into());
        }
        None if cfg.cluster.storage == StorageMode::Disk => {
            return Err(invalid(
                "MissingStorage",
                "spec.config.cluster.storage \"disk\" needs spec.storage (the volume each node keeps its data on); \
                 set spec.storage.size, or use storage \"memory\"",
            ));
        }
        None => {}
    }
    Ok(())
}

/// What `spec.storage` amounts to in a StatefulSet: the data claim's size and class.
#[derive(Clone, Debug, PartialEq)]
struct Claim {
    size: String,
    class: Option<String>,
}

impl Claim {
    fn of_spec(storage: Option<&StorageSpec>) -> Option<Self> {
        storage.map(|s| Claim { size: s.size.clone(), class: s.storage_class_name.clone() })
    }

    fn of_statefulset(sts: &StatefulSet) -> Option<Self> {
        let templates = sts.spec.volume_claim_templates.as_ref()?;
        let data = templates.iter().find(|t| t.metadata.name.as_deref() == Some(DATA_VOLUME))?;
        let spec = data.spec.as_ref();
        let size = spec
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_default();
        Some(Claim { size, class: spec.and_then(|s| s.storage_class_name.clone()) })
    }

    /// Same size (as a quantity: the API server stores `1024Mi` as `1Gi`) and class.
    fn same(&self, other: &Claim) -> bool {
        let same_size = match (bytes(&self.size), bytes(&other.size)) {
            (Some((a, da)), Some((b, db))) => match (a.checked_mul(db), b.checked_mul(da)) {
                (Some(x), Some(y)) => x == y,
                _ => self.size == other.size,
            },
            _ => self.size == other.size,
        };
        same_size && self.class == other.class
    }

    fn describe(claim: Option<&Claim>) -> String {
        match claim {
            None => "none".to_owned(),
            Some(Claim { size, class: None }) => format!("{size} (default class)"),
            Some(Claim { size, class: Some(class) }) => format!("{size} of class {class}"),
        }
    }
}

/// A StatefulSet's volume claim templates are immutable: a changed `spec.storage` could only fail
/// on every apply, so it is reported once as a clear problem instead.
pub fn check_unchanged(
    storage: Option<&StorageSpec>,
    existing: Option<&StatefulSet>,
    name: &str,
) -> Result<(), Invalid> {
    let Some(existing) = existing else { return Ok(()) };
    let now = Claim::of_statefulset(existing);
    let wanted = Claim::of_spec(storage);
    let unchanged = match (&now, &wanted) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same(b),
        _ => false,
    };
    if unchanged {
        return Ok(());
    }
    Err(invalid(
        "StorageImmutable",
        format!(
            "spec.storage cannot change once the cluster exists (a StatefulSet's volumeClaimTemplates are immutable): \
             StatefulSet {name} has {}, spec.storage asks for {}. Restore spec.storage, or recreate the StatefulSet \
             (`kubectl delete statefulset {name} --cascade=orphan`; the operator creates it anew and replaces the \
             pods one at a time; existing volumes are kept, not resized)",
            Claim::describe(now.as_ref()),
            Claim::describe(wanted.as_ref()),
        ),
    ))
}

/// A quantity as the fraction `numerator / denominator` of bytes; `None` if it is not one.
fn bytes(quantity: &str) -> Option<(u128, u128)> {
    let end = quantity.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    let mut denominator = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let factor: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "m" => {
            denominator = denominator.checked_mul(1000)?;
            1
        }
        _ => return None,
    };
    Some((digits.checked_mul(factor)?, denominator))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetSpec;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn spec(size: &str, class: Option<&str>) -> StorageSpec {
        StorageSpec { size: size.to_owned(), storage_class_name: class.map(str::to_owned) }
    }

    fn sts(claim: Option<(&str, Option<&str>)>) -> StatefulSet {
        let templates = claim.map(|(size, class)| {
            let mut pvc = PersistentVolumeClaim::default();
            pvc.metadata.name = Some(DATA_VOLUME.to_owned());
            pvc.spec = Some(PersistentVolumeClaimSpec {
                storage_class_name: class.map(str::to_owned),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_owned(), Quantity(size.to_owned()))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            });
            vec![pvc]
        });
        StatefulSet {
            spec: StatefulSetSpec { volume_claim_templates: templates, ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn quantities_compare_by_value() {
        assert_eq!(bytes("1Gi"), Some((1 << 30, 1)));
        assert_eq!(bytes("1.5Gi"), Some((15 << 30, 10)));
        assert_eq!(bytes("500M"), Some((500_000_000, 1)));
        for bad in ["", "Gi", "1.5.1Gi", "1GB", "-1Gi", "1 Gi"] {
            assert_eq!(bytes(bad), None, "{bad}");
        }
        let stored = Claim { size: "1Gi".into(), class: None };
        assert!(stored.same(&Claim { size: "1024Mi".into(), class: None }));
        assert!(stored.same(&Claim { size: "1.0Gi".into(), class: None }));
        assert!(!stored.same(&Claim { size: "2Gi".into(), class: None }));
        assert!(!stored.same(&Claim { size: "1Gi".into(), class: Some("fast".into()) }));
    }

    #[test]
    fn storage_may_not_change_on_an_existing_statefulset() {
        let fast = spec("1Gi", Some("fast"));
        assert!(check_unchanged(Some(&fast), None, "chat").is_ok(), "a new StatefulSet takes any");
        assert!(check_unchanged(None, Some(&sts(None)), "chat").is_ok());
        assert!(
            check_unchanged(Some(&spec("1024Mi", Some("fast"))), Some(&sts(Some(("1Gi", Some("fast"))))), "chat")
                .is_ok()
        );
        for (wanted, existing) in [
            (Some(&fast), sts(None)),
            (None, sts(Some(("1Gi", Some("fast"))))),
            (Some(&fast), sts(Some(("2Gi", Some("fast"))))),
            (Some(&fast), sts(Some(("1Gi", None)))),
        ] {
            let problem = check_unchanged(wanted, Some(&existing), "chat").unwrap_err();
            assert_eq!(problem.reason, "StorageImmutable");
            assert!(problem.message.contains("--cascade=orphan"), "{problem}");
        }
    }

    #[test]
    fn disk_needs_a_volume_and_the_volume_means_disk() {
        let mut cfg = NodeConfig::default();
        render(Some(&spec("1Gi", None)), &mut cfg).unwrap();
        assert_eq!(
            (cfg.cluster.storage, cfg.cluster.data_dir.as_deref()),
            (StorageMode::Disk, Some(DATA_DIR.as_ref()))
        );

        let mut disk = NodeConfig::default();
        disk.cluster.storage = StorageMode::Disk;
        assert_eq!(render(None, &mut disk).unwrap_err().reason, "MissingStorage");
        let mut dir = NodeConfig::default();
        dir.cluster.data_dir = Some("/data".into());
        assert_eq!(render(Some(&spec("1Gi", None)), &mut dir).unwrap_err().reason, "OperatorOwnedField");
        assert_eq!(render(Some(&spec("0Gi", None)), &mut NodeConfig::default()).unwrap_err().reason, "InvalidStorage");
        assert_eq!(render(Some(&spec("lots", None)), &mut NodeConfig::default()).unwrap_err().reason, "InvalidStorage");
    }
}
