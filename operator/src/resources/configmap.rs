//! The config ConfigMap (rendered node config) and the assets ConfigMap (files served at `/`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
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

/// The files a ConfigMap volume would show: `data` and `binaryData` together.
pub fn files(config_map: ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let text = config_map.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes()));
    let binary = config_map.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0));
    text.chain(binary).collect()
}

/// Always exists (possibly empty) so the pod's volume never waits for it. Text files go to
/// `data`, anything else (images, fonts) to `binaryData`; the volume shows both as files.
pub fn assets(plan: &Plan) -> ConfigMap {
    let mut text = BTreeMap::new();
    let mut binary = BTreeMap::new();
    for (name, content) in &plan.assets {
        match String::from_utf8(content.clone()) {
            Ok(utf8) => {
                text.insert(name.clone(), utf8);
            }
            Err(bytes) => {
                binary.insert(name.clone(), ByteString(bytes.into_bytes()));
            }
        }
    }
    ConfigMap {
        metadata: plan.owner.object_meta(plan.owner.assets_name()),
        data: non_empty(text),
        binary_data: non_empty(binary),
        ..ConfigMap::default()
    }
}
