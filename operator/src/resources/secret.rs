//! The peer Secret: the HMAC key the nodes will authenticate each other with.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use crate::reconcile::validate::Plan;

/// Key of the HMAC key in the peer Secret (a file of that name under the peer mount).
pub const PEER_KEY: &str = "hmac-key";

/// Carries the key read from the existing Secret (or generated once), so applying never rotates it.
pub fn peer_secret(plan: &Plan) -> Secret {
    Secret {
        metadata: plan.owner.object_meta(plan.owner.peer_secret_name()),
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(PEER_KEY.to_owned(), ByteString(plan.peer_key.clone()))])),
        ..Secret::default()
    }
}
