#!/usr/bin/env bash
# Validates the files under deploy/ and docs/runbooks/ with the tools a Debian
# machine provides. Prints one PASS, FAIL or SKIP line per check, followed by
# the tool output of each failed check, and exits 1 if any check failed.
#
# Needs: bash, python3 with PyYAML (Debian package python3-yaml, or
# `pip install pyyaml`), promtool (Debian package prometheus). Uses
# systemd-analyze when it is installed. Installs nothing itself.
#
# Usage: bash deploy/check.sh   (from any directory)

set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root" || exit 1

alerts=deploy/prometheus/wsticket-alerts.yml
alert_tests=deploy/prometheus/wsticket-alerts.test.yml
dashboard=deploy/grafana/wsticket-dashboard.json
unit=deploy/systemd/wsticket.service
manifest=deploy/kubernetes/wsticket.yaml
runbooks=docs/runbooks

# The unit's ExecStart path. systemd-analyze verify reports it as missing on
# any machine where wsticket is not installed.
unit_binary=/usr/local/bin/wsticket

# The wsticket_* series that the server is specified to export. Histograms are
# listed by their _bucket series, the only one the alerts and the dashboard use.
# The wsticket_cluster_* series exist in cluster mode only.
export EXPORTED_METRICS="
wsticket_tickets_issued_total
wsticket_ticket_requests_rejected_total
wsticket_redemptions_total
wsticket_jwt_verifications_total
wsticket_jwks_fetches_total
wsticket_tickets_expired_unused_total
wsticket_replay_attempts_total
wsticket_live_tickets
wsticket_open_connections
wsticket_jwks_breaker_state
wsticket_jwks_last_success_age_seconds
wsticket_jwks_max_stale_seconds
wsticket_jwks_keys_loaded
wsticket_ticket_issuance_duration_seconds_bucket
wsticket_redemption_duration_seconds_bucket
wsticket_upstream_connect_duration_seconds_bucket
wsticket_cluster_node_id_conflicts
wsticket_cluster_home_unavailable_total
wsticket_cluster_live_nodes
wsticket_cluster_forwarded_consumes_total
wsticket_cluster_forward_duration_seconds_bucket
"

# Highest accepted `systemd-analyze security` exposure level (0.0 is the most
# restricted, 10.0 the least). --threshold takes it in tenths, so 20 means 2.0.
# The unit scored 1.1 with systemd 252.
max_exposure_tenths=20
max_exposure_text="$((max_exposure_tenths / 10)).$((max_exposure_tenths % 10))"

passed=0
failed=0
skipped=0

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

pass() {
    printf 'PASS  %s\n' "$1"
    passed=$((passed + 1))
}

# fail NAME [OUTPUT_FILE]: prints the failure and the indented tool output.
fail() {
    printf 'FAIL  %s\n' "$1"
    if [[ -n "${2:-}" && -s "$2" ]]; then
        sed 's/^/      /' "$2"
    fi
    failed=$((failed + 1))
}

skip() {
    printf 'SKIP  %s\n' "$1"
    skipped=$((skipped + 1))
}

have() {
    command -v "$1" >/dev/null 2>&1
}

python_has_yaml() {
    have python3 && python3 -c 'import yaml' >/dev/null 2>&1
}

# run_check NAME COMMAND...: passes when COMMAND exits 0, and shows its
# output when it does not.
run_check() {
    local name="$1"
    shift
    local output="$work_dir/output"
    "$@" >"$output" 2>&1
    local status=$?
    if [[ $status -eq 0 ]]; then
        pass "$name"
        return
    fi
    if [[ ! -s "$output" ]]; then
        echo "exited with status $status and printed nothing" >"$output"
    fi
    fail "$name" "$output"
}

check_promtool() {
    if ! have promtool; then
        fail "promtool check rules: promtool not found; install it with 'apt-get install prometheus'"
        fail "promtool test rules: promtool not found; install it with 'apt-get install prometheus'"
        return
    fi
    run_check "promtool check rules $alerts" promtool check rules "$alerts"
    run_check "promtool test rules $alert_tests" promtool test rules "$alert_tests"
}

# Checks what promtool cannot: every alert has a severity, the three
# annotations and a runbook page, and uses only names from EXPORTED_METRICS.
check_alert_metadata() {
    python3 - "$alerts" "$runbooks" <<'PY'
import os
import re
import sys

import yaml

rules_path, runbook_dir = sys.argv[1], sys.argv[2]

EXPORTED = set(os.environ["EXPORTED_METRICS"].split())

errors = []
with open(rules_path) as rules_file:
    groups = yaml.safe_load(rules_file)["groups"]
alert_names = set()
for group in groups:
    for rule in group["rules"]:
        name = rule.get("alert")
        if name is None:
            continue
        alert_names.add(name)
        if not re.fullmatch(r"Wsticket[A-Z][A-Za-z]+", name):
            errors.append(f"{name}: name is not CamelCase with the Wsticket prefix")
        severity = rule.get("labels", {}).get("severity")
        if severity not in ("critical", "warning", "info"):
            errors.append(f"{name}: severity label is {severity!r}, expected critical, warning or info")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                errors.append(f"{name}: missing annotation {key}")
        expected_url = f"{runbook_dir}/{name}.md"
        if annotations.get("runbook_url") != expected_url:
            errors.append(f"{name}: runbook_url is {annotations.get('runbook_url')!r}, expected {expected_url!r}")
        if not os.path.isfile(expected_url):
            errors.append(f"{name}: runbook {expected_url} not found")
        for metric in set(re.findall(r"\bwsticket_[a-z0-9_]+", rule["expr"])):
            if metric not in EXPORTED:
                errors.append(f"{name}: expr uses {metric}, which is not in EXPORTED_METRICS")

for page in sorted(os.listdir(runbook_dir)):
    if page.endswith(".md") and page[:-3] not in alert_names:
        errors.append(f"{runbook_dir}/{page}: no alert of that name in {rules_path}")

for error in errors:
    print(error)
print(f"{len(alert_names)} alerts: {', '.join(sorted(alert_names))}")
sys.exit(1 if errors else 0)
PY
}

# Checks that the dashboard is valid JSON, that panel ids are unique, that
# every panel uses the datasource variable and that every expr uses only names
# from EXPORTED_METRICS. Writes each expr into a rules file for promtool.
check_dashboard_structure() {
    python3 - "$dashboard" "$work_dir/dashboard-exprs.yml" <<'PY'
import json
import os
import re
import sys

dashboard_path, rules_path = sys.argv[1], sys.argv[2]

EXPORTED = set(os.environ["EXPORTED_METRICS"].split())
DATASOURCE_UID = "${datasource}"

with open(dashboard_path) as dashboard_file:
    dashboard = json.load(dashboard_file)

errors = []
variables = {variable["name"] for variable in dashboard["templating"]["list"]}
if "datasource" not in variables:
    errors.append("no datasource variable named 'datasource'")

panels = []
for panel in dashboard["panels"]:
    panels.append(panel)
    panels.extend(panel.get("panels", []))

ids = [panel["id"] for panel in panels]
if len(ids) != len(set(ids)):
    errors.append(f"panel ids are not unique: {sorted(ids)}")

exprs = []
for panel in panels:
    if panel["type"] == "row":
        continue
    title = panel.get("title", f"panel {panel['id']}")
    if panel.get("datasource", {}).get("uid") != DATASOURCE_UID:
        errors.append(f"{title}: datasource uid is not {DATASOURCE_UID}")
    targets = panel.get("targets", [])
    if not targets:
        errors.append(f"{title}: no targets")
    for target in targets:
        expr = target.get("expr", "")
        if not expr:
            errors.append(f"{title}: target {target.get('refId')} has no expr")
            continue
        for metric in set(re.findall(r"\bwsticket_[a-z0-9_]+", expr)):
            if metric not in EXPORTED:
                errors.append(f"{title}: expr uses {metric}, which is not in EXPORTED_METRICS")
        for variable in re.findall(r"\$(\w+)", expr):
            if variable not in variables and not variable.startswith("__"):
                errors.append(f"{title}: expr uses undefined variable ${variable}")
        exprs.append((title, expr))

# Grafana substitutes these before the query reaches Prometheus. The values
# only need to form valid PromQL.
substitutions = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
with open(rules_path, "w") as rules_file:
    rules_file.write("groups:\n  - name: dashboard-exprs\n    rules:\n")
    for index, (title, expr) in enumerate(exprs):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules_file.write(f"      - record: dashboard_expr_{index}\n")
        rules_file.write(f"        expr: {json.dumps(expr)}\n")

for error in errors:
    print(error)
print(f"{len(panels)} panels, {len(exprs)} exprs")
sys.exit(1 if errors else 0)
PY
}

check_dashboard() {
    if ! have python3; then
        fail "dashboard $dashboard: python3 not found"
        return
    fi
    run_check "dashboard $dashboard: JSON, panel ids, datasource, metric names" check_dashboard_structure
    if [[ ! -s "$work_dir/dashboard-exprs.yml" ]]; then
        skip "dashboard PromQL syntax: no exprs were extracted"
    elif have promtool; then
        run_check "dashboard PromQL syntax (promtool check rules)" \
            promtool check rules "$work_dir/dashboard-exprs.yml"
    else
        fail "dashboard PromQL syntax: promtool not found; install it with 'apt-get install prometheus'"
    fi
}

# Parses every document and checks the references between them: selectors,
# named ports, probes, the ConfigMap and the volume claim.
check_manifest_structure() {
    python3 - "$manifest" <<'PY'
import sys

import yaml

with open(sys.argv[1]) as manifest_file:
    documents = [document for document in yaml.safe_load_all(manifest_file) if document]

errors = []
by_kind = {}
for document in documents:
    for key in ("apiVersion", "kind", "metadata"):
        if key not in document:
            errors.append(f"document without {key}: {document}")
    by_kind.setdefault(document["kind"], {})[document["metadata"]["name"]] = document

for kind in ("ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"):
    if kind not in by_kind:
        errors.append(f"no {kind}")
if errors:
    print("\n".join(errors))
    sys.exit(1)

deployment = by_kind["Deployment"]["wsticket"]
spec = deployment["spec"]
pod = spec["template"]["spec"]
pod_labels = spec["template"]["metadata"]["labels"]
container = pod["containers"][0]
port_names = {port["name"]: port["containerPort"] for port in container["ports"]}

if spec["replicas"] != 1:
    errors.append(f"Deployment replicas is {spec['replicas']}, expected 1 until cluster mode exists")
if spec["selector"]["matchLabels"].items() - pod_labels.items():
    errors.append("Deployment selector does not match the pod template labels")
if port_names != {"http": 8080, "admin": 9090}:
    errors.append(f"container ports are {port_names}, expected http 8080 and admin 9090")

for probe_name, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
    probe = container.get(probe_name, {}).get("httpGet", {})
    if probe.get("path") != path or probe.get("port") != "admin":
        errors.append(f"{probe_name} is {probe}, expected path {path} on port admin")

config_maps = by_kind["ConfigMap"]
for source in container.get("envFrom", []):
    name = source["configMapRef"]["name"]
    if name not in config_maps:
        errors.append(f"envFrom references missing ConfigMap {name}")
        continue
    for key, value in config_maps[name]["data"].items():
        if not key.startswith("WSTICKET_"):
            errors.append(f"ConfigMap {name}: {key} is not a WSTICKET_ variable")
        if not isinstance(value, str):
            errors.append(f"ConfigMap {name}: {key} is not a string")
    for key in ("WSTICKET_LISTEN", "WSTICKET_ADMIN_LISTEN"):
        if not config_maps[name]["data"].get(key, "").startswith("0.0.0.0:"):
            errors.append(f"ConfigMap {name}: {key} must listen on 0.0.0.0 inside the pod")

for volume in pod.get("volumes", []):
    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
    if claim and claim not in by_kind["PersistentVolumeClaim"]:
        errors.append(f"volume {volume['name']} references missing claim {claim}")

for name, service in by_kind["Service"].items():
    if service["spec"]["selector"].items() - pod_labels.items():
        errors.append(f"Service {name}: selector does not match the pod labels")
    for port in service["spec"]["ports"]:
        if port["targetPort"] not in port_names:
            errors.append(f"Service {name}: targetPort {port['targetPort']} is not a container port name")

for error in errors:
    print(error)
print(", ".join(f"{kind} {name}" for kind, names in by_kind.items() for name in names))
sys.exit(1 if errors else 0)
PY
}

check_manifest() {
    if ! python_has_yaml; then
        fail "kubernetes $manifest: python3 with PyYAML not found; install python3-yaml or 'pip install pyyaml'"
        return
    fi
    run_check "kubernetes $manifest: YAML parse and references (no schema, no cluster)" check_manifest_structure
}

check_systemd() {
    if ! have systemd-analyze; then
        skip "systemd $unit: systemd-analyze not installed"
        return
    fi

    # verify exits non-zero when ExecStart's binary is missing. That one
    # message is expected here, and any other output is a failure.
    local output="$work_dir/verify"
    local other="$work_dir/verify-other"
    systemd-analyze verify "$unit" >"$output" 2>&1
    local status=$?
    grep -v -F "Command $unit_binary is not executable" "$output" >"$other"
    if [[ -s "$other" ]]; then
        fail "systemd-analyze verify $unit" "$output"
    elif [[ $status -ne 0 && -x "$unit_binary" ]]; then
        fail "systemd-analyze verify $unit" "$output"
    elif [[ $status -ne 0 ]]; then
        pass "systemd-analyze verify $unit (only finding: $unit_binary is not installed here)"
    else
        pass "systemd-analyze verify $unit"
    fi

    output="$work_dir/security"
    if systemd-analyze security --offline=yes --threshold="$max_exposure_tenths" "$unit" >"$output" 2>&1; then
        local score
        score="$(grep -o 'Overall exposure level for [^:]*: [0-9.]*' "$output" | awk '{print $NF}')"
        pass "systemd-analyze security --offline $unit: exposure ${score:-unknown}, limit $max_exposure_text"
    else
        # Show only the settings that add exposure, and the total.
        grep -E '✗|Overall exposure|Failed|rror' "$output" >"$output.short"
        fail "systemd-analyze security --offline $unit: exposure above $max_exposure_text" "$output.short"
    fi
}

check_dockerfile() {
    # A build needs a container engine and access to the base images. Neither
    # is assumed, so the Dockerfile is left to `docker build`.
    skip "deploy/Dockerfile: not built (needs a container engine and the rust and debian base images)"
}

check_alerts() {
    if ! python_has_yaml; then
        fail "alert labels, annotations and runbooks: python3 with PyYAML not found; install python3-yaml or 'pip install pyyaml'"
        return
    fi
    run_check "alert labels, annotations, runbooks and metric names" check_alert_metadata
}

check_promtool
check_alerts
check_dashboard
check_manifest
check_systemd
check_dockerfile

echo "deploy checks: $passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
