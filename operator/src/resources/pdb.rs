//! The PodDisruptionBudget that keeps voluntary evictions to one pod (by default) at a time.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Owner;
use crate::crd::ChatCluster;

/// `None` when disabled: the reconciler then deletes an existing one.
pub fn pdb(cluster: &ChatCluster, owner: &Owner) -> Option<PodDisruptionBudget> {
    let spec = &cluster.spec.pdb;
    spec.enabled.then(|| PodDisruptionBudget {
        metadata: owner.object_meta(owner.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(spec.max_unavailable)),
            selector: Some(LabelSelector { match_labels: Some(owner.selector_labels()), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}
