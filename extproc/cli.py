"""The ``checkstream`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

from extproc.classifier_cli import add_commands as add_classifier_commands
from extproc.config import AuditConfig, LoadedConfig, load_config
from extproc.registry import PluginError
from extproc.runtime import check_config
from extproc.yamlsource import ConfigError

DEFAULT_CONFIG = "./checkstream.yaml"


def demo_config_path() -> Path:
    return Path(str(files("extproc") / "demo" / "checkstream.yaml"))


def _load(path: str, *, require_secrets: bool = True) -> LoadedConfig | None:
    try:
        return load_config(path, require_secrets=require_secrets)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return None


def _compile(loaded: LoadedConfig) -> bool:
    """Plugins, classifiers and policies; their errors are the user's, so no traceback."""
    try:
        check_config(loaded)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
    else:
        return True
    return False


def _cmd_run(args: argparse.Namespace) -> int:
    from extproc.launcher import run_gateway

    path = args.config or (str(demo_config_path()) if args.demo else DEFAULT_CONFIG)
    loaded = _load(path)
    # Compiled here too so a bad policy or plugin is reported once, before anything starts.
    if loaded is None or not _compile(loaded):
        return 1
    extra: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None = None
    if args.demo:
        from extproc.demo_upstream import start_demo_upstream

        async def start_demo() -> Callable[[], Awaitable[None]]:
            upstream = await start_demo_upstream(
                "127.0.0.1", args.demo_port, args.demo_chunk_delay_ms
            )
            print(
                f"checkstream: demo upstream on http://127.0.0.1:{upstream.port} "
                f"(OpenAI and Anthropic compatible, {args.demo_chunk_delay_ms:g} ms per chunk)",
                file=sys.stderr,
                flush=True,
            )
            return upstream.close

        extra = start_demo
    return asyncio.run(run_gateway(loaded, extra_service=extra))


def _cmd_serve(args: argparse.Namespace) -> int:
    from extproc.server import serve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = _load(args.config)
    if loaded is None:
        return 1
    port = args.port if args.port is not None else loaded.model.server.extproc_port
    control = Path(args.control_dir) if args.control_dir else None
    try:
        asyncio.run(serve(loaded, args.host, port, control))
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return 1
    except (OSError, PluginError) as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_classifiers_serve(args: argparse.Namespace) -> int:
    from extproc.remote import servable_classifiers, serve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # No secrets needed: this process scores texts and never calls a tenant's backend.
    loaded = _load(args.config, require_secrets=False)
    if loaded is None:
        return 1
    try:
        classifiers = servable_classifiers(loaded)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return 1
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(classifiers, args.host, args.port))
    except OSError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_envoy_render(args: argparse.Namespace) -> int:
    from extproc.envoy_config import render_yaml

    loaded = _load(args.config, require_secrets=False)
    if loaded is None:
        return 1
    sys.stdout.write(render_yaml(loaded.model))
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    loaded = _load(args.file, require_secrets=False)
    if loaded is None or not _compile(loaded):
        return 1
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    tenants = loaded.model.tenants.configs
    policies = len(loaded.policies)
    print(
        f"{args.file}: OK ({len(tenants)} tenant{'s' * (len(tenants) != 1)}, "
        f"{policies} policy file{'s' * (policies != 1)})"
    )
    return 0


def _cmd_policy_lint(args: argparse.Namespace) -> int:
    from extproc.policy import lint_policy_file
    from extproc.registry import load_registry

    try:
        known = set(load_registry().types)
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    if args.config:
        loaded = _load(args.config, require_secrets=False)
        if loaded is None:
            return 1
        known |= set(loaded.model.classifiers)
    failed = False
    for name in args.files:
        problems = lint_policy_file(Path(name), known)
        for problem in problems:
            print(problem, file=sys.stderr)
        failed = failed or bool(problems)
        if not problems:
            print(f"{name}: OK")
    return 1 if failed else 0


def _cmd_usage(args: argparse.Namespace) -> int:
    from extproc.usage import UsageError, render, report, resolve_usage_path

    loaded = _load(args.config, require_secrets=False)
    if loaded is None:
        return 1
    if args.tenant is not None and args.tenant not in loaded.model.tenants.configs:
        print(
            f"checkstream: unknown tenant '{args.tenant}' (not in tenants.configs of "
            f"{loaded.path})",
            file=sys.stderr,
        )
        return 1
    try:
        rows = report(
            resolve_usage_path(loaded),
            tenant=args.tenant,
            period=args.period,
            by_model=args.by == "model",
        )
    except UsageError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render(rows, args.format))
    return 0


def _audit_dirs(loaded: LoadedConfig) -> dict[str, tuple[Path, AuditConfig]] | None:
    from extproc.audit import resolve_audit_dirs

    try:
        return resolve_audit_dirs(loaded)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return None


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from extproc.audit import verify

    if args.tenant is None:
        directory = Path(args.path)
    else:
        loaded = _load(args.config, require_secrets=False)
        dirs = _audit_dirs(loaded) if loaded is not None else None
        if loaded is None or dirs is None:
            return 1
        if args.tenant not in dirs:
            why = (
                "has no audit trail (its audit is absent or disabled)"
                if args.tenant in loaded.model.tenants.configs
                else "is unknown (not in tenants.configs)"
            )
            print(f"checkstream: tenant '{args.tenant}' {why} in {loaded.path}", file=sys.stderr)
            return 1
        directory = dirs[args.tenant][0]
    if not directory.is_dir():
        print(f"checkstream: no audit trail at {directory}", file=sys.stderr)
        return 1
    result = verify(directory)
    if not result.ok:
        print(f"BROKEN: {result.problem}")
        return 1
    print(
        f"ok: {result.records} record{'s' * (result.records != 1)} "
        f"in {result.files} file{'s' * (result.files != 1)}"
    )
    return 0


def _cmd_audit_prune(args: argparse.Namespace) -> int:
    from extproc.audit import prune_trail

    loaded = _load(args.config, require_secrets=False)
    dirs = _audit_dirs(loaded) if loaded is not None else None
    if dirs is None:
        return 1
    today = datetime.now(UTC).date()
    removed = 0
    for tenant, (directory, audit) in dirs.items():
        if not directory.is_dir():
            continue  # no traffic yet: nothing to prune
        for path in prune_trail(directory, audit.retention_days, today):
            print(f"{tenant}: removed {path}")
            removed += 1
    tenants = len(dirs)
    print(
        f"pruned {removed} file{'s' * (removed != 1)} "
        f"from {tenants} audited tenant{'s' * (tenants != 1)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkstream", description="Multi-tenant guardrail gateway for LLM traffic."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start Envoy and extproc and supervise them")
    run.add_argument("-c", "--config", help=f"config file (default {DEFAULT_CONFIG})")
    run.add_argument(
        "--demo",
        action="store_true",
        help="also start the built-in demo upstream; without -c, use the bundled demo config",
    )
    run.add_argument("--demo-port", type=int, default=9001, help="demo upstream port (9001)")
    run.add_argument(
        "--demo-chunk-delay-ms", type=float, default=40.0, help="demo delay per streamed chunk"
    )
    run.set_defaults(handler=_cmd_run)

    serve = commands.add_parser("serve", help="run one extproc worker (run starts these)")
    serve.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, help="default: server.extproc_port")
    # Set by `run`: where the launcher leaves reload and suspension orders (reloading.py).
    serve.add_argument("--control-dir", help=argparse.SUPPRESS)
    serve.set_defaults(handler=_cmd_serve)

    classifiers = commands.add_parser("classifiers", help="classifiers for other gateways")
    classifiers_commands = classifiers.add_subparsers(dest="classifiers_command", required=True)
    classifiers_serve = classifiers_commands.add_parser(
        "serve",
        help="serve this config's classifiers over gRPC, for `type: remote` classifiers",
    )
    classifiers_serve.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    classifiers_serve.add_argument("--host", default="127.0.0.1")
    # Literal, not DEFAULT_PORT from extproc.remote: importing it would load grpc and the
    # generated modules for every command.
    classifiers_serve.add_argument("--port", type=int, default=50061, help="default: 50061")
    classifiers_serve.set_defaults(handler=_cmd_classifiers_serve)
    add_classifier_commands(classifiers_commands)

    envoy = commands.add_parser("envoy", help="Envoy configuration")
    envoy_commands = envoy.add_subparsers(dest="envoy_command", required=True)
    render = envoy_commands.add_parser("render", help="print the Envoy bootstrap run uses")
    render.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    render.set_defaults(handler=_cmd_envoy_render)

    config = commands.add_parser("config", help="configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config and its policy files")
    check.add_argument("file")
    check.set_defaults(handler=_cmd_config_check)

    policy = commands.add_parser("policy", help="policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    lint = policy_commands.add_parser("lint", help="check policy files: file:line: message")
    lint.add_argument("files", nargs="+", metavar="FILE")
    lint.add_argument(
        "-c", "--config", help="also accept the classifier instances this config defines"
    )
    lint.set_defaults(handler=_cmd_policy_lint)

    usage = commands.add_parser("usage", help="tokens and cost per tenant for one month")
    usage.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    who = usage.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", metavar="ID", help="one tenant")
    who.add_argument("--all-tenants", action="store_true", help="every tenant, one row each")
    usage.add_argument("--period", required=True, metavar="YYYY-MM", help="a UTC month")
    usage.add_argument("--by", choices=["model"], help="one row per model")
    usage.add_argument("--format", choices=["table", "json", "csv"], default="table")
    usage.set_defaults(handler=_cmd_usage)

    audit = commands.add_parser("audit", help="per-tenant audit trails")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_commands.add_parser(
        "verify", help="check a trail's hash chain: ok, or the first broken record"
    )
    which = audit_verify.add_mutually_exclusive_group(required=True)
    which.add_argument("path", nargs="?", help="a trail directory")
    which.add_argument("--tenant", metavar="ID", help="this tenant's trail, per the config")
    audit_verify.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    audit_verify.set_defaults(handler=_cmd_audit_verify)
    audit_prune = audit_commands.add_parser(
        "prune", help="remove audit files past each tenant's retention_days"
    )
    audit_prune.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    audit_prune.set_defaults(handler=_cmd_audit_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
