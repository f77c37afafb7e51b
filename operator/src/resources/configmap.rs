//! The config ConfigMap (rendered node config) and the assets ConfigMap (files served at `/`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::non_empty;
use crate::reconcile::validate::Plan;

/// Key of the rendered node config in the config ConfigMap.
pub const CONFIG_KEY: &str = "node.toml";

pub fn config(plan: &Plan) -> ConfigMap {
    ConfigMap {
        metadata: plan.owner.object_meta(plan.owner.config_name()),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), plan.config_toml.clone())])),
        ..ConfigMap::default()
    }
}

/// Always exists (possibly empty) so the pod's volume never waits for it.
pub fn assets(plan: &Plan) -> ConfigMap {
    ConfigMap {
        metadata: plan.owner.object_meta(plan.owner.assets_name()),
        data: non_empty(plan.assets.clone()),
        ..ConfigMap::default()
    }
}
