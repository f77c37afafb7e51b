#!/usr/bin/env python3
"""Lints the Helm chart with real Helm, renders it, and validates every manifest of the repository
against the Kubernetes schemas. Run through scripts/lint-chart.sh, which sets up the venv.

Helm is helm-sdkpy (PyPI), which embeds Helm v4's Go library. It exposes `lint` (which reports
severities and paths but loses the messages' text) and `install`, but no `template`. Manifests are
therefore rendered by a real `helm install` into a fake Kubernetes API served on loopback by this
script: it answers discovery, version and lookups, stores what Helm creates, and nothing else;
release records stay in memory (HELM_DRIVER=memory). That install also runs Helm's values schema
validation, installs the chart's crds/ first (the ChatCluster kind is only discoverable after
Helm created the CRD) and renders NOTES.txt.

Validation is kubernetes-validate (PyPI), whose schemas ship inside the wheel (nothing is fetched),
in strict mode (unknown fields are errors), against the oldest and the newest Kubernetes version
the chart supports. It cannot know CRD-defined kinds: ChatClusters are validated against the
openAPIV3Schema of crds/chatcluster.yaml instead, and the Prometheus Operator's kinds are
skipped and reported as such. The alerts (files/alerts.yaml, the PrometheusRule's spec) go through
`promtool check rules` and `promtool test rules` (Debian's prometheus package); the PodMonitor
and the dashboard are checked against the pods the operator builds.

Exit status 0 only when every check passed; every failure is printed with what failed and why.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_sdkpy
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "chatcluster-operator"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
CRD = REPO / "crds" / "chatcluster.yaml"
NAMESPACE = "chat-system"
RELEASE = "chat"
# The chart's kubeVersion floor and the newest version kubernetes-validate ships.
K8S_VERSIONS = ["1.29", "1.37"]
FAKE_SERVER_VERSION = {"major": "1", "minor": "34", "gitVersion": "v1.34.0", "platform": "linux/amd64"}
# Kinds kubernetes-validate has no schema for, and why.
NOT_UPSTREAM = {
    ("chatcluster.dev/v1alpha1", "ChatCluster"): "a custom resource: validated against the CRD's schema instead",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD, not in the upstream Kubernetes schemas",
    ("monitoring.coreos.com/v1", "PodMonitor"): "Prometheus Operator CRD, not in the upstream Kubernetes schemas",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "Prometheus Operator CRD: its rules are checked by promtool instead",
}

failures: list[str] = []
passes = 0


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"FAIL {msg}")


def ok(msg: str) -> None:
    global passes
    passes += 1
    print(f"ok   {msg}")


# ---------------------------------------------------------------------------------------------
# A fake Kubernetes API, just enough for `helm install`.

BUILTIN = {
    # group, version: [(plural, kind, namespaced)]
    ("", "v1"): [
        ("namespaces", "Namespace", False),
        ("services", "Service", True),
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("events", "Event", True),
    ],
    ("apps", "v1"): [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    ("rbac.authorization.k8s.io", "v1"): [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    ("networking.k8s.io", "v1"): [("networkpolicies", "NetworkPolicy", True)],
    ("coordination.k8s.io", "v1"): [("leases", "Lease", True)],
    ("events.k8s.io", "v1"): [("events", "Event", True)],
    ("autoscaling", "v2"): [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    ("apiextensions.k8s.io", "v1"): [("customresourcedefinitions", "CustomResourceDefinition", False)],
    # As in a cluster with the Prometheus Operator installed.
    ("monitoring.coreos.com", "v1"): [("servicemonitors", "ServiceMonitor", True), ("podmonitors", "PodMonitor", True),
                                      ("prometheusrules", "PrometheusRule", True)],
}


class FakeApi:
    def __init__(self) -> None:
        self.resources = {k: list(v) for k, v in BUILTIN.items()}
        self.objects: dict[str, dict] = {}
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                code, body = api.get(self.path.split("?", 1)[0])
                self.send(code, body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                code, out = api.create(self.path.split("?", 1)[0], body)
                self.send(code, out)

            def do_PUT(self):
                self.send(405, status(405, "MethodNotAllowed", "the fake API only creates"))

            do_PATCH = do_DELETE = do_PUT

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
                "users": [{"name": "fake", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
                "current-context": "fake",
            }
        )

    def reset(self) -> None:
        with self.lock:
            self.resources = {k: list(v) for k, v in BUILTIN.items()}
            self.objects.clear()

    def resource_list(self, group: str, version: str) -> dict | None:
        rs = self.resources.get((group, version))
        if rs is None:
            return None
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [
                {
                    "name": plural,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }
                for plural, kind, namespaced in rs
            ],
        }

    def get(self, path: str) -> tuple[int, dict]:
        with self.lock:
            if path == "/version":
                return 200, FAKE_SERVER_VERSION
            if path == "/api":
                return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
            if path == "/apis":
                groups: dict[str, list[str]] = {}
                for g, v in self.resources:
                    if g:
                        groups.setdefault(g, []).append(v)
                return 200, {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                            "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                        }
                        for g, vs in sorted(groups.items())
                    ],
                }
            m = re.fullmatch(r"/api/(v1)", path) or re.fullmatch(r"/apis/([^/]+)/([^/]+)", path)
            if m:
                group, version = ("", m.group(1)) if path.startswith("/api/") else (m.group(1), m.group(2))
                rl = self.resource_list(group, version)
                if rl is not None:
                    return 200, rl
            if path in self.objects:
                return 200, self.objects[path]
            return 404, status(404, "NotFound", f"{path} not found")

    def create(self, path: str, obj: dict) -> tuple[int, dict]:
        with self.lock:
            name = obj.get("metadata", {}).get("name")
            key = f"{path}/{name}"
            if key in self.objects:
                return 409, status(409, "AlreadyExists", f"{key} already exists")
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta.update(uid=f"uid-{len(self.objects)}", resourceVersion="1", creationTimestamp="2026-01-01T00:00:00Z")
            self.objects[key] = obj
            if obj.get("kind") == "CustomResourceDefinition":
                spec = obj["spec"]
                for v in spec["versions"]:
                    if v.get("served", True):
                        self.resources.setdefault((spec["group"], v["name"]), []).append(
                            (spec["names"]["plural"], spec["names"]["kind"], spec["scope"] == "Namespaced")
                        )
                obj["status"] = {
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True"},
                        {"type": "Established", "status": "True"},
                    ],
                    "acceptedNames": spec["names"],
                }
            return 201, obj

    def created_kinds(self) -> list[str]:
        return sorted(f"{o.get('kind')}/{o['metadata']['name']}" for o in self.objects.values())


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


# ---------------------------------------------------------------------------------------------
# Helm

def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def lint(config: helm_sdkpy.Configuration, chart: Path, label: str) -> None:
    result = asyncio.run(helm_sdkpy.Lint(config).run(str(chart)))
    messages = result.get("Messages") or []
    bad = [m for m in messages if m.get("Severity", 0) >= 2]
    for m in messages:
        print(f"     helm lint ({label}): {SEVERITY.get(m.get('Severity'), m.get('Severity'))} in {m.get('Path')}")
    if bad or result.get("Errors"):
        # helm-sdkpy serialises the messages' errors as {}: the text is lost. The render step
        # below repeats the rendering with Helm's full error message.
        fail(f"helm lint ({label}): {len(bad)} warning(s)/error(s) (paths above; see the render step for the text)")
    else:
        ok(f"helm lint ({label}): {result.get('TotalChartsLinted')} chart, no warnings or errors")


def install(api: FakeApi, values: dict) -> dict:
    """A fresh `helm install` into an empty fake cluster (a new configuration: a new memory store)."""
    api.reset()
    config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=api.kubeconfig())
    return asyncio.run(
        helm_sdkpy.Install(config).run(RELEASE, str(CHART), values=values or None, wait=False, timeout=60)
    )


def render(api: FakeApi, label: str, values: dict) -> list[tuple[str, dict]] | None:
    try:
        rel = install(api, values)
    except helm_sdkpy.HelmError as e:
        fail(f"helm install ({label}) into the fake API: {e}")
        return None
    docs = []
    for chunk in re.split(r"^---\s*$", rel.get("manifest", ""), flags=re.M):
        m = re.search(r"^# Source: (.+)$", chunk, flags=re.M)
        obj = yaml.safe_load(chunk)
        if obj:
            docs.append((m.group(1) if m else "?", obj))
    created = api.created_kinds()
    crds = [k for k in created if k.startswith("CustomResourceDefinition/")]
    if crds != ["CustomResourceDefinition/chatclusters.chatcluster.dev"]:
        fail(f"helm install ({label}) did not install the chart's CRD from crds/ (created: {crds})")
    if len(created) - len(crds) != len(docs):
        fail(f"helm install ({label}): the manifest has {len(docs)} objects but the fake API received "
             f"{len(created) - len(crds)}: {created}")
    notes = (rel.get("info") or {}).get("notes", "")
    dump = os.environ.get("CHART_LINT_DUMP")
    if dump:
        out = Path(dump) / re.sub(r"[^A-Za-z0-9.=-]+", "_", label)
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.yaml").write_text(rel.get("manifest", ""))
        (out / "NOTES.txt").write_text(notes)
    if not notes.strip():
        fail(f"helm install ({label}): NOTES.txt rendered empty")
    kinds = ", ".join(sorted({o["kind"] for _, o in docs}))
    ok(f"helm install ({label}): {len(docs)} objects rendered and accepted by the fake API ({kinds}); "
       f"CRD from crds/ installed first; NOTES.txt {len(notes.splitlines())} lines")
    return docs


def expect_render_error(api: FakeApi, label: str, values: dict, pattern: str) -> None:
    try:
        install(api, values)
    except helm_sdkpy.HelmError as e:
        if re.search(pattern, str(e)):
            ok(f"rejected as expected ({label}): {first_line(str(e))}")
        else:
            fail(f"{label}: rejected, but not with /{pattern}/: {e}")
        return
    fail(f"{label}: Helm accepted values it must reject")


def first_line(s: str) -> str:
    s = " ".join(s.split())
    return s if len(s) < 220 else s[:217] + "..."


# ---------------------------------------------------------------------------------------------
# Checks on what was rendered

def by_kind(docs: list[tuple[str, dict]], kind: str) -> list[dict]:
    return [o for _, o in docs if o["kind"] == kind]


def documented_rbac() -> dict[str, set[tuple[str, str, str]]]:
    """Rules of the two tables under '## RBAC' in docs/operator.md: {table: {(group, resource, verb)}}."""
    text = (REPO / "docs" / "operator.md").read_text()
    section = text.split("## RBAC", 1)[1].split("\n## ", 1)[0]
    tables: list[set] = []
    current: set | None = None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3:
            current = None
            continue
        if cells[0] == "API group" or set(cells[0]) <= {"-", " "}:
            if current is None:
                current = set()
                tables.append(current)
            continue
        group = cells[0].strip("`").replace('""', "")
        resource = cells[1].strip("`")
        for verb in cells[2].split(","):
            current.add((group, resource, verb.strip()))
    if len(tables) != 2:
        raise SystemExit(f"docs/operator.md: expected 2 RBAC tables, found {len(tables)}")
    return {"cluster": tables[0], "leader": tables[1]}


def rendered_rules(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role.get("rules", []):
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    out.add((g, r, v))
    return out


def check_rbac(label: str, docs: list[tuple[str, dict]], namespaced: bool) -> None:
    want = documented_rbac()
    kind = "Role" if namespaced else "ClusterRole"
    aggregate = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith(("-aggregate-view", "-aggregate-edit"))]
    check_aggregate_roles(label, aggregate)
    main = [r for r in by_kind(docs, kind)
            if not r["metadata"]["name"].endswith(("-leader-election", "-aggregate-view", "-aggregate-edit"))]
    leader = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    if len(main) != 1 or len(leader) != 1:
        fail(f"{label}: expected one {kind} and one leader-election Role, got {len(main)} and {len(leader)}")
        return
    for name, role, expected in (("operator " + kind, main[0], want["cluster"]), ("leader Role", leader[0], want["leader"])):
        got = rendered_rules(role)
        if got != expected:
            fail(f"{label}: {name} differs from docs/operator.md: extra {sorted(got - expected)}, "
                 f"missing {sorted(expected - got)}")
        else:
            ok(f"{label}: {name} grants exactly the {len(expected)} (group, resource, verb) of docs/operator.md")


def check_aggregate_roles(label: str, roles: list[dict]) -> None:
    """The view role only reads; every aggregated rule is about ChatClusters; each role carries the
    labels that put it into the built-in roles."""
    if len(roles) != 2:
        fail(f"{label}: expected the two aggregated ClusterRoles (view, edit), got {len(roles)}")
        return
    for role in roles:
        name = role["metadata"]["name"]
        labels = role["metadata"].get("labels", {})
        wanted = ["edit", "admin"] + (["view"] if name.endswith("-aggregate-view") else [])
        missing = [w for w in wanted if labels.get(f"rbac.authorization.k8s.io/aggregate-to-{w}") != "true"]
        rules = rendered_rules(role)
        foreign = sorted(r for r in rules if r[0] != "chatcluster.dev")
        writes = sorted(r for r in rules if r[2] not in ("get", "list", "watch"))
        if missing or foreign or (name.endswith("-aggregate-view") and writes):
            fail(f"{label}: {name}: missing aggregation labels {missing}, rules outside chatcluster.dev {foreign}, "
                 f"writes in the view role {writes if name.endswith('-aggregate-view') else []}")
        else:
            ok(f"{label}: {name} aggregates {len(rules)} ChatCluster permissions into {', '.join(wanted)}")


def check_deployment(label: str, docs: list[tuple[str, dict]], replicas: int, leader: bool) -> None:
    deps = by_kind(docs, "Deployment")
    if len(deps) != 1:
        fail(f"{label}: expected one Deployment, got {len(deps)}")
        return
    dep = deps[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    psc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
    env = {e["name"]: e for e in c.get("env", [])}
    args = c.get("args", [])
    problems = []
    if dep["spec"]["replicas"] != replicas:
        problems.append(f"replicas {dep['spec']['replicas']} != {replicas}")
    if not (psc.get("runAsNonRoot") and psc.get("runAsUser") == 65532):
        problems.append("pod must run as non-root uid 65532")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccomp must be RuntimeDefault")
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
        problems.append("container needs readOnlyRootFilesystem and no privilege escalation")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("container must drop ALL capabilities")
    if not c.get("resources", {}).get("requests"):
        problems.append("container needs resource requests")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problems.append("liveness probe must be /healthz")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("readiness probe must be /readyz")
    for var in ("POD_NAME", "POD_NAMESPACE"):
        if "fieldRef" not in env.get(var, {}).get("valueFrom", {}):
            problems.append(f"{var} must come from the downward API")
    if leader == ("--no-leader-election" in args):
        problems.append(f"leader election {'on' if leader else 'off'} but args are {args}")
    strategy = dep["spec"]["strategy"]["type"]
    if strategy != ("RollingUpdate" if leader else "Recreate"):
        problems.append(f"strategy {strategy} with leader election {'on' if leader else 'off'}")
    if problems:
        fail(f"{label}: Deployment: " + "; ".join(problems))
    else:
        ok(f"{label}: Deployment: {replicas} replica(s), leader election {'on' if leader else 'off'} "
           f"({strategy}), uid 65532 non-root, read-only root fs, no capabilities, RuntimeDefault seccomp, "
           f"/healthz and /readyz probes")


# ---------------------------------------------------------------------------------------------
# Monitoring of the chat nodes

def built_statefulset() -> dict | None:
    """The StatefulSet the operator builds, from its builder snapshot."""
    for path in sorted((REPO / "operator" / "tests" / "snapshots").glob("builders__*.snap")):
        for _, obj in load_snapshot(path):
            if obj.get("kind") == "StatefulSet":
                return obj
    fail("operator/tests/snapshots: no StatefulSet snapshot to check the PodMonitor against")
    return None


def check_monitoring(label: str, docs: list[tuple[str, dict]], values: dict) -> None:
    """The PodMonitor selects the pods the operator builds, on their admin port, in the watched
    namespace; the PrometheusRule carries files/alerts.yaml; the dashboard ConfigMap
    files/dashboard.json, with the sidecar's label."""
    problems = []
    sts = built_statefulset()
    monitors = by_kind(docs, "PodMonitor")
    if sts and len(monitors) == 1:
        spec = monitors[0]["spec"]
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        selector = spec["selector"]["matchLabels"]
        if any(pod_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"PodMonitor selector {selector} does not match the built pods' labels {pod_labels}")
        ports = {p.get("name") for c in sts["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in spec["podMetricsEndpoints"]:
            if endpoint["port"] not in ports:
                problems.append(f"PodMonitor scrapes port {endpoint['port']!r}, the pods have {sorted(ports)}")
        if spec["namespaceSelector"] != {"matchNames": [values["watchNamespace"]]}:
            problems.append(f"PodMonitor namespaces {spec['namespaceSelector']} != the watched namespace")
    elif sts:
        problems.append(f"expected one PodMonitor, got {len(monitors)}")
    rules = by_kind(docs, "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    if len(rules) != 1 or rules[0]["spec"] != alerts:
        problems.append("the PrometheusRule's spec is not files/alerts.yaml")
    dashboards = [o for o in by_kind(docs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    wanted = values["metrics"]["grafanaDashboard"]
    if len(dashboards) != 1:
        problems.append(f"expected one dashboard ConfigMap, got {len(dashboards)}")
    else:
        cm = dashboards[0]
        shipped = json.loads((CHART / "files" / "dashboard.json").read_text())
        if json.loads(cm["data"]["chatcluster.json"]) != shipped:
            problems.append("the dashboard ConfigMap does not carry files/dashboard.json")
        if cm["metadata"]["namespace"] != wanted["namespace"] or any(
                cm["metadata"]["labels"].get(k) != v for k, v in wanted["labels"].items()):
            problems.append(f"the dashboard ConfigMap's namespace/labels {cm['metadata']} differ from the values")
    if problems:
        fail(f"{label}: monitoring: " + "; ".join(problems))
    else:
        ok(f"{label}: PodMonitor selects the built pods on their admin port in {values['watchNamespace']}; "
           f"PrometheusRule = files/alerts.yaml; dashboard ConfigMap = files/dashboard.json")


def check_alerts() -> None:
    """promtool parses the alerts and runs their unit tests (ci/alerts-test.yaml)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        fail("promtool not found: install Debian's prometheus package (.ci/run does)")
        return
    for args in (["check", "rules", "files/alerts.yaml"], ["test", "rules", "ci/alerts-test.yaml"]):
        run = subprocess.run([promtool, *args], cwd=CHART, capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"promtool {' '.join(args)}: {(run.stdout + run.stderr).strip()}")
        else:
            ok(f"promtool {' '.join(args)}")


# ---------------------------------------------------------------------------------------------
# Schema validation

def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate_objects(label: str, objects: list[tuple[str, dict]], skipped: list[str], counts: dict[str, int]) -> None:
    """Validates each object, counting the valid ones by what they were checked against."""
    cr_validator = jsonschema.Draft7Validator(crd_schema())
    for source, obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        what = f"{source}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if key == ("chatcluster.dev/v1alpha1", "ChatCluster"):
            errors = sorted(cr_validator.iter_errors(obj), key=lambda e: list(e.path))
            for e in errors:
                fail(f"{label}: {what}: against the CRD schema: {'/'.join(map(str, e.path))}: {e.message}")
            if not errors:
                counts["crd"] += 1
            continue
        if key in NOT_UPSTREAM:
            skipped.append(f"{what}: skipped ({NOT_UPSTREAM[key]})")
            continue
        good = True
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                good = False
                fail(f"{label}: {what}: Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                good = False
                fail(f"{label}: {what}: {e.message}")
        counts["k8s"] += good


def load_file(path: Path) -> list[tuple[str, dict]]:
    rel = path.relative_to(REPO)
    return [(str(rel), d) for d in yaml.safe_load_all(path.read_text()) if d]


def load_snapshot(path: Path) -> list[tuple[str, dict]]:
    """The object of an insta snapshot: the document after the `source`/`expression` header."""
    rel = path.relative_to(REPO)
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    objects = [(str(rel), d) for d in docs if isinstance(d, dict) and "apiVersion" in d]
    if not objects:
        fail(f"{rel}: holds no Kubernetes object")
    return objects


# ---------------------------------------------------------------------------------------------
# Documentation

def schema_leaves(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        if key == "global" and not prefix:
            continue
        if sub.get("type") == "object" and sub.get("additionalProperties") is False and "properties" in sub:
            out += schema_leaves(sub, path + ".")
        else:
            out.append(path)
    return out


def check_docs_values_table() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = set(schema_leaves(schema))
    doc = REPO / "docs" / "helm.md"
    if not doc.exists():
        fail("docs/helm.md is missing")
        return
    text = doc.read_text()
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", text, flags=re.M))
    if leaves != documented:
        fail(f"docs/helm.md values table vs values.schema.json: undocumented {sorted(leaves - documented)}, "
             f"not in the schema {sorted(documented - leaves)}")
    else:
        ok(f"docs/helm.md documents exactly the {len(leaves)} values of values.schema.json")


def docs_argocd_cm() -> list[tuple[str, dict]]:
    """The argocd-cm ConfigMap shown in docs/helm.md, checked to carry docs/argocd-health.lua verbatim."""
    doc = REPO / "docs" / "helm.md"
    if not doc.exists():
        return []
    blocks = [b for b in re.findall(r"^```yaml\n(.*?)^```", doc.read_text(), flags=re.M | re.S) if "name: argocd-cm" in b]
    if len(blocks) != 1:
        fail(f"docs/helm.md: expected one argocd-cm ConfigMap block, found {len(blocks)}")
        return []
    cm = yaml.safe_load(blocks[0])
    shown = cm.get("data", {}).get("resource.customizations.health.chatcluster.dev_ChatCluster")
    if shown != (REPO / "docs" / "argocd-health.lua").read_text():
        fail("docs/helm.md: the argocd-cm health check differs from docs/argocd-health.lua")
    else:
        ok("docs/helm.md: the argocd-cm health check is docs/argocd-health.lua verbatim")
    return [("docs/helm.md (argocd-cm block)", cm)]


def main() -> int:
    if os.environ.get("HELM_DRIVER") != "memory":
        raise SystemExit("run me through scripts/lint-chart.sh (HELM_DRIVER=memory must be set before Helm loads)")
    print(f"helm-sdkpy {helm_sdkpy.__version__} ({helm_sdkpy.get_version()}), "
          f"kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else '?'}, "
          f"Kubernetes schemas {', '.join(K8S_VERSIONS)} (strict)")

    # 1. The chart ships the repository's CRD unchanged.
    if (CHART / "crds" / "chatcluster.yaml").read_bytes() != CRD.read_bytes():
        fail("charts/chatcluster-operator/crds/chatcluster.yaml differs from crds/chatcluster.yaml; "
             "copy it: cp crds/chatcluster.yaml charts/chatcluster-operator/crds/")
    else:
        ok("charts/chatcluster-operator/crds/chatcluster.yaml is identical to crds/chatcluster.yaml")

    api = FakeApi()
    config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=api.kubeconfig())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    all_on = yaml.safe_load(ALL_ON.read_text())

    # 2. helm lint, with the default values and with every option on (lint takes no values
    # here, so a copy of the chart gets the merged values as its values.yaml).
    lint(config, CHART, "default values")
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = Path(tmp) / CHART.name
        shutil.copytree(CHART, copy_dir)
        (copy_dir / "values.yaml").write_text(yaml.safe_dump(deep_merge(defaults, all_on)))
        lint(config, copy_dir, "ci/all-on-values.yaml")

    # 3. Render with real Helm into the fake API.
    rendered: dict[str, list[tuple[str, dict]]] = {}
    cases = [
        ("default values", {}),
        ("chatCluster.enabled=true", {"chatCluster": {"enabled": True}}),
        ("replicaCount=1 leaderElection.enabled=false", {"leaderElection": {"enabled": False}}),
        ("ci/all-on-values.yaml", all_on),
        ("existing ServiceAccount, no RBAC", {"serviceAccount": {"create": False, "name": "chat-operator-existing"},
                                              "rbac": {"create": False}}),
    ]
    for label, values in cases:
        docs = render(api, label, values)
        if docs is not None:
            rendered[label] = docs

    # 4. What the chart must and must not do.
    if "default values" in rendered:
        docs = rendered["default values"]
        check_rbac("default values", docs, namespaced=False)
        check_deployment("default values", docs, 1, leader=True)
        optional = ("ChatCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy", "ConfigMap")
        if any(by_kind(docs, kind) for kind in optional):
            fail("default values: optional objects rendered although off")
    if "replicaCount=1 leaderElection.enabled=false" in rendered:
        docs = rendered["replicaCount=1 leaderElection.enabled=false"]
        check_deployment("leader election off", docs, 1, leader=False)
        if [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]:
            fail("leader election off: the Lease Role is still rendered")
    if "ci/all-on-values.yaml" in rendered:
        docs = rendered["ci/all-on-values.yaml"]
        check_rbac("all-on (watchNamespace)", docs, namespaced=True)
        check_deployment("all-on", docs, all_on["replicaCount"], leader=True)
        kinds = {o["kind"] for _, o in docs}
        missing = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "ChatCluster",
                   "ServiceAccount"} - kinds
        if missing:
            fail(f"all-on: {sorted(missing)} not rendered")
        check_monitoring("all-on", docs, all_on)
    if "existing ServiceAccount, no RBAC" in rendered:
        docs = rendered["existing ServiceAccount, no RBAC"]
        extra = sorted({o["kind"] for _, o in docs} & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
        sa = [o["spec"]["template"]["spec"]["serviceAccountName"] for o in by_kind(docs, "Deployment")]
        if extra or sa != ["chat-operator-existing"]:
            fail(f"existing ServiceAccount, no RBAC: rendered {extra}, serviceAccountName {sa}")
        else:
            ok("existing ServiceAccount, no RBAC: no ServiceAccount or RBAC objects, the pod uses the named account")
    if "chatCluster.enabled=true" in rendered:
        crs = by_kind(rendered["chatCluster.enabled=true"], "ChatCluster")
        if len(crs) != 1 or crs[0]["metadata"].get("namespace") != NAMESPACE:
            fail("chatCluster.enabled=true: expected one ChatCluster in the release namespace")
        else:
            ok(f"chatCluster.enabled=true: ChatCluster {crs[0]['metadata']['name']} with spec {json.dumps(crs[0]['spec'])}")
    expect_render_error(api, "replicaCount=2 without leader election",
                        {"replicaCount": 2, "leaderElection": {"enabled": False}}, r"needs leaderElection")
    expect_render_error(api, "serviceAccount.create=false without a name",
                        {"serviceAccount": {"create": False}}, r"serviceAccount.name is required")
    expect_render_error(api, "an unknown value", {"replicas": 2}, r"(?i)additional propert|not allowed")
    expect_render_error(api, "a wrong type", {"replicaCount": "two"}, r"(?i)integer|type")
    expect_render_error(api, "chatCluster outside watchNamespace",
                        {"watchNamespace": "elsewhere", "chatCluster": {"enabled": True}}, r"leaves unwatched")

    # 5. Kubernetes schema validation of everything the repository deploys.
    skipped: list[str] = []
    counts = {"k8s": 0, "crd": 0}
    total = 0
    for label, docs in rendered.items():
        total += len(docs)
        validate_objects(f"chart ({label})", docs, skipped, counts)
    files = [CRD] + sorted(p for p in (REPO / "examples").rglob("*.yaml"))
    for path in files:
        objs = load_file(path)
        total += len(objs)
        validate_objects(str(path.relative_to(REPO)), objs, skipped, counts)
    # What the operator builds: operator/tests/builders.rs fails unless the built children equal
    # these snapshots, so validating them validates the builders' output.
    snapshots = sorted((REPO / "operator" / "tests" / "snapshots").glob("builders__*.snap"))
    if not snapshots:
        fail("operator/tests/snapshots: no builder snapshots found")
    for path in snapshots:
        objs = load_snapshot(path)
        total += len(objs)
        validate_objects(str(path.relative_to(REPO)), objs, skipped, counts)
    cm = docs_argocd_cm()
    total += len(cm)
    validate_objects("docs/helm.md", cm, skipped, counts)
    for s in skipped:
        print(f"skip {s}")
    print(f"     {total} objects from the {len(rendered)} renders, {', '.join(str(p.relative_to(REPO)) for p in files)}, "
          f"the {len(snapshots)} operator builder snapshots and the argocd-cm block of docs/helm.md: "
          f"{counts['k8s']} valid against the Kubernetes {' and '.join(K8S_VERSIONS)} schemas (strict), "
          f"{counts['crd']} ChatClusters valid against the CRD's openAPIV3Schema, {len(skipped)} skipped (listed above)")

    # 6. Docs cover every value.
    check_docs_values_table()

    # 7. The alerts parse and pass their unit tests.
    check_alerts()

    print()
    if failures:
        print(f"{len(failures)} failure(s):")
        for f in failures:
            print(f"  - {f}")
    # Checks passed (each validated object counts as one) and failed.
    print(f"chart-lint: {passes + counts['k8s'] + counts['crd']} passed, {len(failures)} failed, {len(skipped)} skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
