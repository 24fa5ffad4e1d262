"""Deployment files: Kubernetes manifests, the generated PrometheusRule, the compose stack and the
example Prometheus configuration. Everything is checked offline.

* Kubernetes built-in kinds are validated against the Kubernetes JSON schemas that
  ``kubernetes-validate`` ships (strict: unknown fields are errors), for the oldest and the newest
  Kubernetes versions it knows; the Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule) are
  checked structurally here. Cross-references (selectors, ports, ConfigMap/Secret keys, mount
  paths) are checked between the files, and the ConfigMap'd poolwatch.yaml is loaded by
  poolwatch's own config loader.
* ``deploy/kubernetes/prometheusrule.yaml`` is generated from ``deploy/prometheus/alerts.yml`` by
  ``scripts/gen-prometheusrule.py``; a test fails when it is stale.
* ``deploy/compose/docker-compose.yml``: structure, referenced files, ports, depends_on, and that
  its configs agree with each other.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolwatch.config import PgBouncerTarget, PostgresTarget, config_from_mapping
from tests.conftest import unavailable

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
GRAFANA = REPO / "grafana"
GENERATOR = REPO / "scripts" / "gen-prometheusrule.py"
PROMETHEUSRULE = K8S / "prometheusrule.yaml"
APP_UID = 10001

DURATION = re.compile(r"^((\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?|0)$")
CRD_GROUP = "monitoring.coreos.com/v1"


def _unavailable(reason: str) -> None:
    unavailable(reason)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in _manifest_files() for doc in _docs(path)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _resources() if doc.get("kind") == kind]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _by_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _with_password_files(data: Any, replacement: Path) -> Any:
    """The config with every password_file pointing at an existing file (the loader checks)."""
    if isinstance(data, dict):
        return {
            k: (str(replacement) if k == "password_file" else _with_password_files(v, replacement))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_with_password_files(v, replacement) for v in data]
    return data


def _password_files(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for k, v in data.items():
            if k == "password_file":
                yield v
            else:
                yield from _password_files(v)
    elif isinstance(data, list):
        for v in data:
            yield from _password_files(v)


def _check_poolwatch_config(text: str, source: str, tmp_path: Path) -> dict[str, Any]:
    data = yaml.safe_load(text)
    secret = tmp_path / "password"
    secret.write_text("x\n")
    config = config_from_mapping(_with_password_files(data, secret), source)
    assert config.pgbouncers, f"{source}: no PgBouncer target"
    targets: list[PgBouncerTarget | PostgresTarget] = [*config.pgbouncers, *config.postgres]
    for target in targets:
        assert target.inline_password() is None, f"{source}: {target.name}: password in the DSN"
        assert target.password_file is not None, f"{source}: {target.name}: password not from a file"
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------------ Kubernetes: schemas


def test_every_manifest_is_listed_in_the_kustomization() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in _manifest_files()}
    if not ALERTS.exists():
        on_disk.add(PROMETHEUSRULE.name)  # generated once alerts.yml exists
    assert set(listed) == on_disk


def _k8s_versions() -> list[str]:
    try:
        from kubernetes_validate import utils
    except ImportError:
        _unavailable("kubernetes-validate is not installed (pip install kubernetes-validate)")
        raise
    versions = utils.all_versions()
    # the oldest and the newest Kubernetes release whose schemas are shipped
    return sorted({utils.major_minor(versions[0]), utils.major_minor(versions[-1])})


BUILTIN_KINDS = {"Deployment", "Service", "ConfigMap", "Secret"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schemas(path: Path) -> None:
    versions = _k8s_versions()
    import kubernetes_validate

    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        kind = doc.get("kind")
        assert kind in BUILTIN_KINDS | CRD_KINDS, f"{path.name}: unexpected kind {kind!r}"
        assert doc["metadata"]["name"], path.name
        assert "namespace" not in doc["metadata"], "namespace-free: kubectl apply -n / kustomize sets it"
        if kind in CRD_KINDS:
            continue  # not in the Kubernetes schemas: checked structurally below
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                name = f"{kind}/{doc['metadata']['name']}"
                pytest.fail(f"{path.name}: {name} (Kubernetes {version}): {where}: {exc.message}")


def test_servicemonitor_structure_and_target() -> None:
    monitors = _by_kind("ServiceMonitor") + _by_kind("PodMonitor")
    assert len(monitors) == 1
    sm = monitors[0]
    assert sm["apiVersion"] == CRD_GROUP
    assert set(sm) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = sm["spec"]
    assert set(spec) <= {
        "selector",
        "endpoints",
        "namespaceSelector",
        "jobLabel",
        "targetLabels",
        "podTargetLabels",
        "sampleLimit",
    }
    selector = spec["selector"]["matchLabels"]
    assert isinstance(spec["endpoints"], list) and spec["endpoints"]
    service = _one("Service")
    assert _matches(selector, service["metadata"]["labels"]), "ServiceMonitor selects no Service"
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "scheme",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
        }
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert DURATION.match(endpoint[key]), (key, endpoint[key])
        assert not endpoint.get("honorLabels"), "`target` must stay poolwatch's label"
    assert "target" not in spec.get("targetLabels", []), "would clash with poolwatch's `target` label"


def _check_prometheusrule(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == CRD_GROUP
    assert doc["kind"] == "PrometheusRule"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert doc["metadata"]["name"]
    assert set(doc["spec"]) == {"groups"}
    groups = doc["spec"]["groups"]
    assert isinstance(groups, list) and groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    for group in groups:
        assert isinstance(group["name"], str) and group["name"]
        if "interval" in group:
            assert DURATION.match(group["interval"])
        assert isinstance(group["rules"], list) and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert DURATION.match(str(rule["for"])), rule["for"]
            for key in ("labels", "annotations"):
                for k, v in rule.get(key, {}).items():
                    assert isinstance(k, str) and isinstance(v, str), (key, k, v)
            if "record" in rule:
                assert re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", rule["record"])
                assert "for" not in rule and "annotations" not in rule


def test_generated_prometheusrule_structure() -> None:
    if not PROMETHEUSRULE.exists():
        pytest.skip(
            "deploy/kubernetes/prometheusrule.yaml is generated once deploy/prometheus/alerts.yml exists"
        )
    docs = _docs(PROMETHEUSRULE)
    assert len(docs) == 1
    _check_prometheusrule(docs[0])


# ------------------------------------------------------------------ Kubernetes: how the pieces fit


def _pod() -> dict[str, Any]:
    template: dict[str, Any] = _one("Deployment")["spec"]["template"]
    return template


def _container(name: str) -> dict[str, Any]:
    found = [c for c in _pod()["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, name
    container: dict[str, Any] = found[0]
    return container


def test_deployment_is_pgbouncer_with_poolwatch_sidecar() -> None:
    deployment = _one("Deployment")
    pod = _pod()
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert sorted(c["name"] for c in pod["spec"]["containers"]) == ["pgbouncer", "poolwatch"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in pod["spec"]["containers"]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert security.get("runAsUser", 0) != 0, container["name"]


def test_poolwatch_container_probes_and_port() -> None:
    poolwatch = _container("poolwatch")
    assert poolwatch["securityContext"]["runAsUser"] == APP_UID  # the image's USER
    ports = {p["name"]: p["containerPort"] for p in poolwatch["ports"]}
    assert ports == {"metrics": 9127}
    live, ready = poolwatch["livenessProbe"]["httpGet"], poolwatch["readinessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/healthz", "metrics")
    assert (ready["path"], ready["port"]) == ("/readyz", "metrics")
    service = _one("Service")
    assert _matches(service["spec"]["selector"], _pod()["metadata"]["labels"])
    container_ports = {p["name"] for c in _pod()["spec"]["containers"] for p in c["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container["volumeMounts"]}


def _volume_source(name: str) -> tuple[str, dict[str, Any]]:
    volume = next(v for v in _pod()["spec"]["volumes"] if v["name"] == name)
    if "configMap" in volume:
        return "ConfigMap", _one("ConfigMap", volume["configMap"]["name"])
    if "secret" in volume:
        return "Secret", _one("Secret", volume["secret"]["secretName"])
    return "other", volume


def _keys(resource: dict[str, Any]) -> set[str]:
    return set(resource.get("data", {})) | set(resource.get("stringData", {}))


def _file_in_mounts(container: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(kind, key) of the ConfigMap/Secret key mounted at ``path`` in ``container``."""
    for name, mount in _mounts(container).items():
        kind, resource = _volume_source(name)
        if kind == "other":
            continue
        if "subPath" in mount:
            if mount["mountPath"] == path and mount["subPath"] in _keys(resource):
                return kind, mount["subPath"]
        elif path.startswith(mount["mountPath"].rstrip("/") + "/"):
            key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
            if key in _keys(resource):
                return kind, key
    return None


def test_every_volume_mount_has_a_volume_and_its_source_exists() -> None:
    volumes = {v["name"] for v in _pod()["spec"]["volumes"]}
    for container in _pod()["spec"]["containers"]:
        for name, mount in _mounts(container).items():
            assert name in volumes, f"{container['name']}: mount of unknown volume {name}"
            kind, resource = _volume_source(name)
            if kind != "other" and "subPath" in mount:
                assert mount["subPath"] in _keys(resource)
            if kind != "other":
                assert mount.get("readOnly") is True, f"{container['name']}: {name} should be read-only"


def test_poolwatch_config_from_configmap_with_passwords_from_secret_files(tmp_path: Path) -> None:
    poolwatch = _container("poolwatch")
    args = poolwatch.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else "/etc/poolwatch/poolwatch.yaml"
    where = _file_in_mounts(poolwatch, config_path)
    assert where is not None and where[0] == "ConfigMap", f"{config_path} is not a ConfigMap'd file"
    text = _one("ConfigMap", "poolwatch-config")["data"][where[1]]
    data = _check_poolwatch_config(text, "configmap poolwatch-config", tmp_path)
    files = list(_password_files(data))
    assert files
    for path in files:
        found = _file_in_mounts(poolwatch, path)
        assert found is not None and found[0] == "Secret", f"password_file {path} is not a mounted Secret key"
    # the sidecar watches the PgBouncer of its own pod, over loopback
    pgbouncer_port = next(p["containerPort"] for p in _container("pgbouncer")["ports"])
    dsns = [t["dsn"] for t in data["pgbouncers"]]
    assert any("127.0.0.1" in dsn and f"port={pgbouncer_port}" in dsn for dsn in dsns), dsns
    assert data["listen"].endswith(":9127")


def test_pgbouncer_config_and_userlist_fit_together() -> None:
    pgbouncer = _container("pgbouncer")
    ini_path = pgbouncer["args"][-1]
    where = _file_in_mounts(pgbouncer, ini_path)
    assert where is not None and where[0] == "ConfigMap", ini_path
    ini = configparser.ConfigParser(inline_comment_prefixes=None, comment_prefixes=(";", "#"))
    ini.read_string(_one("ConfigMap", "pgbouncer-config")["data"][where[1]])
    settings = ini["pgbouncer"]
    auth_file = _file_in_mounts(pgbouncer, settings["auth_file"])
    assert auth_file is not None and auth_file[0] == "Secret", "auth_file must be a mounted Secret"
    port = int(settings["listen_port"])
    assert port == next(p["containerPort"] for p in pgbouncer["ports"])
    # poolwatch's console user is a stats user and has a userlist entry
    cm = yaml.safe_load(_one("ConfigMap", "poolwatch-config")["data"]["poolwatch.yaml"])
    user = re.search(r"\buser=(\S+)", cm["pgbouncers"][0]["dsn"])
    assert user is not None
    assert user.group(1) in [u.strip() for u in settings["stats_users"].split(",")]
    userlist = _one("Secret", "pgbouncer-userlist")["stringData"]["userlist.txt"]
    assert f'"{user.group(1)}"' in userlist


# ------------------------------------------------------------------ PrometheusRule generation


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_prometheusrule_is_up_to_date() -> None:
    if not ALERTS.exists():
        pytest.skip(
            "deploy/prometheus/alerts.yml does not exist yet: nothing to generate the PrometheusRule from"
        )
    done = _generate("--check")
    assert done.returncode == 0, (
        done.stderr + "\n(regenerate: .venv/bin/python scripts/gen-prometheusrule.py)"
    )


SAMPLE_ALERTS = """\
groups:
  - name: sample.recording
    rules:
      - record: target:sample:ratio
        expr: |
          max by (target) (
            poolwatch_target_up
          )
  - name: sample.alerts
    interval: 30s
    rules:
      - alert: SampleDown
        expr: poolwatch_target_up == 0
        for: 2m
        labels:
          severity: critical
        annotations:
          summary: "{{ $labels.target }} is down: ünïcode and 'quotes'"
          description: |-
            Two lines,
            no trailing newline.
"""


def test_generator_wraps_the_rule_groups_unchanged(tmp_path: Path) -> None:
    alerts, out = tmp_path / "alerts.yml", tmp_path / "rule.yaml"
    alerts.write_text(SAMPLE_ALERTS)
    done = _generate("--alerts", str(alerts), "--output", str(out))
    assert done.returncode == 0, done.stderr
    docs = _docs(out)
    assert len(docs) == 1
    _check_prometheusrule(docs[0])
    assert docs[0]["spec"]["groups"] == yaml.safe_load(SAMPLE_ALERTS)["groups"]
    assert out.read_text().startswith("# GENERATED")
    assert "expr: |" in out.read_text(), "multi-line PromQL stays a readable block"
    # stable: a second run changes nothing, and --check agrees
    first = out.read_text()
    assert _generate("--alerts", str(alerts), "--output", str(out)).returncode == 0
    assert out.read_text() == first
    assert _generate("--alerts", str(alerts), "--output", str(out), "--check").returncode == 0
    # a changed rule makes it stale
    alerts.write_text(SAMPLE_ALERTS.replace("for: 2m", "for: 5m"))
    stale = _generate("--alerts", str(alerts), "--output", str(out), "--check")
    assert stale.returncode == 1 and "stale" in stale.stderr
    assert out.read_text() == first, "--check never writes"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups: []\n", "non-empty 'groups'"),
        ("groups:\n  - name: a\n    rules: []\n", "non-empty 'rules'"),
        ("groups:\n  - name: a\n    rules:\n      - expr: up\n", "exactly one of"),
        ("groups:\n  - name: a\n    rules:\n      - alert: A\n", "needs an 'expr'"),
        (
            "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: up\n        fore: 1m\n",
            "unknown keys",
        ),
        (
            "groups:\n  - {name: a, rules: [{alert: A, expr: up}]}\n"
            "  - {name: a, rules: [{alert: B, expr: up}]}\n",
            "used twice",
        ),
    ],
)
def test_generator_rejects_bad_rule_files(tmp_path: Path, text: str, message: str) -> None:
    alerts, out = tmp_path / "alerts.yml", tmp_path / "rule.yaml"
    alerts.write_text(text)
    done = _generate("--alerts", str(alerts), "--output", str(out))
    assert done.returncode == 2
    assert message in done.stderr
    assert not out.exists()


# ------------------------------------------------------------------ Prometheus example config


def test_prometheus_example_config() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = config["scrape_configs"]
    assert jobs
    for job in jobs:
        # alerts.yml finds poolwatch's own `up` by job name
        assert "poolwatch" in job["job_name"], job["job_name"]
        assert not job.get("honor_labels"), "poolwatch's `target` label must not be overridden"
        for static in job.get("static_configs", []):
            assert "target" not in static.get("labels", {}), "would rename poolwatch's `target` label"
    # the rules: the same file as everywhere else, relative to the config
    assert config["rule_files"] == ["alerts.yml"]
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert "multi-target" in text.lower(), "the example shows one poolwatch serving several PgBouncers"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    args = [promtool, "check", "config"]
    if not ALERTS.exists():
        args.append("--syntax-only")
    done = subprocess.run(
        [*args, str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ compose


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _not_yet_there(path: Path) -> bool:
    """Files that other work adds: the dashboards under grafana/ and the alert rules."""
    if path.exists():
        return False
    return path.resolve() == ALERTS.resolve() or path.resolve().is_relative_to(GRAFANA.resolve())


def _host_path(source: str) -> Path | None:
    if source.startswith(("./", "../", "/")):
        return (COMPOSE_DIR / source).resolve()
    return None  # a named volume


def test_compose_services_structure() -> None:
    compose = _compose()
    assert set(compose) <= {"name", "services", "volumes", "secrets", "networks", "configs"}
    services = compose["services"]
    assert {"postgres", "poolwatch", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert any("pgbouncer" in name for name in services)
    named_volumes = set(compose.get("volumes") or {})
    secrets = compose.get("secrets") or {}
    published: list[int] = []
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: needs an image or a build"
        if "image" in service and "build" not in service:
            assert re.search(r":[\w.-]+$", service["image"]), f"{name}: pin the image tag"
            assert not service["image"].endswith(":latest"), name
        if "build" in service:
            build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            path = _host_path(source)
            if path is None:
                assert source in named_volumes, f"{name}: volume {source} not declared"
            elif not _not_yet_there(path):
                assert path.exists(), f"{name}: {source} does not exist"
        for secret in service.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in secrets, f"{name}: unknown secret {secret_name}"
        for port in service.get("ports", []):
            match = re.fullmatch(r"(?:[\d.]+:)?(\d+):(\d+)(?:/(tcp|udp))?", str(port))
            assert match, f"{name}: port {port!r} is not HOST:CONTAINER"
            host, container = int(match.group(1)), int(match.group(2))
            assert 0 < host < 65536 and 0 < container < 65536
            published.append(host)
        depends = service.get("depends_on", [])
        for dependency in depends if isinstance(depends, list) else list(depends):
            assert dependency in services, f"{name}: depends_on unknown service {dependency}"
            assert dependency != name
    assert len(published) == len(set(published)), "two services publish the same host port"
    for name, secret in secrets.items():
        assert (COMPOSE_DIR / secret["file"]).is_file(), f"secret {name}: {secret['file']} missing"


def test_compose_poolwatch_service(tmp_path: Path) -> None:
    services = _compose()["services"]
    poolwatch = services["poolwatch"]
    assert poolwatch.get("read_only") is True
    assert "9127:9127" in poolwatch["ports"]
    config_mount = next(v for v in poolwatch["volumes"] if v.split(":")[1] == "/etc/poolwatch/poolwatch.yaml")
    config_file = COMPOSE_DIR / config_mount.split(":")[0]
    data = _check_poolwatch_config(config_file.read_text(), "deploy/compose/poolwatch.yaml", tmp_path)
    # passwords: compose secrets, mounted at /run/secrets/<name>
    for path in _password_files(data):
        assert path.startswith("/run/secrets/")
        assert path.rsplit("/", 1)[1] in poolwatch["secrets"], path
    # one poolwatch, several PgBouncers (the multi-target form), each a service of this file
    assert len(data["pgbouncers"]) >= 2
    for target in [*data["pgbouncers"], *data["postgres"]]:
        host = re.search(r"\bhost=(\S+)", target["dsn"])
        assert host is not None and host.group(1) in services, target["dsn"]
        assert host.group(1) in poolwatch.get("depends_on", [])


def test_compose_pgbouncer_postgres_and_secrets_agree() -> None:
    compose = _compose()
    secret_files = {
        name: (COMPOSE_DIR / s["file"]).read_text().strip() for name, s in compose["secrets"].items()
    }
    userlist_text = (COMPOSE_DIR / "pgbouncer" / "userlist.txt").read_text()
    userlist = dict(re.findall(r'^"([^"]+)" "([^"]+)"$', userlist_text, flags=re.M))
    assert userlist["poolwatch"] == secret_files["poolwatch-password"]
    assert userlist["app"] == secret_files["app-password"]
    ini = configparser.ConfigParser(comment_prefixes=(";", "#"))
    ini.read_string((COMPOSE_DIR / "pgbouncer" / "pgbouncer.ini").read_text())
    assert "poolwatch" in ini["pgbouncer"]["stats_users"]
    assert ini["pgbouncer"]["auth_file"] == "/etc/pgbouncer/userlist.txt"
    server = re.search(r"\bhost=(\S+)", ini["databases"]["*"])
    assert server is not None and server.group(1) in compose["services"]
    roles = (COMPOSE_DIR / "postgres" / "10-roles.sh").read_text()
    assert "IN ROLE pg_monitor" in roles
    for secret in ("poolwatch-password", "app-password"):
        assert f"/run/secrets/{secret}" in roles
        assert secret in compose["services"]["postgres"]["secrets"]


def test_compose_prometheus_alertmanager_grafana_wiring() -> None:
    services = _compose()["services"]
    prometheus_config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    scrape_targets = {
        t
        for job in prometheus_config["scrape_configs"]
        for s in job.get("static_configs", [])
        for t in s["targets"]
    }
    assert "poolwatch:9127" in scrape_targets
    managers = {
        t
        for a in prometheus_config["alerting"]["alertmanagers"]
        for s in a["static_configs"]
        for t in s["targets"]
    }
    assert managers == {"alertmanager:9093"}
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert (
        COMPOSE_DIR / mounts["/etc/prometheus/prometheus.yml"]
    ).resolve() == PROMETHEUS_DIR / "prometheus.yml"
    # rule_files are relative to prometheus.yml: alerts.yml sits beside it in the container too
    assert (COMPOSE_DIR / mounts["/etc/prometheus/alerts.yml"]).resolve() == ALERTS
    grafana_mounts = {
        v.split(":")[1]: (COMPOSE_DIR / v.split(":")[0]).resolve() for v in services["grafana"]["volumes"]
    }
    for source in grafana_mounts.values():
        assert source.is_relative_to(GRAFANA.resolve()), (
            "Grafana is provisioned from the repository's grafana/"
        )
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    if not (provisioning / "dashboards").is_dir():
        pytest.skip("grafana/provisioning does not exist yet")
    urls = {
        d["url"]
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for d in yaml.safe_load(f.read_text())["datasources"]
    }
    assert "http://prometheus:9090" in urls  # the compose service names
    assert urls <= {"http://prometheus:9090", "http://alertmanager:9093"}, urls
    paths = {
        p["options"]["path"]
        for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    }
    assert paths and paths <= set(grafana_mounts), (
        f"dashboards provisioned from {paths}, mounted: {set(grafana_mounts)}"
    )
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        folder, _, file = home.rpartition("/")
        assert (grafana_mounts[folder] / file).is_file(), (
            f"home dashboard {home} is not in the mounted folder"
        )


def test_compose_alertmanager_config_passes_amtool() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager)")
    done = subprocess.run(
        [amtool, "check-config", str(COMPOSE_DIR / "alertmanager" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
