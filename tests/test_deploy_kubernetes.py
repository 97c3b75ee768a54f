"""deploy/kubernetes/: every manifest is valid against Kubernetes' own schemas, keeps the
promises a fleet depends on, and the Pod's containers run exactly as written.

``kubernetes-validate --strict`` checks each manifest offline against the bundled OpenAPI
schemas (unknown fields are errors). The last test runs the Pod on 127.0.0.1: the init
container, then the Envoy and extproc containers, each as its own process with the
manifest's command and arguments verbatim; only the volume mount paths are mapped to
temporary directories, Secrets to test values, and the ConfigMap's config gets free ports,
the demo upstream as backend and a real redis-server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from checkstream.config.model import load_config
from checkstream.gateway.runtime import check_config
from tests.postgres_server import postgres_server, postgres_url
from tests.redis_server import RedisServer, redis_server
from tests.support import DemoUpstreamThread, gateway_ports, request, wait_until

__all__ = ["postgres_server", "postgres_url", "redis_server"]  # fixtures used by name

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def resources() -> list[str]:
    return list(documents("kustomization.yaml")[0]["resources"])


def one(kind: str) -> dict[str, Any]:
    found = [d for name in resources() for d in documents(name) if d["kind"] == kind]
    assert len(found) == 1, (kind, found)
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    found = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def configmap_files() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap")["data"]
    return data


# -- the manifests -----------------------------------------------------------------------------
def test_the_kustomization_lists_every_manifest() -> None:
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources()) == on_disk


# kustomization.yaml is kustomize's own file, not a cluster resource; it lists the others.
@pytest.mark.parametrize("name", resources())
def test_every_manifest_validates_strictly(name: str) -> None:
    validator = shutil.which("kubernetes-validate", path=str(BIN)) or "kubernetes-validate"
    result = subprocess.run(
        [validator, "--strict", "--quiet", str(MANIFESTS / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_what_is_not_kubernetes(tmp_path: Path) -> None:
    """The check above can fail: an unknown field is an error under --strict."""
    bad = tmp_path / "deployment.yaml"
    bad.write_text((MANIFESTS / "deployment.yaml").read_text().replace("replicas:", "replica:"))
    validator = shutil.which("kubernetes-validate", path=str(BIN)) or "kubernetes-validate"
    result = subprocess.run(
        [validator, "--strict", "--quiet", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "replica" in result.stdout + result.stderr


def test_the_deployment_runs_envoy_and_extproc_as_separate_containers() -> None:
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    spec = pod_spec()
    assert [c["name"] for c in spec["containers"]] == ["envoy", "extproc"]
    assert container("envoy-config")["command"][:3] == ["checkstream", "envoy", "render"]
    assert container("envoy")["command"][0] == "envoy"
    assert container("extproc")["command"][:2] == ["checkstream", "serve"]
    image = documents("kustomization.yaml")[0]["images"][0]["name"]
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {image}


def test_every_container_is_probed_drained_bounded_and_locked_down() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    drain_s = yaml.safe_load(configmap_files()["checkstream.yaml"])["server"]["drain_timeout_s"]
    assert spec["terminationGracePeriodSeconds"] > drain_s
    for c in spec["containers"] + spec["initContainers"]:
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, c["name"]
        assert security["allowPrivilegeEscalation"] is False, c["name"]
        assert {"requests", "limits"} <= set(c["resources"]), c["name"]
    for c in spec["containers"]:
        assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
        assert c["lifecycle"]["preStop"]["exec"]["command"][:3] == [
            "checkstream",
            "envoy",
            "drain",
        ]
    # The config comes from the ConfigMap, read-only.
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]


def test_secrets_come_from_secret_refs_and_never_from_the_configmap() -> None:
    env = {e["name"]: e for e in container("extproc")["env"]}
    secret = one("Secret")["metadata"]["name"]
    for name in ("CHECKSTREAM_ADMIN_TOKEN", "CHECKSTREAM_REDIS_URL", "CHECKSTREAM_USAGE_DSN"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret, name
    config = yaml.safe_load(configmap_files()["checkstream.yaml"])
    assert config["limits"] == {
        "backend": "redis",
        "url_env": "CHECKSTREAM_REDIS_URL",
        "lease_s": 30,
    }
    for tenant in config["tenants"]["configs"].values():
        token_env = tenant["auth"]["token_env"]
        assert env[token_env]["valueFrom"]["secretKeyRef"]["name"] == secret
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_configmaps_config_passes_config_check(tmp_path: Path) -> None:
    for name, text in configmap_files().items():
        (tmp_path / name).write_text(text)
    loaded = load_config(tmp_path / "checkstream.yaml", require_secrets=False)
    check_config(loaded)
    assert loaded.model.limits.backend == "redis"
    assert loaded.model.replicated and loaded.model.usage.backend == "postgres"


def test_the_admin_port_is_private_and_the_listener_public() -> None:
    policy = one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    rules = policy["ingress"]
    by_port = {p["port"]: rule for rule in rules for p in rule["ports"]}
    assert "from" not in by_port["http"]  # anyone may reach the listener
    admin_from = by_port["admin"]["from"]
    assert admin_from and all("podSelector" in peer for peer in admin_from)
    public = next(s for s in documents("service.yaml") if s["metadata"]["name"] == "checkstream")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]


def test_disruption_budget_and_autoscaler_keep_a_fleet() -> None:
    assert one("PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    hpa = one("HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] >= 2
    assert hpa["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]


# -- the Pod, run as processes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s_demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=1)
    yield up
    up.stop()


def _mapped(value: str, mounts: dict[str, Path]) -> str:
    """``value`` with each mount path that starts a path replaced by its local directory, in
    one pass (a local directory may itself start with a mount path, such as /tmp)."""
    names = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w/.-])({names})(?=/|$|\s)", re.MULTILINE)
    return pattern.sub(lambda found: str(mounts[found.group(1)]), value)


def _env(spec: dict[str, Any], secrets: dict[str, str], redis_url: str) -> dict[str, str]:
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": "/nonexistent"}
    for item in spec.get("env", []):
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[item["name"]] = secrets[source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = "checkstream-7d4f9-abcde"
        else:
            env[item["name"]] = item["value"]
    return env


@pytest.mark.e2e
def test_the_pods_containers_run_as_written_and_serve_a_request(
    tmp_path: Path, k8s_demo: DemoUpstreamThread, redis_server: RedisServer, postgres_url: str
) -> None:
    spec = pod_spec()
    mounts = {
        m["mountPath"]: tmp_path / m["name"]
        for c in spec["containers"] + spec["initContainers"]
        for m in c.get("volumeMounts", [])
    }
    for local in mounts.values():
        local.mkdir(exist_ok=True)
    # The ConfigMap as mounted, with this machine's ports, backend and Redis.
    files = configmap_files()
    config = yaml.safe_load(_mapped(files["checkstream.yaml"], mounts))
    ports = gateway_ports()
    config["server"].update(ports, host="127.0.0.1")
    config["server"]["trusted_networks"] = ["127.0.0.0/8"]  # the test's client, not a Pod
    for tenant in config["tenants"]["configs"].values():
        tenant["backend_url"] = f"http://127.0.0.1:{k8s_demo.port}/v1"
    (mounts["/etc/checkstream"] / "checkstream.yaml").write_text(yaml.safe_dump(config))
    for name, text in files.items():
        if name != "checkstream.yaml":
            (mounts["/etc/checkstream"] / name).write_text(text)
    secrets = {key: f"test-{key}" for key in one("Secret")["stringData"]}
    secrets["redis-url"] = redis_server.url
    secrets["usage-dsn"] = postgres_url

    def argv(name: str, command: list[str] | None = None) -> list[str]:
        c = container(name)
        return [_mapped(a, mounts) for a in (command or c["command"]) + c.get("args", [])]

    init = subprocess.run(
        argv("envoy-config"), env=_env(container("envoy-config"), secrets, redis_server.url),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("envoy", "extproc")}
    processes = {
        name: subprocess.Popen(
            argv(name),
            env=_env(container(name), secrets, redis_server.url),
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name in ("extproc", "envoy")
    }

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")

    def probe_ok(name: str, kind: str) -> bool:
        probe = container(name)[kind]
        if "httpGet" not in probe:
            return True  # tcpSocket: the HTTP probes below reach the same port
        port_name = probe["httpGet"]["port"]
        port = {"http": ports["port"], "admin": ports["admin_port"]}[port_name]
        try:
            return request(f"http://127.0.0.1:{port}{probe['httpGet']['path']}").status == 200
        except OSError:
            return False

    try:
        for name in ("extproc", "envoy"):
            for kind in ("readinessProbe", "livenessProbe"):
                assert wait_until(lambda n=name, k=kind: probe_ok(n, k), timeout=40), (
                    name, kind, log("extproc"), log("envoy"),
                )  # fmt: skip
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
        reply = request(
            f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
            body,
            {"X-Tenant-ID": "acme-corp"},
        )
        assert reply.status == 200, (reply.body, log("extproc"), log("envoy"))
        assert reply.json()["choices"][0]["message"]["content"]
        status = request(
            f"http://127.0.0.1:{ports['admin_port']}/admin/status",
            headers={"x-checkstream-admin-token": secrets["admin-token"]},
        )
        assert status.status == 200, status.body
        assert status.json()["replica"] == "checkstream-7d4f9-abcde"
        # A ConfigMap update of the policy reaches the extproc with no launcher around.
        version = status.json()["config_version"]
        policy = mounts["/etc/checkstream"] / "acme-policy.yaml"
        policy.write_text(policy.read_text().replace("action: redact", "action: block"))

        def status_now() -> dict[str, Any]:
            answer = request(
                f"http://127.0.0.1:{ports['admin_port']}/admin/status",
                headers={"x-checkstream-admin-token": secrets["admin-token"]},
            )
            data: dict[str, Any] = answer.json()
            return data

        assert wait_until(lambda: status_now()["config_version"] != version, timeout=5.0)
        assert status_now()["reload_error"] is None
        env = {**os.environ, "CHECKSTREAM_ADMIN_TOKEN": secrets["admin-token"]}
        fleet = subprocess.run(
            [str(BIN / "checkstream"), "fleet", "status", f"http://127.0.0.1:{ports['admin_port']}"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert fleet.returncode == 0, fleet.stdout + fleet.stderr
        assert status_now()["config_version"] in fleet.stdout
        # What the kubelet does at termination: each container's preStop, then SIGTERM.
        for name in ("envoy", "extproc"):
            hook = container(name)["lifecycle"]["preStop"]["exec"]["command"]
            done = subprocess.run(
                argv(name, hook), env=_env(container(name), secrets, redis_server.url),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        for name, process in processes.items():
            process.send_signal(signal.SIGTERM)
            assert process.wait(spec["terminationGracePeriodSeconds"]) == 0, (name, log(name))
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for handle in logs.values():
            handle.close()
