"""The ``checkstream`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from checkstream.cli import doctor
from checkstream.cli import init as starter
from checkstream.cli import keys as cli_keys
from checkstream.cli import tenants as cli_tenants
from checkstream.cli.classifiers import add_commands as add_classifier_commands
from checkstream.cli.options import DEFAULT_CONFIG, add_config_option
from checkstream.config.model import AuditConfig, LoadedConfig, load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.gateway.runtime import check_config
from checkstream.ops import logs
from checkstream.policy.registry import PluginError

# `audit verify`: the trail ends in a torn write (crash, full disk), not in tampering.
AUDIT_TORN = 3



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


def _no_config_hint(path: str) -> str:
    return (
        f"checkstream: {path}: file not found, so there is no config to run\n"
        "  to try CheckStream with a built-in backend (no API key): checkstream run --demo\n"
        "  to write a starter config here: checkstream init"
        " (then: checkstream run -c checkstream.yaml)"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from checkstream.demo.state import new_demo_state
    from checkstream.ops.launcher import phase, run_gateway

    started = time.monotonic()
    if args.config:
        path = args.config
    elif args.demo:
        # A fresh directory per run, so one try's usage never adds up with another's.
        path = str(new_demo_state(args.demo_port))
    else:
        path = DEFAULT_CONFIG
    if not Path(path).exists():
        print(_no_config_hint(path), file=sys.stderr)
        return 1
    loaded = _load(path)
    if loaded is None:
        return 1
    logs.configure(logs.resolve_format(loaded.model.server.log_format))
    if args.demo and not args.config:
        phase(started, "demo state for this run", directory=str(Path(path).parent))
    names = classifier_names(loaded)
    phase(
        started,
        "loading classifiers",
        config=path,
        tenants=len(loaded.model.tenants.configs),
        classifiers=", ".join(names),
    )
    # Compiled here too so a bad policy or plugin is reported once, before anything starts.
    if not _compile(loaded):
        return 1
    extra: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None = None
    if args.demo:
        from checkstream.demo import start_demo_upstream

        async def start_demo() -> Callable[[], Awaitable[None]]:
            upstream = await start_demo_upstream(
                "127.0.0.1", args.demo_port, args.demo_chunk_delay_ms
            )
            phase(
                started,
                "demo upstream started",
                url=f"http://127.0.0.1:{upstream.port}",
                formats="openai, anthropic",
                chunk_delay_ms=args.demo_chunk_delay_ms,
            )
            return upstream.close

        extra = start_demo
    return asyncio.run(run_gateway(loaded, extra_service=extra, started=started))


def classifier_names(loaded: LoadedConfig) -> list[str]:
    """The classifiers some tenant runs, in first-use order (what a worker will load)."""
    from checkstream.policy.guardrails import phase_classifiers

    model = loaded.model
    names: dict[str, None] = {}
    for tenant in model.tenants.configs.values():
        for phase, defaults in (
            (tenant.pipeline.ingress, model.pipeline.ingress),
            (tenant.pipeline.midstream, model.pipeline.midstream),
        ):
            names.update(dict.fromkeys(phase_classifiers(phase, defaults, tenant.classifiers)))
    return list(names)


def _cmd_serve(args: argparse.Namespace) -> int:
    from checkstream.gateway.server import serve

    loaded = _load(args.config)
    if loaded is None:
        return 1
    worker = os.environ.get(logs.WORKER_ENV, "")
    logs.configure(
        logs.resolve_format(loaded.model.server.log_format),
        worker=int(worker) if worker.isdigit() else None,
    )
    port = args.port if args.port is not None else loaded.model.server.extproc_port
    control = Path(args.control_dir) if args.control_dir else None
    try:
        asyncio.run(serve(loaded, args.host, port, control, admin=args.admin))
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return 1
    except (OSError, PluginError) as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_classifiers_serve(args: argparse.Namespace) -> int:
    from checkstream.policy.classifier_server import servable_classifiers, serve

    # No secrets needed: this process scores texts and never calls a tenant's backend.
    loaded = _load(args.config, require_secrets=False)
    if loaded is None:
        return 1
    logs.configure(logs.resolve_format(loaded.model.server.log_format))
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
    from checkstream.ops.envoy_config import render_yaml

    loaded = _load(args.config, require_secrets=False)
    if loaded is None:
        return 1
    rendered = render_yaml(loaded.model)
    if args.output is None:
        sys.stdout.write(rendered)
    else:
        Path(args.output).write_text(rendered)
    return 0


def _cmd_envoy_drain(args: argparse.Namespace) -> int:
    from checkstream.ops.launcher import drain_envoy

    loaded = _load(args.config, require_secrets=False)
    if loaded is None:
        return 1
    server = loaded.model.server
    asyncio.run(drain_envoy(server.envoy_admin_port, server.drain_timeout_s))
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    if args.file is not None and args.config is not None and args.file != args.config:
        print("checkstream: give the config once: FILE or -c FILE", file=sys.stderr)
        return 2
    path = args.file or args.config or DEFAULT_CONFIG
    loaded = _load(path, require_secrets=False)
    if loaded is None or not _compile(loaded):
        return 1
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    tenants = loaded.model.tenants.configs
    policies = len(loaded.policies)
    print(
        f"{path}: OK ({len(tenants)} tenant{'s' * (len(tenants) != 1)}, "
        f"{policies} policy file{'s' * (policies != 1)})"
    )
    return 0


def _cmd_policy_lint(args: argparse.Namespace) -> int:
    from checkstream.policy.files import lint_policy_file
    from checkstream.policy.registry import load_registry

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
    from checkstream.ledger.backends import read_report
    from checkstream.ledger.usage import UsageError, render

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
        rows = read_report(
            loaded,
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
    from checkstream.audit.trail import resolve_audit_dirs

    try:
        return resolve_audit_dirs(loaded)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return None


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from checkstream.audit.verify import verify_chains

    loaded: LoadedConfig | None = None
    if args.tenant is None:
        if args.against_usage:
            print("checkstream: --against-usage needs --tenant (and -c)", file=sys.stderr)
            return 2
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
    results = verify_chains(directory)
    broken = {chain: result for chain, result in results.items() if not result.ok}
    for result in broken.values():
        # A torn last line is a crash or a full disk, not tampering: said so, its own code.
        print(f"{'TORN' if result.torn else 'BROKEN'}: {result.problem}")
    if not broken:
        records = sum(result.records for result in results.values())
        files = sum(result.files for result in results.values())
        print(f"ok: {_count(records, 'record')} in {_count(files, 'file')}")
    # Several replicas (or a trail from before replicas beside theirs): each chain on its own
    # line ("" is the single-replica layout).
    if len(results) > 1:
        for chain, result in results.items():
            name = f"replica {chain}" if chain else "single-replica trail"
            state = "ok" if result.ok else "TORN" if result.torn else "BROKEN"
            print(
                f"  {name}: {state}, {_count(result.records, 'record')} "
                f"in {_count(result.files, 'file')}"
            )
    if broken:
        return AUDIT_TORN if all(result.torn for result in broken.values()) else 1
    if args.against_usage:
        assert loaded is not None
        return _against_usage(loaded, args.tenant, directory)
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _against_usage(loaded: LoadedConfig, tenant: str, directory: Path) -> int:
    from checkstream.audit.completeness import check_against_ledger, iso
    from checkstream.ledger.backends import read_request_times
    from checkstream.ledger.usage import UsageError

    if not loaded.model.usage.enabled:
        print("checkstream: usage is disabled in this config: no ledger to check against",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        found = check_against_ledger(
            directory, lambda since: read_request_times(loaded, tenant, since)
        )
    except UsageError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    window = f"since {iso(found.since)}" if found.since is not None else "(the trail is empty)"
    if not found.missing:
        print(f"usage: all {_count(found.checked, 'ledger request')} {window} are in the trail")
        return 0
    print(
        f"MISSING: {len(found.missing)} of {_count(found.checked, 'ledger request')} {window} "
        "have no audit request record:"
    )
    for rid, moment in found.missing:
        print(f"  {rid} {iso(moment)}")
    return 1


def _cmd_audit_prune(args: argparse.Namespace) -> int:
    from checkstream.audit.trail import prune_trail

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


def _cmd_fleet_status(args: argparse.Namespace) -> int:
    from checkstream.ops.admin import admin_token_from_env
    from checkstream.ops.fleet import fleet_status, render

    table, ok = render(fleet_status(args.urls, admin_token_from_env()))
    sys.stdout.write(table)
    return 0 if ok else 1


def _version() -> str:
    try:
        return version("checkstream")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkstream", description="Multi-tenant guardrail gateway for LLM traffic."
    )
    parser.add_argument(
        "--version", action="version", version=f"checkstream {_version()}", help="print version"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start Envoy and extproc and supervise them")
    add_config_option(run, default=None)
    run.add_argument(
        "--demo",
        action="store_true",
        help="also start the built-in demo upstream; without -c, serve the bundled demo config "
        "with its state in a fresh temporary directory",
    )
    run.add_argument(
        "--demo-port", type=int, default=9001, metavar="N", help="demo upstream port (9001)"
    )
    run.add_argument(
        "--demo-chunk-delay-ms",
        type=float,
        default=40.0,
        metavar="MS",
        help="demo delay between streamed chunks (40)",
    )
    run.set_defaults(handler=_cmd_run)

    starter.register(commands)
    doctor.register(commands)

    serve = commands.add_parser("serve", help="run one extproc worker (run starts these)")
    add_config_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument(
        "--port", type=int, metavar="N", help="port to bind (default: server.extproc_port)"
    )
    # Set by `run`: where the launcher leaves reload and suspension orders (reloading.py).
    serve.add_argument("--control-dir", help=argparse.SUPPRESS)
    serve.add_argument(
        "--admin",
        action="store_true",
        help="also serve the admin API on server.admin_port (no `run` launcher: a sidecar)",
    )
    serve.set_defaults(handler=_cmd_serve)

    classifiers = commands.add_parser("classifiers", help="classifiers for other gateways")
    classifiers_commands = classifiers.add_subparsers(
        dest="classifiers_command", required=True, metavar="COMMAND"
    )
    classifiers_serve = classifiers_commands.add_parser(
        "serve",
        help="serve this config's classifiers over gRPC, for `type: remote` classifiers",
    )
    add_config_option(classifiers_serve)
    classifiers_serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (127.0.0.1)"
    )
    # Literal, not DEFAULT_PORT from checkstream.policy.classifier_server: importing it would
    # load grpc and the
    # generated modules for every command.
    classifiers_serve.add_argument(
        "--port", type=int, default=50061, metavar="N", help="port to bind (50061)"
    )
    classifiers_serve.set_defaults(handler=_cmd_classifiers_serve)
    add_classifier_commands(classifiers_commands)

    envoy = commands.add_parser("envoy", help="Envoy configuration")
    envoy_commands = envoy.add_subparsers(dest="envoy_command", required=True, metavar="COMMAND")
    render = envoy_commands.add_parser("render", help="print the Envoy bootstrap run uses")
    add_config_option(render)
    render.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    render.set_defaults(handler=_cmd_envoy_render)
    drain = envoy_commands.add_parser(
        "drain",
        help="stop Envoy taking connections and wait (up to server.drain_timeout_s) until "
        "no request is in flight: a Kubernetes preStop hook",
    )
    add_config_option(drain)
    drain.set_defaults(handler=_cmd_envoy_drain)

    config = commands.add_parser("config", help="configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_commands.add_parser("check", help="validate a config and its policy files")
    check.add_argument("file", nargs="?", metavar="FILE", help="config file (the same as -c FILE)")
    add_config_option(check, default=None)
    check.set_defaults(handler=_cmd_config_check)

    policy = commands.add_parser("policy", help="policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    lint = policy_commands.add_parser("lint", help="check policy files: file:line: message")
    lint.add_argument("files", nargs="+", metavar="FILE", help="policy files to check")
    lint.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="also accept the classifier instances this config defines",
    )
    lint.set_defaults(handler=_cmd_policy_lint)

    usage = commands.add_parser("usage", help="tokens and cost per tenant for one month")
    add_config_option(usage)
    who = usage.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", metavar="ID", help="one tenant")
    who.add_argument("--all-tenants", action="store_true", help="every tenant, one row each")
    usage.add_argument("--period", required=True, metavar="YYYY-MM", help="a UTC month")
    usage.add_argument("--by", choices=["model"], help="one row per model")
    usage.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="output format (table); costs are the same exact decimals in all three",
    )
    usage.set_defaults(handler=_cmd_usage)

    audit = commands.add_parser("audit", help="per-tenant audit trails")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    audit_verify = audit_commands.add_parser(
        "verify", help="check a trail's hash chain: ok, or the first broken record"
    )
    which = audit_verify.add_mutually_exclusive_group(required=True)
    which.add_argument("path", nargs="?", help="a trail directory")
    which.add_argument("--tenant", metavar="ID", help="this tenant's trail, per the config")
    add_config_option(audit_verify)
    audit_verify.add_argument(
        "--against-usage",
        action="store_true",
        help="also check that every request in the usage ledger has its audit record",
    )
    audit_verify.set_defaults(handler=_cmd_audit_verify)
    audit_prune = audit_commands.add_parser(
        "prune", help="remove audit files past each tenant's retention_days"
    )
    add_config_option(audit_prune)
    audit_prune.set_defaults(handler=_cmd_audit_prune)

    fleet = commands.add_parser("fleet", help="several replicas of one gateway")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True)
    fleet_status = fleet_commands.add_parser(
        "status", help="each replica's config version, health and drift (admin token from env)"
    )
    fleet_status.add_argument("urls", nargs="+", metavar="URL", help="admin base URLs")
    fleet_status.set_defaults(handler=_cmd_fleet_status)
    cli_keys.register(commands)
    cli_tenants.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
