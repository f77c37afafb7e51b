//! An in-process fake Kubernetes API server (a tower service behind a real `kube::Client`) for
//! tests and the benchmark: stores objects as JSON, applies, creates, replaces with
//! resourceVersion checks, deletes, records requests and injects failures.
//!
//! Server-side apply is modelled as the API server does it, simplified where the operator
//! cannot tell: every field has owners (field managers); an apply without `force` that would
//! change a field another manager set is refused with 409 and the conflicting fields; an apply
//! removes the fields its manager applied before and no longer applies, unless another manager
//! owns them. Lists count as one field (the real server merges some by key). Lists of objects
//! honour equality-based `labelSelector`s. StatefulSets either settle at once (`auto_ready`) or
//! move as their controller would, one pod per `step_statefulsets`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kube::Resource;
use kube::client::Body;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    /// Stored as JSON text: several times smaller than `Value`, so the benchmark's memory figure
    /// is mostly the operator's.
    objects: BTreeMap<String, String>,
    requests: Vec<String>,
    record: bool,
    failures: VecDeque<(Method, u16)>,
    /// Requests with these methods that never get an answer (a stalled connection).
    stalls: VecDeque<Method>,
    revision: u64,
    auto_ready: bool,
    /// Per object, the fields each field manager owns (paths such as `spec.ports`).
    owners: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

/// The manager the test helpers write as, like a user running `kubectl edit`.
pub const USER_MANAGER: &str = "kubectl-edit";

/// Handle on the fake server's state; cheap to clone.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApi {
    /// A fake whose StatefulSets become ready at once, recording every request.
    pub fn new() -> Self {
        let state = State { record: true, auto_ready: true, ..State::default() };
        Self { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client talking to this fake; needs a running Tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(FakeService { state: self.state.clone() }, "default")
    }

    /// Whether StatefulSets report all replicas ready and updated as soon as they are written.
    pub fn set_auto_ready(&self, on: bool) {
        self.lock().auto_ready = on;
    }

    /// Turns request recording off (the benchmark's memory figure should not include it).
    pub fn set_recording(&self, on: bool) {
        self.lock().record = on;
    }

    /// The next `times` requests with this method fail with `code`.
    pub fn fail_next(&self, method: Method, code: u16, times: usize) {
        self.lock().failures.extend(std::iter::repeat_n((method, code), times));
    }

    /// The next `times` requests with this method never get an answer.
    pub fn stall_next(&self, method: Method, times: usize) {
        self.lock().stalls.extend(std::iter::repeat_n(method, times));
    }

    /// `METHOD /path` of every request so far (query strings dropped).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Stores a typed object as if created by a user.
    pub fn put<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let (Some(ns), Some(name)) = (object.meta().namespace.clone(), object.meta().name.clone()) else { return };
        let Ok(value) = serde_json::to_value(object) else { return };
        let key = object_path::<K>(&ns, &name);
        let mut state = self.lock();
        let old = state.value(&key);
        state.take_changed_fields(&key, USER_MANAGER, old.as_ref(), &value);
        let stored = state.write(&key, value, old.as_ref());
        state.insert(key, &stored);
    }

    pub fn get<K: Resource<DynamicType = ()> + DeserializeOwned>(&self, ns: &str, name: &str) -> Option<K> {
        let text = self.lock().objects.get(&object_path::<K>(ns, name)).cloned()?;
        serde_json::from_str(&text).ok()
    }

    /// Changes a stored object as a user or another controller would (bumping generation on spec
    /// changes).
    pub fn edit<K: Resource<DynamicType = ()>>(&self, ns: &str, name: &str, change: impl FnOnce(&mut Value)) {
        let key = object_path::<K>(ns, name);
        let mut state = self.lock();
        let Some(old) = state.value(&key) else { return };
        let mut new = old.clone();
        change(&mut new);
        state.take_changed_fields(&key, USER_MANAGER, Some(&old), &new);
        let stored = state.write(&key, new, Some(&old));
        state.insert(key, &stored);
    }

    /// The fields `manager` owns in an object.
    pub fn owned_fields<K: Resource<DynamicType = ()>>(&self, ns: &str, name: &str, manager: &str) -> Vec<String> {
        let state = self.lock();
        let owners = state.owners.get(&object_path::<K>(ns, name));
        owners.and_then(|o| o.get(manager)).map(|f| f.iter().cloned().collect()).unwrap_or_default()
    }

    /// Moves every StatefulSet one step as its controller would with `OrderedReady` pods and a
    /// `RollingUpdate` strategy: it sees the spec, then adds or removes one pod, or replaces
    /// the highest-numbered outdated one; a new pod is ready one step later. Returns whether any
    /// changed.
    pub fn step_statefulsets(&self) -> bool {
        let mut state = self.lock();
        let keys: Vec<String> = state.objects.keys().filter(|k| k.contains("/statefulsets/")).cloned().collect();
        let mut changed = false;
        for key in keys {
            let Some(mut sts) = state.value(&key) else { continue };
            if step_statefulset(&mut sts) {
                changed = true;
                state.insert(key, &sts);
            }
        }
        changed
    }

    /// Deletes a StatefulSet's outdated pods, as a user does under `OnDelete`: they come back
    /// with the latest template, not ready yet.
    pub fn delete_statefulset_pods(&self, ns: &str, name: &str) {
        let key = object_path::<k8s_openapi::api::apps::v1::StatefulSet>(ns, name);
        let mut state = self.lock();
        let Some(mut sts) = state.value(&key) else { return };
        let pods: Vec<(bool, bool)> =
            fake_pods(&sts).into_iter().map(|p| if p.0 { p } else { (true, false) }).collect();
        let generation = sts["status"]["observedGeneration"].as_i64().unwrap_or(1);
        let on_delete = sts["spec"]["updateStrategy"]["type"] == "OnDelete";
        write_statefulset_status(&mut sts, generation, &pods, on_delete);
        state.insert(key, &sts);
    }

    /// Finishes what the StatefulSet controller was doing (for tests that turned auto-ready off).
    pub fn settle_statefulset(&self, ns: &str, name: &str) {
        let key = object_path::<k8s_openapi::api::apps::v1::StatefulSet>(ns, name);
        let mut state = self.lock();
        let Some(mut sts) = state.value(&key) else { return };
        let generation = sts["metadata"]["generation"].as_i64().unwrap_or(1);
        settle(&mut sts, generation);
        state.insert(key, &sts);
    }

    pub fn remove<K: Resource<DynamicType = ()>>(&self, ns: &str, name: &str) -> bool {
        let key = object_path::<K>(ns, name);
        let mut state = self.lock();
        state.owners.remove(&key);
        state.objects.remove(&key).is_some()
    }

    /// Number of stored objects of a kind.
    pub fn count<K: Resource<DynamicType = ()>>(&self) -> usize {
        let marker = format!("/{}/", K::plural(&()));
        self.lock().objects.keys().filter(|k| k.contains(&marker)).count()
    }

    /// `(type, reason)` of every stored event.
    pub fn events(&self) -> Vec<(String, String)> {
        let state = self.lock();
        let events = state.objects.iter().filter(|(k, _)| k.starts_with("/apis/events.k8s.io/"));
        let values = events.filter_map(|(_, t)| serde_json::from_str::<Value>(t).ok());
        values.map(|v| (text(&v["type"]), text(&v["reason"]))).collect()
    }
}

/// A StatefulSet status as its controller reports it once every wanted pod exists, is ready and
/// runs the latest template, and no other pod is left.
fn settle(sts: &mut Value, generation: i64) {
    let replicas = sts["spec"]["replicas"].clone();
    let revision = json!(format!("rev-{generation}"));
    let pods: Vec<Value> = (0..replicas.as_i64().unwrap_or(0)).map(|_| json!([true, true])).collect();
    sts["status"] = json!({
        "observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
        "updatedReplicas": replicas, "currentReplicas": replicas, "availableReplicas": replicas,
        "currentRevision": revision, "updateRevision": revision,
        "x-fake-pods": pods, "x-fake-template": sts["spec"]["template"].clone(),
    });
}

/// One step of the StatefulSet controller (see `FakeApi::step_statefulsets`). The status keeps
/// `pods`: one entry per existing pod, `[updated, ready]`, in ordinal order.
fn step_statefulset(sts: &mut Value) -> bool {
    let generation = sts["metadata"]["generation"].as_i64().unwrap_or(1);
    let wanted = sts["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let status = &sts["status"];
    let mut pods = fake_pods(sts);
    let seen = status["observedGeneration"].as_i64();
    // `OnDelete`: outdated pods stay until someone deletes them (`delete_statefulset_pods`), and
    // `currentRevision` never moves, as with the real controller.
    let on_delete = sts["spec"]["updateStrategy"]["type"] == "OnDelete";
    if seen != Some(generation) {
        // A new template makes every pod outdated; a new replica count changes nothing yet.
        let template_changed = status["x-fake-template"] != sts["spec"]["template"];
        if template_changed {
            for pod in &mut pods {
                pod.0 = false;
            }
        }
    } else if let Some(unready) = pods.iter_mut().find(|p| !p.1) {
        unready.1 = true;
    } else if pods.len() > wanted {
        pods.pop();
    } else if let Some(outdated) = pods.iter().rposition(|p| !p.0).filter(|_| !on_delete) {
        pods[outdated] = (true, false);
    } else if pods.len() < wanted {
        pods.push((true, false));
    } else {
        return false;
    }
    write_statefulset_status(sts, generation, &pods, on_delete);
    true
}

fn write_statefulset_status(sts: &mut Value, generation: i64, pods: &[(bool, bool)], on_delete: bool) {
    let count = |f: fn(&(bool, bool)) -> bool| json!(pods.iter().filter(|p| f(p)).count());
    let all_updated = pods.iter().all(|p| p.0);
    let update = json!(format!("rev-{generation}"));
    let old = &sts["status"]["currentRevision"];
    let current = if all_updated && (!on_delete || old.is_null()) { update.clone() } else { old.clone() };
    sts["status"] = json!({
        "observedGeneration": generation, "replicas": pods.len(), "readyReplicas": count(|p| p.1),
        "availableReplicas": count(|p| p.1), "updatedReplicas": count(|p| p.0),
        "currentReplicas": count(|p| !p.0), "currentRevision": current, "updateRevision": update,
        "x-fake-pods": pods.iter().map(|p| json!([p.0, p.1])).collect::<Vec<_>>(),
        "x-fake-template": sts["spec"]["template"].clone(),
    });
}

fn fake_pods(sts: &Value) -> Vec<(bool, bool)> {
    sts["status"]["x-fake-pods"]
        .as_array()
        .map(|a| a.iter().map(|p| (p[0].as_bool().unwrap_or(false), p[1].as_bool().unwrap_or(false))).collect())
        .unwrap_or_default()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn object_path<K: Resource<DynamicType = ()>>(ns: &str, name: &str) -> String {
    let version = K::api_version(&());
    let prefix = if version.contains('/') { format!("/apis/{version}") } else { format!("/api/{version}") };
    format!("{prefix}/namespaces/{ns}/{}/{name}", K::plural(&()))
}

impl State {
    fn value(&self, key: &str) -> Option<Value> {
        self.objects.get(key).and_then(|t| serde_json::from_str(t).ok())
    }

    fn insert(&mut self, key: String, value: &Value) {
        self.objects.insert(key, value.to_string());
    }

    /// Sets server-owned metadata on a new version of an object.
    fn write(&mut self, key: &str, mut new: Value, old: Option<&Value>) -> Value {
        self.revision += 1;
        let generation = match old {
            None => 1,
            Some(old) => {
                let bump = old.get("spec") != new.get("spec");
                old["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(bump)
            }
        };
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(self.revision.to_string()));
            meta.insert("generation".into(), json!(generation));
            let uid = old.map_or_else(|| json!(format!("uid-{key}")), |o| o["metadata"]["uid"].clone());
            meta.insert("uid".into(), uid);
            meta.entry("creationTimestamp").or_insert(json!("2026-01-01T00:00:00Z"));
        }
        if new["kind"] == "StatefulSet" && self.auto_ready {
            settle(&mut new, generation);
        }
        new
    }

    fn handle(&mut self, method: &Method, path: &str, query: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let params: BTreeMap<String, String> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let manager = params.get("fieldManager").cloned();
        if self.record {
            self.requests.push(format!("{method} {path}"));
        }
        if let Some(i) = self.failures.iter().position(|(m, _)| m == method)
            && let Some((_, code)) = self.failures.remove(i)
        {
            return status(code, "injected failure");
        }
        let (key, subresource) = match path.strip_suffix("/status") {
            Some(base) => (base.to_owned(), true),
            None => (path.to_owned(), false),
        };
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let existing = self.value(&key);
        match *method {
            Method::GET if is_collection(&key) => {
                let selector = match params.get("labelSelector").map(|s| parse_selector(s)).transpose() {
                    Ok(selector) => selector.unwrap_or_default(),
                    Err(message) => return status(400, &message),
                };
                let prefix = format!("{key}/");
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, _)| k.strip_prefix(&prefix).is_some_and(|rest| !rest.contains('/')))
                    .filter_map(|(_, t)| serde_json::from_str::<Value>(t).ok())
                    .filter(|item| selector.iter().all(|requirement| requirement.matches(&item["metadata"]["labels"])))
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": self.revision.to_string()}, "items": items}),
                )
            }
            Method::GET => existing.map_or_else(|| not_found(&key), |v| (200, v)),
            Method::POST => {
                let name = parsed["metadata"]["name"].as_str().map(str::to_owned).unwrap_or_else(|| {
                    format!("{}{}", parsed["metadata"]["generateName"].as_str().unwrap_or("gen-"), self.revision)
                });
                let key = format!("{key}/{name}");
                if self.objects.contains_key(&key) {
                    return status(409, "already exists");
                }
                let mut new = parsed;
                new["metadata"]["name"] = json!(name);
                self.take_changed_fields(&key, manager.as_deref().unwrap_or(UPDATE_MANAGER), None, &new);
                let stored = self.write(&key, new, None);
                self.insert(key, &stored);
                (201, stored)
            }
            Method::PUT => {
                let Some(old) = existing else { return not_found(&key) };
                if parsed["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                    return status(409, "the object has been modified");
                }
                self.take_changed_fields(&key, manager.as_deref().unwrap_or(UPDATE_MANAGER), Some(&old), &parsed);
                self.store(key, parsed, Some(&old))
            }
            Method::PATCH if subresource => {
                let Some(old) = existing else { return not_found(&key) };
                let mut new = old.clone();
                new["status"] = parsed["status"].clone();
                self.store(key, new, Some(&old))
            }
            Method::PATCH if content_type.starts_with("application/apply-patch") => {
                let Some(manager) = manager else {
                    return status(
                        400,
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    );
                };
                let force = params.get("force").is_some_and(|f| f == "true");
                match self.apply(&key, &manager, force, parsed, existing.as_ref()) {
                    Ok(new) => self.store(key, new, existing.as_ref()),
                    Err(conflicts) => status(409, &conflicts),
                }
            }
            Method::PATCH => {
                let Some(old) = existing else { return not_found(&key) };
                let mut new = old.clone();
                merge(&mut new, &parsed);
                self.take_changed_fields(&key, manager.as_deref().unwrap_or(UPDATE_MANAGER), Some(&old), &new);
                self.store(key, new, Some(&old))
            }
            Method::DELETE => {
                self.owners.remove(&key);
                match self.objects.remove(&key) {
                    Some(old) => (200, serde_json::from_str(&old).unwrap_or(Value::Null)),
                    None => not_found(&key),
                }
            }
            _ => status(405, "method not supported by the fake"),
        }
    }

    /// Server-side apply of `applied` by `manager` (see the module's description). Returns the
    /// new object, or the conflicts as the API server words them.
    fn apply(
        &mut self,
        key: &str,
        manager: &str,
        force: bool,
        applied: Value,
        old: Option<&Value>,
    ) -> Result<Value, String> {
        let mut applied_fields = BTreeSet::new();
        fields(&applied, "", &mut applied_fields);
        let owners = self.owners.entry(key.to_owned()).or_default();
        let mut conflicts = Vec::new();
        for (other, owned) in owners.iter() {
            if other == manager {
                continue;
            }
            for field in owned.intersection(&applied_fields) {
                let current = old.and_then(|o| at(o, field));
                if current != at(&applied, field) {
                    conflicts.push(format!("conflict with \"{other}\": .{field}"));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(format!("Apply failed with {} conflict(s): {}", conflicts.len(), conflicts.join(", ")));
        }
        for (other, owned) in owners.iter_mut() {
            if other != manager {
                owned.retain(|f| !applied_fields.contains(f));
            }
        }
        let before = owners.insert(manager.to_owned(), applied_fields.clone()).unwrap_or_default();
        owners.retain(|_, owned| !owned.is_empty());
        let mut new = old.cloned().unwrap_or_else(|| json!({}));
        for dropped in before.difference(&applied_fields) {
            if !owners.values().any(|owned| owned.contains(dropped)) {
                remove_at(&mut new, dropped);
            }
        }
        let status = new.get("status").cloned();
        merge_replacing_lists(&mut new, &applied);
        match status {
            Some(status) => new["status"] = status,
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        Ok(new)
    }

    /// A write other than apply: `manager` owns every field it set or changed from then on.
    fn take_changed_fields(&mut self, key: &str, manager: &str, old: Option<&Value>, new: &Value) {
        let mut set = BTreeSet::new();
        fields(new, "", &mut set);
        let changed: BTreeSet<String> =
            set.into_iter().filter(|f| old.is_none_or(|o| at(o, f) != at(new, f))).collect();
        if changed.is_empty() {
            return;
        }
        let owners = self.owners.entry(key.to_owned()).or_default();
        for owned in owners.values_mut() {
            owned.retain(|f| !changed.contains(f));
        }
        owners.entry(manager.to_owned()).or_default().extend(changed);
        owners.retain(|_, owned| !owned.is_empty());
    }

    fn store(&mut self, key: String, new: Value, old: Option<&Value>) -> (u16, Value) {
        let stored = self.write(&key, new, old);
        self.insert(key, &stored);
        (200, stored)
    }
}

/// The manager of writes that name none (the real server takes the client's user agent).
const UPDATE_MANAGER: &str = "unnamed-update";

/// Fields the API server sets or that identify the object: nobody owns them.
fn server_field(path: &str) -> bool {
    matches!(
        path,
        "apiVersion"
            | "kind"
            | "metadata.name"
            | "metadata.namespace"
            | "metadata.resourceVersion"
            | "metadata.generation"
            | "metadata.uid"
            | "metadata.creationTimestamp"
            | "metadata.managedFields"
    ) || path == "status"
        || path.starts_with("status.")
}

/// The owned fields of an object: every leaf, a list or an empty object counting as one.
fn fields(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value.as_object() {
        Some(object) if !object.is_empty() => {
            for (k, v) in object {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                if !server_field(&path) {
                    fields(v, &path, out);
                }
            }
        }
        _ if !prefix.is_empty() => {
            out.insert(prefix.to_owned());
        }
        _ => {}
    }
}

fn at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, k| v.get(k))
}

fn remove_at(value: &mut Value, path: &str) {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (at_mut(value, parent), last),
        None => (Some(value), path),
    };
    if let Some(object) = parent.and_then(Value::as_object_mut) {
        object.remove(last);
    }
}

fn at_mut<'a>(value: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.').try_fold(value, |v, k| v.get_mut(k))
}

/// Applied fields over the stored object: objects merge, everything else (lists too) replaces.
fn merge_replacing_lists(target: &mut Value, applied: &Value) {
    match (target.as_object_mut(), applied.as_object()) {
        (Some(t), Some(a)) => {
            for (k, v) in a {
                merge_replacing_lists(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *target = applied.clone(),
    }
}

/// One requirement of an equality-based label selector.
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Requirement {
    fn matches(&self, labels: &Value) -> bool {
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::Absent(k) => label(k).is_none(),
        }
    }
}

/// `a=b,c!=d,e,!f`; set-based selectors (`in`, `notin`) are refused rather than ignored.
fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut requirements = Vec::new();
    for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let requirement = if let Some((k, v)) = part.split_once("!=") {
            Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::Absent(k.trim().to_owned())
        } else if part.contains(' ') || part.contains('(') {
            return Err(format!("labelSelector {selector:?}: set-based requirements are not supported by the fake"));
        } else {
            Requirement::Exists(part.to_owned())
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// `/api/v1/namespaces/ns/plural` and `/apis/g/v/namespaces/ns/plural` name no object.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prefix = if segments.first() == Some(&"api") { 2 } else { 3 };
    segments.len() == prefix + 3
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn status(code: u16, message: &str) -> (u16, Value) {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        429 => "TooManyRequests",
        _ => "InternalError",
    };
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

fn not_found(key: &str) -> (u16, Value) {
    status(404, &format!("{key} not found"))
}

/// The tower service that `kube::Client` sends its requests to.
#[derive(Clone)]
pub struct FakeService {
    state: Arc<Mutex<State>>,
}

impl tower_service::Service<Request<Body>> for FakeService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let content_type =
                parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let stalled = {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                let index = state.stalls.iter().position(|m| m == parts.method);
                index.and_then(|i| state.stalls.remove(i)).is_some()
            };
            if stalled {
                std::future::pending::<()>().await;
            }
            let (code, value) = {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                state.handle(&parts.method, parts.uri.path(), parts.uri.query().unwrap_or(""), content_type, &body)
            };
            let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, ListParams, Patch, PatchParams};

    use super::*;

    fn map(name: &str, data: Value, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": "ns", "labels": labels}, "data": data})
    }

    async fn apply(api: &Api<ConfigMap>, params: &PatchParams, object: Value) -> Result<ConfigMap, kube::Error> {
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        api.patch(&name, params, &Patch::Apply(object)).await
    }

    fn code(result: Result<ConfigMap, kube::Error>) -> u16 {
        match result {
            Err(kube::Error::Api(status)) => status.code,
            Err(other) => panic!("not an API error: {other}"),
            Ok(_) => 200,
        }
    }

    #[tokio::test]
    async fn apply_conflicts_with_other_managers_unless_forced() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let ours = PatchParams::apply("operator");
        apply(&api, &ours, map("m", json!({"a": "1", "b": "2"}), json!({}))).await.expect("created");
        fake.edit::<ConfigMap>("ns", "m", |m| m["data"]["a"] = json!("edited"));

        let refused = apply(&api, &ours, map("m", json!({"a": "1", "b": "2"}), json!({}))).await;
        assert_eq!(code(refused), 409, "another manager changed data.a");
        assert_eq!(fake.get::<ConfigMap>("ns", "m").and_then(|m| m.data).unwrap()["a"], "edited");
        // The same value as the other manager's is no conflict.
        let same = apply(&api, &ours, map("m", json!({"a": "edited", "b": "2"}), json!({}))).await;
        assert_eq!(code(same), 200);

        fake.edit::<ConfigMap>("ns", "m", |m| m["data"]["a"] = json!("again"));
        let forced = apply(&api, &ours.clone().force(), map("m", json!({"a": "1", "b": "2"}), json!({}))).await;
        assert_eq!(forced.expect("forced").data.unwrap()["a"], "1");
        assert_eq!(fake.owned_fields::<ConfigMap>("ns", "m", "operator"), ["data.a", "data.b", "metadata.labels"]);
        assert!(fake.owned_fields::<ConfigMap>("ns", "m", USER_MANAGER).is_empty(), "force takes the fields over");

        let nameless = api.patch("m", &PatchParams::default(), &Patch::Apply(map("m", json!({}), json!({})))).await;
        assert_eq!(code(nameless), 400, "apply needs a field manager");
    }

    #[tokio::test]
    async fn apply_removes_what_its_manager_no_longer_applies_but_keeps_others_fields() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let ours = PatchParams::apply("operator");
        apply(&api, &ours, map("m", json!({"a": "1", "b": "2"}), json!({}))).await.expect("created");
        fake.edit::<ConfigMap>("ns", "m", |m| m["data"]["user"] = json!("mine"));
        let after = apply(&api, &ours, map("m", json!({"a": "1"}), json!({}))).await.expect("applied");
        let data = after.data.unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["a", "user"]);
    }

    #[tokio::test]
    async fn lists_honour_label_selectors() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let ours = PatchParams::apply("operator");
        apply(&api, &ours, map("x", json!({}), json!({"app": "chat", "tier": "a"}))).await.expect("x");
        apply(&api, &ours, map("y", json!({}), json!({"app": "chat"}))).await.expect("y");
        apply(&api, &ours, map("z", json!({}), json!({"app": "other"}))).await.expect("z");
        let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
            list.items.into_iter().filter_map(|m| m.metadata.name).collect()
        };
        let chat = api.list(&ListParams::default().labels("app=chat")).await.expect("list");
        assert_eq!(names(chat), ["x", "y"]);
        let untiered = api.list(&ListParams::default().labels("app=chat,!tier")).await.expect("list");
        assert_eq!(names(untiered), ["y"]);
        let not_chat = api.list(&ListParams::default().labels("app!=chat")).await.expect("list");
        assert_eq!(names(not_chat), ["z"]);
        assert!(api.list(&ListParams::default().labels("app in (chat)")).await.is_err(), "refused, not ignored");
    }

    #[tokio::test]
    async fn statefulsets_move_one_pod_per_step() {
        use k8s_openapi::api::apps::v1::StatefulSet;
        let fake = FakeApi::new();
        fake.set_auto_ready(false);
        let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"replicas": 2, "template": {"metadata": {"annotations": {"v": "1"}}}}});
        let api: Api<StatefulSet> = Api::namespaced(fake.client(), "ns");
        api.patch("s", &PatchParams::apply("operator"), &Patch::Apply(sts.clone())).await.expect("created");
        let counts = || {
            let st = fake.get::<StatefulSet>("ns", "s").and_then(|s| s.status).unwrap_or_default();
            (st.replicas, st.ready_replicas.unwrap_or(0), st.updated_replicas.unwrap_or(0))
        };
        let mut seen = Vec::new();
        while fake.step_statefulsets() {
            seen.push(counts());
        }
        assert_eq!(seen, [(0, 0, 0), (1, 0, 1), (1, 1, 1), (2, 1, 2), (2, 2, 2)]);

        let mut changed = sts;
        changed["spec"]["template"]["metadata"]["annotations"]["v"] = json!("2");
        api.patch("s", &PatchParams::apply("operator"), &Patch::Apply(changed)).await.expect("changed");
        seen.clear();
        while fake.step_statefulsets() {
            seen.push(counts());
        }
        // Seen, then the highest pod replaced and ready, then the next.
        assert_eq!(seen, [(2, 2, 0), (2, 1, 1), (2, 2, 1), (2, 1, 2), (2, 2, 2)]);
    }
}
