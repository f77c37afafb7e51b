//! The committed ChatCluster reference matches the one generated from the CRD, and every field in
//! it is documented.

use std::path::PathBuf;

use chat_operator::reference::{REGENERATE, markdown};

fn committed() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/chatcluster-reference.md");
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn committed_reference_matches_generated() {
    let generated = markdown().expect("the reference renders");
    assert!(committed() == generated, "docs/chatcluster-reference.md is stale; regenerate it with:\n  {REGENERATE}");
}

/// The rows of the tables: `(path, type, default, allowed, description)`.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            // Escaped pipes are inside cells; split on the others.
            let cells = l.replace("\\|", "\u{0}");
            cells.trim_matches('|').split('|').map(|c| c.trim().replace('\u{0}', "|")).collect()
        })
        .collect()
}

#[test]
fn every_field_has_a_description() {
    let text = markdown().expect("the reference renders");
    let rows = rows(&text);
    assert!(rows.len() > 40, "{} rows", rows.len());
    for row in &rows {
        assert_eq!(row.len(), 5, "{row:?}");
        assert_ne!(row[4], "—", "{} has no description: add a doc comment in operator/src/crd.rs", row[0]);
    }
}

#[test]
fn expands_own_types_but_not_the_node_config_or_kubernetes_types() {
    let text = markdown().expect("the reference renders");
    let paths: Vec<String> = rows(&text).into_iter().map(|r| r[0].trim_matches('`').to_owned()).collect();
    for path in
        ["spec.drain.deadlineSeconds", "spec.auth.jwtSecretRef.key", "spec.auth.rooms[].pattern", "status.phase"]
    {
        assert!(paths.iter().any(|p| p == path), "{path} missing");
    }
    assert!(paths.iter().any(|p| p == "spec.config"));
    assert!(!paths.iter().any(|p| p.starts_with("spec.config.")), "spec.config is expanded");
    assert!(!paths.iter().any(|p| p.starts_with("spec.pod.affinity.")), "Kubernetes types are expanded");
    assert!(text.contains("[configuration.md](configuration.md)"));
    let drain = rows(&text).into_iter().find(|r| r[0] == "`spec.drain.lbGraceSeconds`").expect("drain row");
    assert_eq!(drain[1..4], ["integer", "`5`", "0 to 600"]);
}
