//! Reads the objects a spec refers to (auth Secret, assets ConfigMap) and the children as they
//! are (the peer Secret's key, the StatefulSet's claims and progress, and every child's owner
//! and content: a child already as wanted is not written again).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use rand::RngCore;

use super::apply::retry;
use super::validate::{ExistingChildren, PEER_KEY_BYTES, Refs};
use super::{Context, Error};
use crate::crd::ChatCluster;
use crate::resources::Owner;

pub async fn fetch(ctx: &Context, cluster: &ChatCluster, owner: &Owner) -> Result<Refs, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let auth_secret = match &cluster.spec.auth.jwt_secret_ref {
        Some(r) => get(ctx, &secrets, &r.name).await?,
        None => None,
    };
    let tls_secret = match &cluster.spec.tls {
        Some(tls) => get(ctx, &secrets, &tls.secret_name).await?,
        None => None,
    };
    let api_secret = match &cluster.spec.api {
        Some(api) => get(ctx, &secrets, &api.key_secret_ref.name).await?,
        None => None,
    };
    let assets_config_map = match &cluster.spec.assets.config_map_ref {
        Some(r) => get(ctx, &config_maps, &r.name).await?,
        None => None,
    };
    let peer_secret = get(ctx, &secrets, &owner.peer_secret_name()).await?;
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let statefulset = get(ctx, &statefulsets, &owner.name).await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let existing = ExistingChildren {
        config: get(ctx, &config_maps, &owner.config_name()).await?,
        assets: get(ctx, &config_maps, &owner.assets_name()).await?,
        peer_service: get(ctx, &services, &owner.peer_service_name()).await?,
        client_service: get(ctx, &services, &owner.name).await?,
        pdb: get(ctx, &pdbs, &owner.name).await?,
        api_service: match &cluster.spec.api {
            Some(_) => get(ctx, &services, &owner.api_service_name()).await?,
            None => None,
        },
    };
    let mut random = [0u8; PEER_KEY_BYTES];
    rand::rng().fill_bytes(&mut random);
    let fresh_peer_key = random.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes();
    Ok(Refs {
        auth_secret,
        tls_secret,
        api_secret,
        assets_config_map,
        peer_secret,
        fresh_peer_key,
        statefulset,
        existing,
    })
}

async fn get<K>(ctx: &Context, api: &Api<K>, name: &str) -> Result<Option<K>, Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    retry(ctx.retry, || api.get_opt(name)).await.map_err(|source| Error::Read {
        kind: K::kind(&()).into_owned(),
        name: name.to_owned(),
        source,
    })
}
