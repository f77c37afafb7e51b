//! The Argo CD health script (docs/argocd-health.lua) maps conditions as documented. Needs a Lua
//! 5.3+ interpreter (`lua5.4` or `lua`); without one the test fails and says to install it.

use std::process::Command;

const CASES: &str = r#"
local script = assert(io.open(arg[1])):read("a")
local function health(o) obj = o; return load(script)().status end
local function c(t, s, r) return { type = t, status = s, reason = r, message = "m" } end
local function check(expected, o)
  local got = health(o)
  if got ~= expected then error("expected " .. expected .. ", got " .. got) end
end
check("Progressing", { metadata = { generation = 1 } })
check("Suspended", { metadata = { generation = 1, annotations = { ["chatcluster.dev/paused"] = "true" } } })
local done = { c("Available", "True", "ReplicasReady"), c("Progressing", "False", "RolloutComplete"),
  c("Degraded", "False", "AsExpected") }
check("Healthy", { metadata = { generation = 2 }, status = { observedGeneration = 2, conditions = done } })
check("Progressing", { metadata = { generation = 3 }, status = { observedGeneration = 2, conditions = done } })
check("Degraded", { metadata = { generation = 2 },
  status = { observedGeneration = 2, conditions = { c("Degraded", "True", "SecretNotFound") } } })
check("Progressing", { metadata = { generation = 2 }, status = { observedGeneration = 2,
  conditions = { c("Available", "True", "ReplicasReady"), c("Progressing", "True", "RollingUpdate") } } })
check("Suspended", { metadata = { generation = 2 }, status = { observedGeneration = 2,
  conditions = { c("Available", "True", "ReplicasReady"), c("Progressing", "False", "Paused") } } })
check("Progressing", { metadata = { generation = 2 }, status = { observedGeneration = 2,
  conditions = { c("Available", "False", "NoReplicasReady"), c("Progressing", "False", "RolloutComplete") } } })
print("ok")
"#;

#[test]
fn health_script_maps_conditions() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/argocd-health.lua");
    let dir = tempfile::tempdir().unwrap();
    let driver = dir.path().join("cases.lua");
    std::fs::write(&driver, CASES).unwrap();
    let Some(output) =
        ["lua5.4", "lua5.3", "lua"].iter().find_map(|lua| Command::new(lua).arg(&driver).arg(script).output().ok())
    else {
        // Not a pass: the suite needs Lua (.ci/run installs lua5.4), like it needs Chromium.
        panic!("no Lua interpreter found (lua5.4, lua5.3 or lua): install lua5.4 to run this test");
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
}
