//! An in-process fake Kubernetes API server (a tower service behind a real `kube::Client`) for
//! tests and the benchmark: stores objects as JSON, applies, creates, replaces with
//! resourceVersion checks, deletes, lists and watches, records requests and injects failures.
//!
//! Server-side apply is modelled as the API server does it, simplified where the operator
//! cannot tell: every field has owners (field managers); an apply without `force` that would
//! change a field another manager set is refused with 409 and the conflicting fields; an apply
//! removes the fields its manager applied before and no longer applies, unless another manager
//! owns them. Lists count as one field (the real server merges some by key). Lists and watches
//! honour equality-based `labelSelector`s and `metadata.name`/`metadata.namespace`
//! `fieldSelector`s, in one namespace or across all. StatefulSets either settle at once
//! (`auto_ready`) or move as their controller would, one pod per `step_statefulsets`.
//!
//! Every change gets the next resourceVersion and goes to an event log that watches read: a
//! watch first sends the changes after its resourceVersion that fall in its collection and
//! match its selectors, then waits for more, until its `timeoutSeconds` or until every
//! `FakeApi` handle is dropped. The log keeps the latest changes only; a watch from before them
//! gets an `ERROR` event with 410 Expired, as from the API server's watch cache, and the
//! watcher lists again. A write that changes nothing is a no-op (no new resourceVersion, no
//! event), as on the API server: a controller that applies on every event settles only then.
//! Requests that ask for `PartialObjectMetadata` (kube's metadata-only gets, lists and
//! watches) get that shape.
//!
//! Custom resources of the operator's CRD (the ChatCluster) are defaulted, pruned and validated
//! against its structural schema on every write through the API, with 422 Invalid as the API
//! server answers; CEL rules are not evaluated, and on updates values that did not change are
//! not validated again (the API server's validation ratcheting). The helpers (`put`, `edit`)
//! write as if to etcd directly, without admission.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kube::Resource;
use kube::client::Body;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;

/// Changes the event log keeps for watches (the API server's watch cache keeps a window too).
const LOG_CAPACITY: usize = 1000;
/// A watch's length when the request names none (the API server picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

struct State {
    /// Stored as JSON text: several times smaller than `Value`, so the benchmark's memory figure
    /// is mostly the operator's. Shared with the event log.
    objects: BTreeMap<String, Arc<str>>,
    requests: Vec<Logged>,
    record: bool,
    failures: VecDeque<(Method, u16)>,
    /// Requests with these methods that never get an answer (a stalled connection).
    stalls: VecDeque<Method>,
    revision: u64,
    auto_ready: bool,
    /// Per object, the fields each field manager owns (paths such as `spec.ports`).
    owners: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// Changes after `log_start`, oldest first.
    log: VecDeque<Change>,
    /// A watch may resume from this resourceVersion or a later one; older ones are expired.
    log_start: u64,
    /// The latest revision, sent while the state is locked: watches wait on it for changes.
    changes: watch::Sender<u64>,
    /// Closed when the last `FakeApi` handle drops: open watches end, new ones are refused.
    open: watch::Receiver<()>,
}

/// One recorded request, and which client made it (see `FakeApi::client_as`).
struct Logged {
    caller: Option<Arc<str>>,
    line: String,
}

/// One entry of the event log.
struct Change {
    revision: u64,
    key: String,
    kind: &'static str,
    /// The object's labels, for label selectors without parsing the object.
    labels: Value,
    /// Its labels before a change (a watch sends it as ADDED or DELETED when it enters or leaves
    /// the label selection).
    labels_before: Option<Value>,
    object: Arc<str>,
}

/// The manager the test helpers write as, like a user running `kubectl edit`.
pub const USER_MANAGER: &str = "kubectl-edit";

/// Handle on the fake server's state; cheap to clone. Watches end when the last handle drops.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    _open: Arc<watch::Sender<()>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeApi {
    /// A fake whose StatefulSets become ready at once, recording every request.
    pub fn new() -> Self {
        let (open_tx, open_rx) = watch::channel(());
        let state = State {
            objects: BTreeMap::new(),
            requests: Vec::new(),
            record: true,
            failures: VecDeque::new(),
            stalls: VecDeque::new(),
            revision: 0,
            auto_ready: true,
            owners: BTreeMap::new(),
            log: VecDeque::new(),
            log_start: 0,
            changes: watch::channel(0).0,
            open: open_rx,
        };
        Self { state: Arc::new(Mutex::new(state)), _open: Arc::new(open_tx) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A client talking to this fake; needs a running Tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(FakeService { state: self.state.clone(), caller: None }, "default")
    }

    /// A client whose requests `requests_from(caller)` tells apart, like one replica's.
    pub fn client_as(&self, caller: &str) -> kube::Client {
        kube::Client::new(FakeService { state: self.state.clone(), caller: Some(caller.into()) }, "default")
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
        self.lock().requests.iter().map(|r| r.line.clone()).collect()
    }

    /// `METHOD /path` of every request so far by clients made with `client_as(caller)`.
    pub fn requests_from(&self, caller: &str) -> Vec<String> {
        let state = self.lock();
        state.requests.iter().filter(|r| r.caller.as_deref() == Some(caller)).map(|r| r.line.clone()).collect()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// The latest resourceVersion.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Forgets the event log, as etcd compaction does: watches from an earlier resourceVersion
    /// get 410 Expired and their watchers list again.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.log.clear();
        state.log_start = state.revision;
    }

    /// Stores a typed object as if created by a user.
    pub fn put<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let (Some(ns), Some(name)) = (object.meta().namespace.clone(), object.meta().name.clone()) else { return };
        let Ok(value) = serde_json::to_value(object) else { return };
        let key = object_path::<K>(&ns, &name);
        let mut state = self.lock();
        let old = state.value(&key);
        state.take_changed_fields(&key, USER_MANAGER, old.as_ref(), &value);
        state.write(key, value, old.as_ref());
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
        state.write(key, new, Some(&old));
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
            let Some(old) = state.value(&key) else { continue };
            let mut sts = old.clone();
            if step_statefulset(&mut sts) {
                changed = true;
                state.commit(key, sts, Some(&old));
            }
        }
        changed
    }

    /// Deletes a StatefulSet's outdated pods, as a user does under `OnDelete`: they come back
    /// with the latest template, not ready yet.
    pub fn delete_statefulset_pods(&self, ns: &str, name: &str) {
        let key = object_path::<k8s_openapi::api::apps::v1::StatefulSet>(ns, name);
        let mut state = self.lock();
        let Some(old) = state.value(&key) else { return };
        let mut sts = old.clone();
        let pods: Vec<(bool, bool)> =
            fake_pods(&sts).into_iter().map(|p| if p.0 { p } else { (true, false) }).collect();
        let generation = sts["status"]["observedGeneration"].as_i64().unwrap_or(1);
        let on_delete = sts["spec"]["updateStrategy"]["type"] == "OnDelete";
        write_statefulset_status(&mut sts, generation, &pods, on_delete);
        state.commit(key, sts, Some(&old));
    }

    /// Finishes what the StatefulSet controller was doing (for tests that turned auto-ready off).
    pub fn settle_statefulset(&self, ns: &str, name: &str) {
        let key = object_path::<k8s_openapi::api::apps::v1::StatefulSet>(ns, name);
        let mut state = self.lock();
        let Some(old) = state.value(&key) else { return };
        let mut sts = old.clone();
        let generation = sts["metadata"]["generation"].as_i64().unwrap_or(1);
        settle(&mut sts, generation);
        state.commit(key, sts, Some(&old));
    }

    pub fn remove<K: Resource<DynamicType = ()>>(&self, ns: &str, name: &str) -> bool {
        self.lock().delete(&object_path::<K>(ns, name)).is_some()
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

/// A request as the handler sees it.
struct Incoming<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a str,
    content_type: &'a str,
    /// Asks for `PartialObjectMetadata` (kube's metadata-only requests).
    metadata_only: bool,
    body: &'a [u8],
    caller: Option<&'a Arc<str>>,
}

/// What the handler answers: a whole response, or a watch that streams.
enum Answer {
    Done(u16, Value),
    Watch(WatchStart),
}

impl From<(u16, Value)> for Answer {
    fn from((code, value): (u16, Value)) -> Self {
        Answer::Done(code, value)
    }
}

impl State {
    fn value(&self, key: &str) -> Option<Value> {
        self.objects.get(key).and_then(|t| serde_json::from_str(t).ok())
    }

    /// Sets server-owned metadata (generation, uid, creation time) on a new version of an object
    /// and stores it.
    fn write(&mut self, key: String, mut new: Value, old: Option<&Value>) -> Value {
        let generation = match old {
            None => 1,
            Some(old) => {
                let bump = old.get("spec") != new.get("spec");
                old["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(bump)
            }
        };
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("generation".into(), json!(generation));
            let uid = old.map_or_else(|| json!(format!("uid-{key}")), |o| o["metadata"]["uid"].clone());
            meta.insert("uid".into(), uid);
            meta.entry("creationTimestamp").or_insert(json!("2026-01-01T00:00:00Z"));
        }
        if new["kind"] == "StatefulSet" && self.auto_ready {
            settle(&mut new, generation);
        }
        self.commit(key, new, old)
    }

    /// Stores a new version under the next resourceVersion and logs the change for watches. A
    /// version equal to `old` but for its resourceVersion changes nothing, as on the API server.
    fn commit(&mut self, key: String, mut new: Value, old: Option<&Value>) -> Value {
        if let Some(old) = old
            && same_but_version(old, &new)
        {
            return old.clone();
        }
        self.revision += 1;
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(self.revision.to_string()));
        }
        let text: Arc<str> = new.to_string().into();
        let before = old.map(|o| o["metadata"]["labels"].clone());
        self.log_change(key.clone(), if old.is_some() { "MODIFIED" } else { "ADDED" }, before, &new, text.clone());
        self.objects.insert(key, text);
        new
    }

    /// Removes an object; the deletion gets a resourceVersion of its own, as on the API server.
    fn delete(&mut self, key: &str) -> Option<Value> {
        self.owners.remove(key);
        let text = self.objects.remove(key)?;
        let mut old: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        self.revision += 1;
        if let Some(meta) = old.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(self.revision.to_string()));
        }
        let text: Arc<str> = old.to_string().into();
        self.log_change(key.to_owned(), "DELETED", None, &old, text);
        Some(old)
    }

    fn log_change(
        &mut self,
        key: String,
        kind: &'static str,
        labels_before: Option<Value>,
        object: &Value,
        text: Arc<str>,
    ) {
        if self.log.len() >= LOG_CAPACITY
            && let Some(dropped) = self.log.pop_front()
        {
            self.log_start = dropped.revision;
        }
        let labels = object["metadata"]["labels"].clone();
        self.log.push_back(Change { revision: self.revision, key, kind, labels, labels_before, object: text });
        self.changes.send_replace(self.revision);
    }

    fn handle(&mut self, request: &Incoming<'_>) -> Answer {
        let method = request.method;
        let params: BTreeMap<String, String> = form_urlencoded::parse(request.query.as_bytes()).into_owned().collect();
        let manager = params.get("fieldManager").cloned();
        if self.record {
            self.requests.push(Logged { caller: request.caller.cloned(), line: format!("{method} {}", request.path) });
        }
        if let Some(i) = self.failures.iter().position(|(m, _)| m == method)
            && let Some((_, code)) = self.failures.remove(i)
        {
            return status(code, "injected failure").into();
        }
        let Some(target) = Target::parse(request.path) else {
            return status(404, &format!("the server could not find the requested resource ({})", request.path)).into();
        };
        let subresource = match target.subresource.as_deref() {
            None => false,
            Some("status") => true,
            Some(other) => return status(404, &format!("subresource {other} is not served by the fake")).into(),
        };
        let key = target.object_path();
        let parsed: Value = serde_json::from_slice(request.body).unwrap_or(Value::Null);
        let existing = self.value(&key);
        let (key, mut new, old, created) = match *method {
            Method::GET if target.name.is_none() => {
                let selection = match Selection::new(&target, &params, request.metadata_only) {
                    Ok(selection) => selection,
                    Err(message) => return status(400, &message).into(),
                };
                if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    return self.watch(selection, &params);
                }
                return (200, self.list(&selection)).into();
            }
            Method::GET => {
                let view = |v: Value| if request.metadata_only { partial(&v) } else { v };
                return existing.map_or_else(|| not_found(&key), |v| (200, view(v))).into();
            }
            Method::DELETE => return self.delete(&key).map_or_else(|| not_found(&key), |old| (200, old)).into(),
            Method::POST => {
                let name = parsed["metadata"]["name"].as_str().map(str::to_owned).unwrap_or_else(|| {
                    format!("{}{}", parsed["metadata"]["generateName"].as_str().unwrap_or("gen-"), self.revision)
                });
                let key = format!("{key}/{name}");
                if self.objects.contains_key(&key) {
                    let message = format!("{} \"{name}\" already exists", target.plural);
                    return status_with_reason(409, "AlreadyExists", &message).into();
                }
                let mut new = parsed;
                new["metadata"]["name"] = json!(name);
                (key, new, None, true)
            }
            Method::PUT => {
                let Some(old) = existing else { return not_found(&key).into() };
                if parsed["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                    let message = format!(
                        "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                        target.plural,
                        target.name.as_deref().unwrap_or_default()
                    );
                    return status(409, &message).into();
                }
                (key, parsed, Some(old), false)
            }
            Method::PATCH if subresource => {
                let Some(old) = existing else { return not_found(&key).into() };
                let mut new = old.clone();
                new["status"] = parsed["status"].clone();
                (key, new, Some(old), false)
            }
            Method::PATCH if request.content_type.starts_with("application/apply-patch") => {
                let Some(manager) = manager else {
                    return status(
                        400,
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    )
                    .into();
                };
                let force = params.get("force").is_some_and(|f| f == "true");
                // Apply takes fields over before admission; a refused object must not keep that.
                let owners_before = self.owners.get(&key).cloned();
                let mut new = match self.apply(&key, &manager, force, parsed, existing.as_ref()) {
                    Ok(new) => new,
                    Err(conflicts) => return status(409, &conflicts).into(),
                };
                if let Err(invalid) = admit(&target, &mut new, existing.as_ref()) {
                    match owners_before {
                        Some(owners) => self.owners.insert(key, owners),
                        None => self.owners.remove(&key),
                    };
                    return (422, invalid).into();
                }
                return (200, self.write(key, new, existing.as_ref())).into();
            }
            Method::PATCH => {
                let Some(old) = existing else { return not_found(&key).into() };
                let mut new = old.clone();
                merge(&mut new, &parsed);
                (key, new, Some(old), false)
            }
            _ => return status(405, "method not supported by the fake").into(),
        };
        if let Err(invalid) = admit(&target, &mut new, old.as_ref()) {
            return (422, invalid).into();
        }
        if !subresource {
            self.take_changed_fields(&key, manager.as_deref().unwrap_or(UPDATE_MANAGER), old.as_ref(), &new);
        }
        let stored = self.write(key, new, old.as_ref());
        (if created { 201 } else { 200 }, stored).into()
    }

    /// The stored objects in `selection`, as it shows them.
    fn selected<'a>(&'a self, selection: &'a Selection) -> impl Iterator<Item = Value> + 'a {
        self.objects
            .iter()
            .filter(|(k, _)| selection.holds(k))
            .filter_map(|(_, t)| serde_json::from_str::<Value>(t).ok())
            .filter(|item| selection.matches_labels(&item["metadata"]["labels"]))
            .map(|item| selection.view(item))
    }

    /// A collection: its items in `selection`, at the latest resourceVersion (a watch from it
    /// misses nothing).
    fn list(&self, selection: &Selection) -> Value {
        let items: Vec<Value> = self.selected(selection).collect();
        let (api_version, kind) =
            if selection.metadata_only { ("meta.k8s.io/v1", "PartialObjectMetadataList") } else { ("v1", "List") };
        let meta = json!({"resourceVersion": self.revision.to_string()});
        json!({"apiVersion": api_version, "kind": kind, "metadata": meta, "items": items})
    }

    /// Starts a watch (see the module's description); the stream itself runs outside the lock.
    fn watch(&mut self, selection: Selection, params: &BTreeMap<String, String>) -> Answer {
        if self.open.has_changed().is_err() {
            return status(503, "the fake API server has shut down").into();
        }
        if params.get("sendInitialEvents").is_some_and(|s| s == "true") {
            return status(400, "sendInitialEvents (streaming lists) is not supported by the fake").into();
        }
        let timeout = match params.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
            None => DEFAULT_WATCH_TIMEOUT,
            Some(Ok(seconds)) => Duration::from_secs(seconds),
            Some(Err(_)) => return status(400, "timeoutSeconds: not a number").into(),
        };
        let mut pending = String::new();
        let after = match params.get("resourceVersion").map(String::as_str).filter(|v| !v.is_empty() && *v != "0") {
            // "Any version": the current state as ADDED events, then what follows.
            None => {
                for object in self.selected(&selection) {
                    push_event(&mut pending, "ADDED", &object);
                }
                self.revision
            }
            Some(version) => match version.parse::<u64>() {
                Ok(version) => version,
                Err(_) => return status(400, &format!("resourceVersion {version:?}: not a number")).into(),
            },
        };
        Answer::Watch(WatchStart {
            selection,
            after,
            pending,
            changes: self.changes.subscribe(),
            open: self.open.clone(),
            timeout,
        })
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
}

/// Whether two versions of an object differ in nothing but their resourceVersion.
fn same_but_version(old: &Value, new: &Value) -> bool {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else { return old == new };
    let same_meta = |a: &Value, b: &Value| match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let without =
                |m: &serde_json::Map<String, Value>| m.iter().filter(|(k, _)| *k != "resourceVersion").count();
            without(a) == without(b)
                && a.iter().filter(|(k, _)| *k != "resourceVersion").all(|(k, v)| b.get(k) == Some(v))
        }
        _ => a == b,
    };
    old.len() == new.len()
        && old.iter().all(|(k, v)| match new.get(k) {
            Some(n) if k == "metadata" => same_meta(v, n),
            Some(n) => v == n,
            None => false,
        })
}

/// What a request path names: `/api/v1` or `/apis/<group>/<version>`, then an optional
/// namespace, the resource's plural, an optional name and subresource.
struct Target {
    prefix: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let version_end = match segments.first() {
            Some(&"api") => 2,
            Some(&"apis") => 3,
            _ => return None,
        };
        let prefix = format!("/{}", segments.get(..version_end)?.join("/"));
        let rest = segments.get(version_end..)?;
        // `/api/v1/namespaces/x` is the Namespace `x` itself, not a namespace prefix.
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some((*namespace).to_owned()), rest),
            _ => (None, rest),
        };
        let owned = |s: &&str| (*s).to_owned();
        let (plural, name, subresource) = match rest {
            [plural] => (plural, None, None),
            [plural, name] => (plural, Some(owned(name)), None),
            [plural, name, sub] => (plural, Some(owned(name)), Some(owned(sub))),
            _ => return None,
        };
        if plural.is_empty() || name.as_deref() == Some("") {
            return None;
        }
        Some(Self { prefix, namespace, plural: owned(plural), name, subresource })
    }

    /// The path of the object or collection, without the subresource: the key objects are
    /// stored under.
    fn object_path(&self) -> String {
        let mut path = self.prefix.clone();
        if let Some(namespace) = &self.namespace {
            path.push_str(&format!("/namespaces/{namespace}"));
        }
        path.push('/');
        path.push_str(&self.plural);
        if let Some(name) = &self.name {
            path.push('/');
            path.push_str(name);
        }
        path
    }
}

/// The objects a list or watch asks for: a collection, in one namespace or all, narrowed by
/// selectors.
struct Selection {
    prefix: String,
    namespace: Option<String>,
    plural: String,
    labels: Vec<Requirement>,
    /// `(field, equal, value)` of `metadata.name` and `metadata.namespace` requirements.
    fields: Vec<(String, bool, String)>,
    metadata_only: bool,
}

impl Selection {
    fn new(target: &Target, params: &BTreeMap<String, String>, metadata_only: bool) -> Result<Self, String> {
        let labels = params.get("labelSelector").map(|s| parse_selector(s)).transpose()?.unwrap_or_default();
        let fields = params.get("fieldSelector").map(|s| parse_field_selector(s)).transpose()?.unwrap_or_default();
        Ok(Self {
            prefix: format!("{}/", target.prefix),
            namespace: target.namespace.clone(),
            plural: target.plural.clone(),
            labels,
            fields,
            metadata_only,
        })
    }

    /// Whether the object stored under `key` is in the collection and matches the field
    /// selector (which only names the name and namespace, both in the key).
    fn holds(&self, key: &str) -> bool {
        let Some(rest) = key.strip_prefix(&self.prefix) else { return false };
        let segments: Vec<&str> = rest.split('/').collect();
        let (namespace, plural, name) = match segments[..] {
            ["namespaces", namespace, plural, name] => (Some(namespace), plural, name),
            [plural, name] => (None, plural, name),
            _ => return false,
        };
        plural == self.plural
            && (self.namespace.is_none() || self.namespace.as_deref() == namespace)
            && self.fields.iter().all(|(field, equal, value)| {
                let actual = if field == "metadata.name" { Some(name) } else { namespace };
                (actual == Some(value.as_str())) == *equal
            })
    }

    fn matches_labels(&self, labels: &Value) -> bool {
        self.labels.iter().all(|requirement| requirement.matches(labels))
    }

    /// The object as this request sees it: whole, or its metadata only.
    fn view(&self, object: Value) -> Value {
        if self.metadata_only { partial(&object) } else { object }
    }
}

/// An object as a `PartialObjectMetadata`, the shape of metadata-only requests.
fn partial(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"].clone()})
}

/// `metadata.name=x,metadata.namespace!=y`: the only fields every resource supports. Others
/// are refused rather than ignored.
fn parse_field_selector(selector: &str) -> Result<Vec<(String, bool, String)>, String> {
    let mut requirements = Vec::new();
    for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, equal, value) = if let Some((k, v)) = part.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (k, true, v)
        } else {
            return Err(format!("fieldSelector {selector:?}: invalid requirement {part:?}"));
        };
        let field = field.trim();
        if field != "metadata.name" && field != "metadata.namespace" {
            return Err(format!("fieldSelector {selector:?}: field label not supported: {field}"));
        }
        requirements.push((field.to_owned(), equal, value.trim().to_owned()));
    }
    Ok(requirements)
}

/// Appends one line of a watch stream.
fn push_event(out: &mut String, kind: &str, object: &Value) {
    out.push_str(&json!({"type": kind, "object": object}).to_string());
    out.push('\n');
}

/// A watch as the handler starts it, before it has the state to read the log from.
struct WatchStart {
    selection: Selection,
    after: u64,
    /// Lines to send first.
    pending: String,
    changes: watch::Receiver<u64>,
    open: watch::Receiver<()>,
    timeout: Duration,
}

/// A running watch: sends the log's changes after `after` that the selection matches.
struct Watch {
    state: Arc<Mutex<State>>,
    selection: Selection,
    after: u64,
    pending: String,
    changes: watch::Receiver<u64>,
    open: watch::Receiver<()>,
    deadline: tokio::time::Instant,
    /// Ends the stream once `pending` is sent (after a 410).
    done: bool,
}

impl WatchStart {
    fn into_body(self, state: Arc<Mutex<State>>) -> FakeBody {
        let watch = Watch {
            state,
            selection: self.selection,
            after: self.after,
            pending: self.pending,
            changes: self.changes,
            open: self.open,
            deadline: tokio::time::Instant::now() + self.timeout,
            done: false,
        };
        let frames = futures_util::stream::unfold(watch, |mut watch| async move {
            let chunk = watch.next_chunk().await?;
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), watch))
        });
        StreamBody::new(frames).boxed_unsync()
    }
}

impl Watch {
    /// The next lines to send; `None` ends the watch.
    async fn next_chunk(&mut self) -> Option<String> {
        loop {
            if !self.pending.is_empty() {
                return Some(std::mem::take(&mut self.pending));
            }
            if self.done {
                return None;
            }
            self.read_log();
            if !self.pending.is_empty() {
                continue;
            }
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                // Nobody sends on it: it only resolves when the last `FakeApi` handle drops.
                _ = self.open.changed() => return None,
                _ = tokio::time::sleep_until(self.deadline) => return None,
            }
        }
    }

    /// Moves the changes after `after` that the selection matches into `pending`.
    fn read_log(&mut self) {
        let state = lock(&self.state);
        // Marked seen under the lock that changes are sent under: none slips between this read
        // and the next wait.
        self.changes.borrow_and_update();
        if self.after < state.log_start {
            let message = format!("too old resource version: {} ({})", self.after, state.log_start + 1);
            let (_, gone) = status(410, &message);
            push_event(&mut self.pending, "ERROR", &gone);
            self.done = true;
            return;
        }
        for change in state.log.iter().filter(|c| c.revision > self.after && self.selection.holds(&c.key)) {
            let now = self.selection.matches_labels(&change.labels);
            let before = change.labels_before.as_ref().map(|labels| self.selection.matches_labels(labels));
            // As the API server does, an object whose labels move it into or out of the
            // selection is added to or deleted from the watcher's view.
            let kind = match (before, now) {
                (Some(true), false) => "DELETED",
                (Some(false), true) => "ADDED",
                (_, true) => change.kind,
                (_, false) => continue,
            };
            if let Ok(object) = serde_json::from_str::<Value>(&change.object) {
                push_event(&mut self.pending, kind, &self.selection.view(object));
            }
        }
        self.after = self.after.max(state.revision);
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
        400 => "BadRequest",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    status_with_reason(code, reason, message)
}

fn status_with_reason(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

fn not_found(key: &str) -> (u16, Value) {
    status(404, &format!("{key} not found"))
}

/// Admission of a write to `target`: defaulting, pruning and validation for custom resources
/// the fake has a schema of; other resources pass unchanged. Err: the 422 Status.
fn admit(target: &Target, object: &mut Value, old: Option<&Value>) -> Result<(), Value> {
    match schema::find(&target.prefix, &target.plural) {
        Some(schema) => schema.admit(object, old),
        None => Ok(()),
    }
}

/// The structural schema of a CRD version, applied as the API server applies it.
mod schema {
    use std::sync::OnceLock;

    use serde_json::{Map, Value, json};

    pub(super) struct Schema {
        /// `/apis/<group>/<version>`.
        prefix: String,
        plural: String,
        group: String,
        kind: String,
        root: Value,
    }

    /// The schema of the operator's CRD served at `prefix` (`/apis/<group>/<version>`) and
    /// `plural`, if any.
    pub(super) fn find(prefix: &str, plural: &str) -> Option<&'static Schema> {
        static SCHEMAS: OnceLock<Vec<Schema>> = OnceLock::new();
        let schemas = SCHEMAS.get_or_init(|| {
            serde_json::to_value(crate::crd::definition()).map(|crd| from_crd(&crd)).unwrap_or_default()
        });
        schemas.iter().find(|s| s.prefix == prefix && s.plural == plural)
    }

    fn from_crd(crd: &Value) -> Vec<Schema> {
        let spec = &crd["spec"];
        let (group, plural, kind) =
            (text(&spec["group"]), text(&spec["names"]["plural"]), text(&spec["names"]["kind"]));
        let versions = spec["versions"].as_array().map(Vec::as_slice).unwrap_or_default();
        versions
            .iter()
            .filter_map(|version| {
                let root = version.pointer("/schema/openAPIV3Schema")?.clone();
                Some(Schema {
                    prefix: format!("/apis/{group}/{}", text(&version["name"])),
                    plural: plural.clone(),
                    group: group.clone(),
                    kind: kind.clone(),
                    root,
                })
            })
            .collect()
    }

    fn text(value: &Value) -> String {
        value.as_str().unwrap_or_default().to_owned()
    }

    /// One invalid field, as the API server reports it in a Status' causes.
    struct Cause {
        reason: &'static str,
        field: String,
        message: String,
    }

    impl Schema {
        /// Defaults and prunes `object`, then validates it against the schema; `old` is the
        /// stored version on updates (values unchanged from it are not validated again).
        pub(super) fn admit(&self, object: &mut Value, old: Option<&Value>) -> Result<(), Value> {
            default(object, &self.root, true);
            let mut causes = Vec::new();
            validate(object, old, &self.root, "", &mut causes);
            if causes.is_empty() {
                return Ok(());
            }
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let lines: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
            let summary = match &lines[..] {
                [one] => one.clone(),
                many => format!("[{}]", many.join(", ")),
            };
            let message = format!("{}.{} \"{name}\" is invalid: {summary}", self.kind, self.group);
            let causes: Vec<Value> =
                causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect();
            Err(json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": "Invalid", "code": 422,
                "details": {"name": name, "group": self.group, "kind": self.kind, "causes": causes},
            }))
        }
    }

    fn flag(schema: &Value, name: &str) -> bool {
        schema.get(name).and_then(Value::as_bool).unwrap_or(false)
    }

    /// Structural defaulting as the API server does it: a property that is absent (or null
    /// where the schema does not allow null) gets the schema's default, then every present
    /// value is defaulted in turn. Nulls the schema does not allow and that have no default
    /// are dropped, and so are fields the schema does not know (pruning), except the root's
    /// `apiVersion`, `kind` and `metadata`.
    fn default(value: &mut Value, schema: &Value, root: bool) {
        match value {
            Value::Object(object) => {
                let properties = schema.get("properties").and_then(Value::as_object);
                for (name, property) in properties.into_iter().flatten() {
                    let null_not_allowed = |v: &Value| v.is_null() && !flag(property, "nullable");
                    match (object.get(name), property.get("default")) {
                        (None, Some(default)) => {
                            object.insert(name.clone(), default.clone());
                        }
                        (Some(v), Some(default)) if null_not_allowed(v) => {
                            object.insert(name.clone(), default.clone());
                        }
                        (Some(v), None) if null_not_allowed(v) => {
                            object.remove(name);
                        }
                        _ => {}
                    }
                }
                let extra = schema.get("additionalProperties");
                let keeps_unknown = flag(schema, "x-kubernetes-preserve-unknown-fields")
                    || extra.is_some_and(|e| e == &Value::Bool(true))
                    || (properties.is_none() && extra.is_none() && schema.get("type").is_none());
                object.retain(|name, field| {
                    if let Some(property) = properties.and_then(|p| p.get(name)) {
                        default(field, property, false);
                        true
                    } else if let Some(extra) = extra.filter(|e| e.is_object()) {
                        default(field, extra, false);
                        true
                    } else {
                        keeps_unknown || (root && matches!(name.as_str(), "apiVersion" | "kind" | "metadata"))
                    }
                });
            }
            Value::Array(items) => {
                if let Some(item) = schema.get("items") {
                    items.iter_mut().for_each(|v| default(v, item, false));
                }
            }
            _ => {}
        }
    }

    fn type_name(value: &Value) -> &'static str {
        match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    fn has_type(value: &Value, wanted: &str) -> bool {
        match wanted {
            "number" => value.is_number(),
            other => type_name(value) == other,
        }
    }

    /// Checks what a structural schema can state: types, nullability, enums, bounds, lengths,
    /// patterns, item and property counts, required properties and unique list-map keys.
    fn validate(value: &Value, old: Option<&Value>, schema: &Value, path: &str, causes: &mut Vec<Cause>) {
        // Validation ratcheting: a value that did not change does not newly fail.
        if old == Some(value) {
            return;
        }
        let mut invalid = |reason: &'static str, message: String| {
            causes.push(Cause { reason, field: path.to_owned(), message });
        };
        let shown = |v: &Value| match v {
            Value::Object(_) | Value::Array(_) => format!("\"{}\"", type_name(v)),
            other => other.to_string(),
        };
        let int_or_string = flag(schema, "x-kubernetes-int-or-string");
        let wanted = schema.get("type").and_then(Value::as_str);
        if value.is_null() {
            if !flag(schema, "nullable") && (wanted.is_some() || int_or_string) {
                let expected = wanted.unwrap_or("integer or string");
                invalid(
                    "FieldValueTypeInvalid",
                    format!("Invalid value: \"null\": {path} in body must be of type {expected}: \"null\""),
                );
            }
            return;
        }
        let type_ok = if int_or_string {
            value.is_string() || has_type(value, "integer")
        } else {
            wanted.is_none_or(|t| has_type(value, t))
        };
        if !type_ok {
            let actual = type_name(value);
            let expected = wanted.unwrap_or("integer or string");
            invalid(
                "FieldValueTypeInvalid",
                format!("Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""),
            );
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let listed: Vec<String> = allowed.iter().map(Value::to_string).collect();
            invalid(
                "FieldValueNotSupported",
                format!("Unsupported value: {}: supported values: {}", shown(value), listed.join(", ")),
            );
        }
        if let Some(number) = value.as_f64() {
            let exclusive = |name: &str| flag(schema, name);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if exclusive("exclusiveMinimum") && number <= min {
                    invalid(
                        "FieldValueInvalid",
                        format!("Invalid value: {value}: {path} in body should be greater than {}", schema["minimum"]),
                    );
                } else if number < min {
                    invalid(
                        "FieldValueInvalid",
                        format!(
                            "Invalid value: {value}: {path} in body should be greater than or equal to {}",
                            schema["minimum"]
                        ),
                    );
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if exclusive("exclusiveMaximum") && number >= max {
                    invalid(
                        "FieldValueInvalid",
                        format!("Invalid value: {value}: {path} in body should be less than {}", schema["maximum"]),
                    );
                } else if number > max {
                    invalid(
                        "FieldValueInvalid",
                        format!(
                            "Invalid value: {value}: {path} in body should be less than or equal to {}",
                            schema["maximum"]
                        ),
                    );
                }
            }
        }
        if let Some(text) = value.as_str() {
            let length = text.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64).filter(|min| length < *min) {
                invalid(
                    "FieldValueInvalid",
                    format!("Invalid value: {value}: {path} in body should be at least {min} chars long"),
                );
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64).filter(|max| length > *max) {
                invalid("FieldValueTooLong", format!("Too long: may not be more than {max} bytes"));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                && !matches_pattern(pattern, text)
            {
                invalid(
                    "FieldValueInvalid",
                    format!("Invalid value: {value}: {path} in body should match '{pattern}'"),
                );
            }
        }
        match value {
            Value::Array(items) => validate_items(items, schema, path, causes),
            Value::Object(object) => validate_properties(object, old, schema, path, causes),
            _ => {}
        }
    }

    fn validate_items(items: &[Value], schema: &Value, path: &str, causes: &mut Vec<Cause>) {
        let count = items.len() as u64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64).filter(|min| count < *min) {
            let message = format!("Invalid value: {count}: {path} in body should have at least {min} items");
            causes.push(Cause { reason: "FieldValueInvalid", field: path.to_owned(), message });
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64).filter(|max| count > *max) {
            let message = format!("Too many: {count}: must have at most {max} items");
            causes.push(Cause { reason: "FieldValueTooMany", field: path.to_owned(), message });
        }
        // Items are not matched with the old list's: every item of a changed list is checked.
        if let Some(item) = schema.get("items") {
            for (i, value) in items.iter().enumerate() {
                validate(value, None, item, &format!("{path}[{i}]"), causes);
            }
        }
        let keys: Vec<&str> = match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("map") => schema["x-kubernetes-list-map-keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect(),
            _ => return,
        };
        let mut seen = Vec::new();
        for (i, value) in items.iter().enumerate() {
            let key: Vec<&Value> = keys.iter().map(|k| &value[*k]).collect();
            if seen.contains(&key) {
                let shown: Map<String, Value> = keys.iter().map(|k| ((*k).to_owned(), value[*k].clone())).collect();
                let message = format!("Duplicate value: {}", Value::Object(shown));
                causes.push(Cause { reason: "FieldValueDuplicate", field: format!("{path}[{i}]"), message });
            } else {
                seen.push(key);
            }
        }
    }

    fn validate_properties(
        object: &Map<String, Value>,
        old: Option<&Value>,
        schema: &Value,
        path: &str,
        causes: &mut Vec<Cause>,
    ) {
        let child = |name: &str| if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !object.contains_key(name) {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    field: child(name),
                    message: "Required value".to_owned(),
                });
            }
        }
        let count = object.len() as u64;
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64).filter(|max| count > *max) {
            let message = format!("Too many: {count}: must have at most {max} items");
            causes.push(Cause { reason: "FieldValueTooMany", field: path.to_owned(), message });
        }
        if let Some(min) = schema.get("minProperties").and_then(Value::as_u64).filter(|min| count < *min) {
            let message = format!("Invalid value: {count}: {path} in body should have at least {min} properties");
            causes.push(Cause { reason: "FieldValueInvalid", field: path.to_owned(), message });
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        let extra = schema.get("additionalProperties").filter(|e| e.is_object());
        for (name, value) in object {
            let old = old.and_then(|o| o.get(name));
            if let Some(property) = properties.and_then(|p| p.get(name)) {
                validate(value, old, property, &child(name), causes);
            } else if let Some(extra) = extra {
                validate(value, old, extra, &format!("{path}[{name}]"), causes);
            }
        }
    }

    /// ECMA-262 patterns, as in the API server's OpenAPI validation. A pattern that does not
    /// compile checks nothing (the CRD's own tests cover its patterns).
    fn matches_pattern(pattern: &str, text: &str) -> bool {
        jsonschema::validator_for(&json!({"pattern": pattern}))
            .map(|validator| validator.is_valid(&Value::String(text.to_owned())))
            .unwrap_or(true)
    }
}

/// The body of the fake's responses: whole, or a watch's stream.
pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;

/// The tower service that `kube::Client` sends its requests to.
#[derive(Clone)]
pub struct FakeService {
    state: Arc<Mutex<State>>,
    caller: Option<Arc<str>>,
}

impl tower_service::Service<Request<Body>> for FakeService {
    type Response = Response<FakeBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (state, caller) = (self.state.clone(), self.caller.clone());
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let header =
                |name: http::header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
            let stalled = {
                let mut state = lock(&state);
                let index = state.stalls.iter().position(|m| m == parts.method);
                index.and_then(|i| state.stalls.remove(i)).is_some()
            };
            if stalled {
                std::future::pending::<()>().await;
            }
            let request = Incoming {
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query().unwrap_or(""),
                content_type: header(http::header::CONTENT_TYPE),
                metadata_only: header(http::header::ACCEPT).contains("as=PartialObjectMetadata"),
                body: &body,
                caller: caller.as_ref(),
            };
            let answer = lock(&state).handle(&request);
            let (code, body) = match answer {
                Answer::Done(code, value) => (code, Full::new(Bytes::from(value.to_string())).boxed_unsync()),
                Answer::Watch(watch) => (200, watch.into_body(state)),
            };
            let mut response = Response::new(body);
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
    use futures_util::{Stream, StreamExt};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};

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

    /// The next event of a watch; panics after 5 s or when the stream ends.
    async fn next<K>(stream: &mut (impl Stream<Item = Result<WatchEvent<K>, kube::Error>> + Unpin)) -> WatchEvent<K> {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        next.expect("an event within 5 s").expect("the watch is open").expect("a readable event")
    }

    /// `(type, name, resourceVersion)` of a ConfigMap watch event.
    fn seen(event: &WatchEvent<ConfigMap>) -> (&'static str, String, u64) {
        let (kind, object) = match event {
            WatchEvent::Added(o) => ("ADDED", o),
            WatchEvent::Modified(o) => ("MODIFIED", o),
            WatchEvent::Deleted(o) => ("DELETED", o),
            other => panic!("unexpected event {other:?}"),
        };
        let version = object.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
        (kind, object.metadata.name.clone().unwrap_or_default(), version)
    }

    #[tokio::test]
    async fn watches_send_the_changes_after_their_version_then_wait_for_more() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let ours = PatchParams::apply("operator");
        apply(&api, &ours, map("x", json!({}), json!({"app": "chat"}))).await.expect("x");
        apply(&api, &ours, map("y", json!({}), json!({"app": "other"}))).await.expect("y");
        let list = api.list(&ListParams::default().labels("app=chat")).await.expect("list");
        let listed = list.metadata.resource_version.expect("a list has a resourceVersion");
        assert_eq!(listed, fake.revision().to_string(), "the list is as new as the latest change");

        apply(&api, &ours, map("z", json!({}), json!({"app": "chat"}))).await.expect("z");
        fake.edit::<ConfigMap>("ns", "y", |m| m["data"]["a"] = json!("1"));
        api.delete("x", &DeleteParams::default()).await.expect("deleted");
        let other_namespace: Api<ConfigMap> = Api::namespaced(fake.client(), "elsewhere");
        apply(
            &other_namespace,
            &ours,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "w", "namespace": "elsewhere", "labels": {"app": "chat"}}}),
        )
        .await
        .expect("w");

        let mut watch = api.watch(&WatchParams::default().labels("app=chat"), &listed).await.expect("watch").boxed();
        let (first, second) = (seen(&next(&mut watch).await), seen(&next(&mut watch).await));
        assert_eq!((first.0, first.1.as_str()), ("ADDED", "z"));
        assert_eq!((second.0, second.1.as_str()), ("DELETED", "x"), "y is not selected, w in another namespace");
        assert!(listed.parse::<u64>().unwrap() < first.2 && first.2 < second.2, "{listed} {first:?} {second:?}");

        // Then it waits for changes.
        fake.edit::<ConfigMap>("ns", "z", |m| m["data"]["a"] = json!("1"));
        assert_eq!(seen(&next(&mut watch).await).0, "MODIFIED");
        // Labels that take an object out of the selection delete it from the watcher's view.
        fake.edit::<ConfigMap>("ns", "z", |m| m["metadata"]["labels"]["app"] = json!("other"));
        assert_eq!(seen(&next(&mut watch).await).0, "DELETED");
        fake.edit::<ConfigMap>("ns", "y", |m| m["metadata"]["labels"]["app"] = json!("chat"));
        assert_eq!(seen(&next(&mut watch).await).1, "y", "labels that bring an object in add it");

        // Across namespaces.
        let all: Api<ConfigMap> = Api::all(fake.client());
        let everything = all.list(&ListParams::default()).await.expect("list all");
        let mut names: Vec<String> = everything.items.into_iter().filter_map(|m| m.metadata.name).collect();
        names.sort();
        assert_eq!(names, ["w", "y", "z"]);
        let mut watch = all.watch(&WatchParams::default(), &listed).await.expect("watch all").boxed();
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(seen(&next(&mut watch).await).1);
        }
        assert_eq!(names, ["z", "y", "x"], "z added, y edited, x deleted");
    }

    #[tokio::test]
    async fn metadata_only_requests_get_partial_object_metadata() {
        let fake = FakeApi::new();
        let client = fake.client();
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
        apply(&api, &PatchParams::apply("operator"), map("m", json!({"big": "data"}), json!({"app": "chat"})))
            .await
            .expect("created");
        let request = kube::core::Request::new("/api/v1/namespaces/ns/configmaps");
        let list: Value = client.request(request.list_metadata(&ListParams::default()).unwrap()).await.expect("list");
        assert_eq!(
            (list["apiVersion"].as_str(), list["kind"].as_str()),
            (Some("meta.k8s.io/v1"), Some("PartialObjectMetadataList"))
        );
        let item = &list["items"][0];
        assert_eq!(item["kind"], "PartialObjectMetadata");
        assert_eq!(item["metadata"]["labels"]["app"], "chat");
        assert!(item.get("data").is_none(), "metadata only: {item}");

        let version = list["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
        let watch = request.watch_metadata(&WatchParams::default(), &version).unwrap();
        let mut events = client.request_events::<Value>(watch).await.expect("watch").boxed();
        fake.edit::<ConfigMap>("ns", "m", |m| m["data"]["big"] = json!("more"));
        let WatchEvent::Modified(object) = next(&mut events).await else { panic!("not a modification") };
        assert_eq!(object["kind"], "PartialObjectMetadata");
        assert!(object.get("data").is_none(), "metadata only: {object}");

        let one: Value = client.request(request.get_metadata("m", &Default::default()).unwrap()).await.expect("get");
        assert_eq!(
            (one["kind"].as_str(), one["metadata"]["name"].as_str()),
            (Some("PartialObjectMetadata"), Some("m"))
        );
        // The typed metadata API reads the same.
        let typed = api.get_metadata("m").await.expect("typed");
        assert_eq!(typed.metadata.labels.unwrap()["app"], "chat");
    }

    #[tokio::test]
    async fn a_watch_from_before_the_log_gets_410_expired() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        apply(&api, &PatchParams::apply("operator"), map("m", json!({}), json!({}))).await.expect("created");
        let old = fake.revision().to_string();
        fake.edit::<ConfigMap>("ns", "m", |m| m["data"]["a"] = json!("1"));
        fake.compact();
        let mut watch = api.watch(&WatchParams::default(), &old).await.expect("watch").boxed();
        match next(&mut watch).await {
            WatchEvent::Error(status) => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
            other => panic!("expected 410 Expired, got {other:?}"),
        }
        assert!(watch.next().await.is_none(), "the watch ends after the error");

        let mut watch = api.watch(&WatchParams::default(), &fake.revision().to_string()).await.expect("watch").boxed();
        fake.edit::<ConfigMap>("ns", "m", |m| m["data"]["a"] = json!("2"));
        assert_eq!(seen(&next(&mut watch).await).0, "MODIFIED", "a current version watches fine");
    }

    #[tokio::test(start_paused = true)]
    async fn watches_end_at_their_timeout_and_when_the_fake_is_dropped() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let started = tokio::time::Instant::now();
        let mut watch = api.watch(&WatchParams::default().timeout(30), "0").await.expect("watch").boxed();
        assert!(watch.next().await.is_none());
        assert_eq!(started.elapsed().as_secs(), 30, "ended at timeoutSeconds");

        let mut watch = api.watch(&WatchParams::default(), "0").await.expect("watch").boxed();
        drop(fake);
        let ended = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
        assert!(matches!(ended, Ok(None)), "a dropped fake ends its watches");
        match api.watch(&WatchParams::default(), "0").await.map(drop) {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 503),
            other => panic!("a dropped fake refuses watches, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn writes_that_change_nothing_keep_the_resource_version() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let ours = PatchParams::apply("operator");
        let first = apply(&api, &ours, map("m", json!({"a": "1"}), json!({}))).await.expect("created");
        let again = apply(&api, &ours, map("m", json!({"a": "1"}), json!({}))).await.expect("applied");
        assert_eq!(first.metadata.resource_version, again.metadata.resource_version);
        let changed = apply(&api, &ours, map("m", json!({"a": "2"}), json!({}))).await.expect("applied");
        assert_ne!(first.metadata.resource_version, changed.metadata.resource_version);
        assert_eq!(fake.revision(), 2);
    }

    mod admission {
        use kube::api::{ApiResource, DynamicObject, PostParams};

        use super::*;
        use crate::crd::ChatCluster;
        use crate::fixtures::{full, minimal};

        fn clusters(fake: &FakeApi) -> Api<DynamicObject> {
            Api::namespaced_with(fake.client(), "chat", &ApiResource::erase::<ChatCluster>(&()))
        }

        fn object(value: Value) -> DynamicObject {
            serde_json::from_value(value).unwrap()
        }

        #[tokio::test]
        async fn a_complete_cluster_loses_nothing_to_pruning() {
            let fake = FakeApi::new();
            let mut cluster = full("prod");
            cluster.status = Some(crate::crd::ChatClusterStatus {
                conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: "Running".into(),
                    message: String::new(),
                    last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ),
                    observed_generation: Some(1),
                }],
                ..Default::default()
            });
            let sent = serde_json::to_value(&cluster).unwrap();
            let api: Api<ChatCluster> = Api::namespaced(fake.client(), "chat");
            api.create(&PostParams::default(), &cluster).await.expect("a complete cluster is valid");
            let stored = fake.lock().value("/apis/chatcluster.dev/v1alpha1/namespaces/chat/chatclusters/prod").unwrap();
            let mut sent_fields = BTreeSet::new();
            fields(&sent, "", &mut sent_fields);
            for field in sent_fields.iter().filter(|f| !f.starts_with("metadata.")) {
                assert_eq!(at(&stored, field), at(&sent, field), "{field}");
            }
            assert_eq!(stored["status"], sent["status"], "server fields are kept too");
        }

        #[tokio::test]
        async fn unknown_fields_are_pruned_and_unchanged_invalid_values_ratchet() {
            let fake = FakeApi::new();
            let api = clusters(&fake);
            let mut cluster = serde_json::to_value(minimal("old")).unwrap();
            cluster["spec"]["bogus"] = json!(1);
            cluster["spec"]["service"]["extra"] = json!("x");
            let created = api.create(&PostParams::default(), &object(cluster)).await.expect("created");
            assert!(
                created.data["spec"].get("bogus").is_none() && created.data["spec"]["service"].get("extra").is_none()
            );

            // Stored before the schema said otherwise (no admission): still writable.
            let mut invalid = minimal("legacy");
            invalid.spec.replicas = 5000;
            fake.put(&invalid);
            let image = json!({"spec": {"image": "chat:2"}});
            api.patch("legacy", &PatchParams::default(), &Patch::Merge(&image)).await.expect("replicas did not change");
            let replicas = json!({"spec": {"replicas": 4000}});
            let refused = api.patch("legacy", &PatchParams::default(), &Patch::Merge(&replicas)).await;
            assert!(matches!(refused, Err(kube::Error::Api(s)) if s.code == 422), "a changed invalid value is checked");
        }

        #[tokio::test]
        async fn refused_applies_leave_field_owners_as_they_were() {
            let fake = FakeApi::new();
            let api = clusters(&fake);
            let ours = PatchParams::apply("operator");
            let cluster = serde_json::to_value(minimal("c")).unwrap();
            api.patch("c", &ours, &Patch::Apply(&cluster)).await.expect("created");
            let before = fake.owned_fields::<ChatCluster>("chat", "c", "operator");
            let mut bad = cluster.clone();
            bad["spec"] = json!({"replicas": -1, "config": cluster["spec"]["config"].clone()});
            let refused = api.patch("c", &ours, &Patch::Apply(&bad)).await;
            assert!(matches!(refused, Err(kube::Error::Api(s)) if s.code == 422));
            assert_eq!(fake.owned_fields::<ChatCluster>("chat", "c", "operator"), before);
        }
    }
}
