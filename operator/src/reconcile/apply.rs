//! API writes: server-side apply of children, deletion of unwanted ones, and the retry of
//! transient API errors (409, 429, 5xx, transport) that every call goes through.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::validate::Refs;
use super::{Context, Error};
use crate::resources::{Children, FIELD_MANAGER, Owner};

/// How often and how fast transient API errors are retried inside one reconcile.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 4, first_delay: Duration::from_millis(200) }
    }
}

/// Errors worth another try: conflicts, throttling, server errors and transport failures.
pub fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => matches!(status.code, 409 | 429 | 500..=599),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Runs `op` until it succeeds, fails permanently, or the attempts run out (doubling delays).
pub async fn retry<T, F, Fut>(policy: RetryPolicy, mut op: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut delay = policy.first_delay;
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if is_transient(&e) && attempt < policy.attempts => {
                tracing::debug!(error = %e, attempt, "transient API error; retrying");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Objects written back by the API server that status is computed from.
pub struct Applied {
    pub statefulset: StatefulSet,
    pub client_service: Service,
}

/// Applies every wanted child that is not already as wanted (`refs` holds them as read);
/// volumes' sources go first so new pods never wait for them.
pub async fn apply_all(ctx: &Context, owner: &Owner, children: &Children, refs: &Refs) -> Result<Applied, Error> {
    let existing = &refs.existing;
    apply(ctx, owner, &children.config, existing.config.as_ref()).await?;
    apply(ctx, owner, &children.assets, existing.assets.as_ref()).await?;
    apply(ctx, owner, &children.peer_secret, refs.peer_secret.as_ref()).await?;
    apply(ctx, owner, &children.peer_service, existing.peer_service.as_ref()).await?;
    let client_service = apply(ctx, owner, &children.client_service, existing.client_service.as_ref()).await?;
    if let Some(pdb) = &children.pdb {
        apply(ctx, owner, pdb, existing.pdb.as_ref()).await?;
    }
    if let Some(api_service) = &children.api_service {
        apply(ctx, owner, api_service, existing.api_service.as_ref()).await?;
    }
    let statefulset = apply(ctx, owner, &children.statefulset, refs.statefulset.as_ref()).await?;
    Ok(Applied { statefulset, client_service })
}

/// Annotation on every child: the hash of what the operator last applied to it. With the
/// content check below it tells a child that is already as wanted (no write needed) from one
/// whose wanted fields changed, fields removed included, or that someone else edited.
pub const APPLIED_ANNOTATION: &str = "chatcluster.dev/applied";

async fn apply<K>(ctx: &Context, owner: &Owner, object: &K, existing: Option<&K>) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.name_any();
    let to_err = |source| Error::Apply { kind: K::kind(&()).into_owned(), name: name.clone(), source };
    let mut wanted = serde_json::to_value(object).map_err(|e| to_err(kube::Error::SerdeError(e)))?;
    let hash = applied_hash(&wanted);
    if let Some(existing) = existing
        && let Ok(current) = serde_json::to_value(existing)
        && current.pointer("/metadata/annotations/chatcluster.dev~1applied").and_then(|v| v.as_str()) == Some(&hash)
        && contains(&current, &wanted)
    {
        return Ok(existing.clone());
    }
    if let Some(meta) = wanted.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        let annotations = meta.entry("annotations").or_insert_with(|| serde_json::json!({}));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(APPLIED_ANNOTATION.to_owned(), serde_json::Value::String(hash));
        }
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&wanted);
    retry(ctx.retry, || api.patch(&name, &params, &patch)).await.map_err(to_err)
}

/// A short digest of the object the operator wants (before the annotation is added).
fn applied_hash(wanted: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(wanted.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Whether `have` holds every field of `want` with the same value. Lists match element by
/// element (the API server adds defaults inside list items, such as a port's protocol).
pub fn contains(have: &serde_json::Value, want: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (have, want) {
        (Value::Object(have), Value::Object(want)) => {
            want.iter().all(|(k, w)| have.get(k).is_some_and(|h| contains(h, w)))
        }
        (Value::Array(have), Value::Array(want)) => {
            have.len() == want.len() && have.iter().zip(want).all(|(h, w)| contains(h, w))
        }
        _ => have == want,
    }
}

/// Deletes children the spec no longer wants; returns what was deleted (for events). The API
/// Service is looked for only when the last status had an API (`had_api`), so clusters that
/// never had one cost no extra read.
pub async fn delete_unwanted(
    ctx: &Context,
    owner: &Owner,
    children: &Children,
    had_api: bool,
) -> Result<Vec<String>, Error> {
    let mut deleted = Vec::new();
    if children.pdb.is_none() {
        let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &owner.namespace);
        if delete_if_owned(ctx, &api, &owner.name, owner).await? {
            deleted.push(format!("PodDisruptionBudget/{}", owner.name));
        }
    }
    if children.api_service.is_none() && had_api {
        let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(ctx.client.clone(), &owner.namespace);
        if delete_if_owned(ctx, &api, &owner.api_service_name(), owner).await? {
            deleted.push(format!("Service/{}", owner.api_service_name()));
        }
    }
    Ok(deleted)
}

/// Only objects this cluster controls are deleted: a same-named object of the user's stays.
async fn delete_if_owned<K>(ctx: &Context, api: &Api<K>, name: &str, owner: &Owner) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let to_err = |source| Error::Delete { kind: K::kind(&()).into_owned(), name: name.to_owned(), source };
    let Some(existing) = retry(ctx.retry, || api.get_opt(name)).await.map_err(to_err)? else {
        return Ok(false);
    };
    if !existing.owner_references().iter().any(|r| r.uid == owner.reference.uid) {
        return Ok(false);
    }
    let params = DeleteParams::background();
    match retry(ctx.retry, || api.delete(name, &params)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(source) => Err(to_err(source)),
    }
}
