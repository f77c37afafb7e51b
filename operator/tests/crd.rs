//! The committed CRD matches the generated one, the schema is structural, and every example
//! validates against it and renders a valid node config.

use std::path::PathBuf;

use chat_operator::crd::{ChatCluster, crd_yaml};
use chat_operator::reconcile::validate::render_config;
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crd_matches_generated() {
    let committed = std::fs::read_to_string(repo().join("crds/chatcluster.yaml")).unwrap_or_default();
    assert!(
        committed == crd_yaml().unwrap(),
        "crds/chatcluster.yaml is stale; regenerate it with:\n  cargo run -p chat-operator -- crd > crds/chatcluster.yaml"
    );
}

fn schema() -> Value {
    let crd = serde_json::to_value(chat_operator::crd::definition()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// What the API server rejects in a structural schema, checked node by node.
fn assert_structural(node: &Value, path: &str) {
    let Some(o) = node.as_object() else { return };
    for banned in ["$ref", "definitions", "$defs", "$schema", "const"] {
        assert!(!o.contains_key(banned), "{path}: {banned} is not allowed in a CRD schema");
    }
    let int_or_string = o.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = o.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !int_or_string && !preserve && !path.is_empty() {
        assert!(o.contains_key("type"), "{path}: every node needs a type");
    }
    if let Some(props) = o.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            assert_structural(v, &format!("{path}.{k}"));
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = o.get(key) {
            assert_structural(sub, &format!("{path}[{key}]"));
        }
    }
}

#[test]
fn schema_is_structural() {
    assert_structural(&schema(), "");
    let text = schema().to_string();
    assert!(!text.contains("\"format\":\"uint"), "Rust-only formats must be dropped");
}

#[test]
fn examples_validate_against_the_schema_and_render() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let dir = repo().join("examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // A manifest may carry the Secrets its ChatCluster references: check the ChatCluster.
        let documents: Vec<Value> = serde_norway::Deserializer::from_str(&text)
            .map(|document| Value::deserialize(document).unwrap())
            .filter(|document| document["kind"] == "ChatCluster")
            .collect();
        let [value] = documents.as_slice() else { panic!("{}: one ChatCluster expected", path.display()) };
        let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{}: {e}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        let cluster: ChatCluster = serde_json::from_value(value.clone()).unwrap();
        let config = render_config(&cluster, "x-peers.default.svc.cluster.local")
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(config.cluster.enabled(), "{}: peers are found through DNS", path.display());
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    assert_eq!(seen, ["custom-assets.yaml", "minimal.yaml", "production.yaml", "server-api.yaml"]);
}

#[test]
fn schema_rejects_out_of_range_values() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let bad = serde_json::json!({
        "apiVersion": "chatcluster.dev/v1alpha1", "kind": "ChatCluster", "metadata": {"name": "x"},
        "spec": {"replicas": -1, "service": {"type": "Headless"}, "config": {"auth": {"mode": "open"}}}
    });
    let errors: Vec<String> = validator.iter_errors(&bad).map(|e| e.instance_path().to_string()).collect();
    for path in ["/spec/replicas", "/spec/service/type", "/spec/config/auth/mode"] {
        assert!(errors.iter().any(|e| e == path), "{path} not rejected: {errors:?}");
    }
}

#[test]
fn conditions_merge_by_type() {
    let conditions = &schema()["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], serde_json::json!(["type"]));
    let required = conditions["items"]["required"].as_array().cloned().unwrap_or_default();
    assert!(required.contains(&serde_json::json!("type")), "a map key must be required: {required:?}");
}

/// kubectl's client-side validation refuses `null` inside `enum` (`unknown object type "nil"`),
/// so `kubectl apply -f crds/chatcluster.yaml` would fail on API servers without field validation.
#[test]
fn no_enum_lists_null() {
    fn walk(node: &Value, path: &str, found: &mut Vec<String>) {
        match node {
            Value::Object(o) => {
                if o.get("enum").and_then(Value::as_array).is_some_and(|values| values.contains(&Value::Null)) {
                    found.push(path.to_owned());
                }
                for (k, v) in o {
                    walk(v, &format!("{path}.{k}"), found);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, path, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(&schema(), "", &mut found);
    assert!(found.is_empty(), "null in enum at {found:?}");
    let committed: Value =
        serde_norway::from_str(&std::fs::read_to_string(repo().join("crds/chatcluster.yaml")).unwrap()).unwrap();
    walk(&committed, "", &mut found);
    assert!(found.is_empty(), "null in enum in crds/chatcluster.yaml at {found:?}");
}

/// Defaults in the schema are written into stored objects by the API server and never move
/// again: the image and the node config must come from the running operator instead.
#[test]
fn the_image_and_the_node_config_have_no_schema_defaults() {
    fn defaults(node: &Value, path: &str, found: &mut Vec<String>) {
        let Some(o) = node.as_object() else { return };
        if o.contains_key("default") {
            found.push(path.to_owned());
        }
        for (k, v) in o.get("properties").and_then(Value::as_object).into_iter().flatten() {
            defaults(v, &format!("{path}.{k}"), found);
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = o.get(key) {
                defaults(sub, &format!("{path}[]"), found);
            }
        }
    }
    let spec = &schema()["properties"]["spec"]["properties"];
    let mut found = Vec::new();
    defaults(&spec["image"], "spec.image", &mut found);
    defaults(&spec["config"], "spec.config", &mut found);
    assert!(found.is_empty(), "schema defaults at {found:?}");
    assert!(spec["replicas"].get("default").is_some(), "other defaults stay");
}
