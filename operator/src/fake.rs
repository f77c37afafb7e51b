//! An in-process fake Kubernetes API server (a tower service behind a real `kube::Client`) for
//! tests and the benchmark: stores objects as JSON, applies, creates, replaces with
//! resourceVersion checks, deletes, records requests and injects failures.

use std::collections::{BTreeMap, VecDeque};
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
    revision: u64,
    auto_ready: bool,
}

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
        let stored = state.write(&key, value, None);
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
        let stored = state.write(&key, new, Some(&old));
        state.insert(key, &stored);
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
        self.lock().objects.remove(&object_path::<K>(ns, name)).is_some()
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
    sts["status"] = json!({
        "observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
        "updatedReplicas": replicas, "currentReplicas": replicas, "availableReplicas": replicas,
        "currentRevision": revision, "updateRevision": revision,
    });
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

    fn handle(&mut self, method: &Method, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
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
                let prefix = format!("{key}/");
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, _)| k.strip_prefix(&prefix).is_some_and(|rest| !rest.contains('/')))
                    .filter_map(|(_, t)| serde_json::from_str(t).ok())
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
                let stored = self.write(&key, new, None);
                self.insert(key, &stored);
                (201, stored)
            }
            Method::PUT => {
                let Some(old) = existing else { return not_found(&key) };
                if parsed["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                    return status(409, "the object has been modified");
                }
                self.store(key, parsed, Some(&old))
            }
            Method::PATCH if subresource => {
                let Some(old) = existing else { return not_found(&key) };
                let mut new = old.clone();
                new["status"] = parsed["status"].clone();
                self.store(key, new, Some(&old))
            }
            Method::PATCH if content_type.starts_with("application/apply-patch") => {
                let mut new = parsed;
                if let Some(status) = existing.as_ref().and_then(|o| o.get("status")) {
                    new["status"] = status.clone();
                }
                self.store(key, new, existing.as_ref())
            }
            Method::PATCH => {
                let Some(old) = existing else { return not_found(&key) };
                let mut new = old.clone();
                merge(&mut new, &parsed);
                self.store(key, new, Some(&old))
            }
            Method::DELETE => match self.objects.remove(&key) {
                Some(old) => (200, serde_json::from_str(&old).unwrap_or(Value::Null)),
                None => not_found(&key),
            },
            _ => status(405, "method not supported by the fake"),
        }
    }

    fn store(&mut self, key: String, new: Value, old: Option<&Value>) -> (u16, Value) {
        let stored = self.write(&key, new, old);
        self.insert(key, &stored);
        (200, stored)
    }
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
            let (code, value) = {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                state.handle(&parts.method, parts.uri.path(), content_type, &body)
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
