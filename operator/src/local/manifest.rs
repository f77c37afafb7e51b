//! Reads a manifest file the way `kubectl apply -f` would send it: every YAML document, the
//! ChatCluster checked against the CRD's schema (what the API server would refuse), plus the
//! Secrets and ConfigMaps in the same file, which stand in for the cluster's own objects.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde::Deserialize;
use serde_json::Value;

use crate::crd::ChatCluster;

/// Namespace of objects that name none, as with `kubectl apply` and no context namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("YAML document {index}: {source}")]
    Yaml { index: usize, source: serde_norway::Error },
    #[error("YAML document {index}: {message}")]
    Document { index: usize, message: String },
    #[error("ChatCluster {name:?} is invalid (the API server would refuse it): {}", .errors.join("; "))]
    Schema { name: String, errors: Vec<String> },
    #[error("{kind} {name:?}: {source}")]
    Decode { kind: &'static str, name: String, source: serde_json::Error },
    #[error("the manifest holds no ChatCluster (apiVersion chatcluster.dev/v1alpha1)")]
    NoCluster,
    #[error("the manifest holds several ChatClusters ({0}); choose one with --cluster")]
    SeveralClusters(String),
    #[error("the manifest holds no ChatCluster named {0:?}")]
    ClusterNotFound(String),
    #[error("the ChatCluster's name changed from {old:?} to {new:?}; restart local mode to run another cluster")]
    Renamed { old: String, new: String },
}

/// A `--secret name/key=value` flag: a Secret key that only the cluster would hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretValue {
    pub name: String,
    pub key: String,
    pub value: String,
}

impl FromStr for SecretValue {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s.split_once('=').and_then(|(path, value)| {
            let (name, key) = path.split_once('/')?;
            (!name.is_empty() && !key.is_empty()).then(|| SecretValue {
                name: name.to_owned(),
                key: key.to_owned(),
                value: value.to_owned(),
            })
        });
        parsed.ok_or_else(|| format!("{s:?} is not name/key=value"))
    }
}

/// The ChatCluster to run and the objects it may reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub cluster: ChatCluster,
    /// By name, only those of the cluster's namespace.
    pub secrets: BTreeMap<String, Secret>,
    pub config_maps: BTreeMap<String, ConfigMap>,
}

impl Manifest {
    pub fn name(&self) -> &str {
        self.cluster.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> &str {
        self.cluster.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// Parses every document of `text`; `pick` names the ChatCluster when there are several.
/// `extra` Secret keys (from flags) win over the file's.
pub fn parse(text: &str, pick: Option<&str>, extra: &[SecretValue]) -> Result<Manifest, ManifestError> {
    let mut clusters = Vec::new();
    let mut others = Vec::new();
    for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(document).map_err(|source| ManifestError::Yaml { index, source })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        match (api_version, kind.as_str()) {
            ("chatcluster.dev/v1alpha1", "ChatCluster") => clusters.push((index, value)),
            ("v1", "Secret" | "ConfigMap") => others.push((index, kind, value)),
            _ if kind.is_empty() => {
                return Err(ManifestError::Document { index, message: "no `kind`".to_owned() });
            }
            _ => tracing::info!(index, %kind, api_version, "ignoring a document local mode has no use for"),
        }
    }
    let (index, value) = pick_cluster(clusters, pick)?;
    let cluster = decode_cluster(index, value)?;
    let namespace = cluster.metadata.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let mut secrets = BTreeMap::new();
    let mut config_maps = BTreeMap::new();
    for (index, kind, value) in others {
        let name = object_name(index, &value)?;
        let ns = value.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(DEFAULT_NAMESPACE);
        if ns != namespace {
            continue;
        }
        if kind == "Secret" {
            let secret: Secret = serde_json::from_value(value).map_err(|source| ManifestError::Decode {
                kind: "Secret",
                name: name.clone(),
                source,
            })?;
            secrets.insert(name, merge_string_data(secret));
        } else {
            let config_map: ConfigMap = serde_json::from_value(value).map_err(|source| ManifestError::Decode {
                kind: "ConfigMap",
                name: name.clone(),
                source,
            })?;
            config_maps.insert(name, config_map);
        }
    }
    for flag in extra {
        let secret = secrets.entry(flag.name.clone()).or_insert_with(Secret::default);
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        data.insert(flag.key.clone(), ByteString(flag.value.clone().into_bytes()));
    }
    Ok(Manifest { cluster, secrets, config_maps })
}

fn object_name(index: usize, value: &Value) -> Result<String, ManifestError> {
    value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ManifestError::Document { index, message: "no metadata.name".to_owned() })
}

fn pick_cluster(clusters: Vec<(usize, Value)>, pick: Option<&str>) -> Result<(usize, Value), ManifestError> {
    let name_of = |v: &Value| v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
    match pick {
        Some(wanted) => clusters
            .into_iter()
            .find(|(_, v)| name_of(v) == wanted)
            .ok_or_else(|| ManifestError::ClusterNotFound(wanted.to_owned())),
        None if clusters.len() > 1 => {
            Err(ManifestError::SeveralClusters(clusters.iter().map(|(_, v)| name_of(v)).collect::<Vec<_>>().join(", ")))
        }
        None => clusters.into_iter().next().ok_or(ManifestError::NoCluster),
    }
}

/// The CRD's schema, built once: every manifest reload is checked against it.
fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let crd = serde_json::to_value(crate::crd::definition()).unwrap_or_default();
        let schema = crd.pointer("/spec/versions/0/schema/openAPIV3Schema").cloned().unwrap_or(Value::Bool(true));
        // Our own generated schema compiles (the CRD tests check it); accepting everything is the
        // safe fallback should it ever not, since the operator's validation still runs.
        jsonschema::validator_for(&schema)
            .unwrap_or_else(|_| jsonschema::validator_for(&Value::Bool(true)).expect("`true` is a valid schema"))
    })
}

fn decode_cluster(index: usize, value: Value) -> Result<ChatCluster, ManifestError> {
    let name = object_name(index, &value)?;
    let errors: Vec<String> = validator()
        .iter_errors(&value)
        .map(|e| {
            let path = e.instance_path().to_string();
            let field = path.trim_start_matches('/').replace('/', ".");
            if field.is_empty() { e.to_string() } else { format!("{field}: {e}") }
        })
        .collect();
    if !errors.is_empty() {
        return Err(ManifestError::Schema { name, errors });
    }
    let mut cluster: ChatCluster = serde_json::from_value(value).map_err(|source| ManifestError::Decode {
        kind: "ChatCluster",
        name: name.clone(),
        source,
    })?;
    // What the API server would fill in; the operator's builders rely on a namespace and a uid.
    let meta = &mut cluster.metadata;
    meta.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
    meta.uid.get_or_insert_with(|| format!("local-{name}"));
    meta.generation.get_or_insert(1);
    Ok(cluster)
}

/// `stringData` is write-only in the API: the server merges it into `data`, winning over it.
fn merge_string_data(mut secret: Secret) -> Secret {
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        data.extend(strings.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))));
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "apiVersion: chatcluster.dev/v1alpha1\nkind: ChatCluster\nmetadata:\n  name: chat\nspec:\n  config:\n    auth:\n      mode: anonymous\n";

    #[test]
    fn one_cluster_with_its_secrets_and_config_maps() {
        let text = format!(
            "{CLUSTER}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: jwt\nstringData:\n  jwt-secret: abcdefghijklmnopqrstuvwxyz\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: theme\n  namespace: default\ndata:\n  style.css: \"body {{}}\"\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: elsewhere\n  namespace: other\n---\n"
        );
        let m = parse(&text, None, &[]).unwrap();
        assert_eq!((m.name(), m.namespace()), ("chat", "default"));
        assert_eq!(m.cluster.metadata.uid.as_deref(), Some("local-chat"));
        assert_eq!(m.secrets["jwt"].data.as_ref().unwrap()["jwt-secret"].0, b"abcdefghijklmnopqrstuvwxyz");
        assert_eq!(m.config_maps.keys().collect::<Vec<_>>(), ["theme"], "other namespaces are not ours");
    }

    #[test]
    fn flags_add_secret_keys() {
        let flag: SecretValue = "jwt/jwt-secret=0123456789abcdef=x".parse().unwrap();
        assert_eq!(
            (flag.name.as_str(), flag.key.as_str(), flag.value.as_str()),
            ("jwt", "jwt-secret", "0123456789abcdef=x")
        );
        assert!("jwt=x".parse::<SecretValue>().is_err());
        let m = parse(CLUSTER, None, &[flag]).unwrap();
        assert_eq!(m.secrets["jwt"].data.as_ref().unwrap()["jwt-secret"].0, b"0123456789abcdef=x");
    }

    #[test]
    fn schema_errors_name_the_field() {
        let text = CLUSTER.replace("spec:\n", "spec:\n  replicas: -1\n");
        let err = parse(&text, None, &[]).unwrap_err().to_string();
        assert!(err.contains("spec.replicas"), "{err}");
        let text = CLUSTER.replace("mode: anonymous", "mode: open");
        let err = parse(&text, None, &[]).unwrap_err().to_string();
        assert!(err.contains("spec.config.auth.mode"), "{err}");
    }

    #[test]
    fn several_clusters_need_a_choice() {
        let text = format!("{CLUSTER}---\n{}", CLUSTER.replace("name: chat", "name: other"));
        assert!(matches!(parse(&text, None, &[]), Err(ManifestError::SeveralClusters(_))));
        assert_eq!(parse(&text, Some("other"), &[]).unwrap().name(), "other");
        assert!(matches!(parse(&text, Some("nope"), &[]), Err(ManifestError::ClusterNotFound(_))));
        assert!(matches!(parse("", None, &[]), Err(ManifestError::NoCluster)));
    }

    #[test]
    fn examples_parse() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for name in ["minimal.yaml", "custom-assets.yaml", "production.yaml", "server-api.yaml"] {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            parse(&text, None, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
