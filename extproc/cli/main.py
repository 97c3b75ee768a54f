"""The ``checkstream`` command line: its parser and ``main`` (CLI process).

Each command group registers itself from the module beside this one (``gateway.py``,
``audit.py``, ``usage.py``, ``keys.py``, ...); the small config commands live here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from checkstream.cli import audit, doctor, gateway, usage
from checkstream.cli import init as starter
from checkstream.cli import keys as cli_keys
from checkstream.cli import plugins as cli_plugins
from checkstream.cli import tenants as cli_tenants
from checkstream.cli.classifiers import add_commands as add_classifier_commands
from checkstream.cli.options import (
    DEFAULT_CONFIG,
    add_config_option,
    compile_or_report,
    load_or_report,
)
from checkstream.policy.registry import PluginError


def _cmd_config_check(args: argparse.Namespace) -> int:
    if args.file is not None and args.config is not None and args.file != args.config:
        print("checkstream: give the config once: FILE or -c FILE", file=sys.stderr)
        return 2
    path = args.file or args.config or DEFAULT_CONFIG
    loaded = load_or_report(path, require_secrets=False)
    if loaded is None or not compile_or_report(loaded):
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
        loaded = load_or_report(args.config, require_secrets=False)
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

    gateway.register_run(commands)

    starter.register(commands)
    doctor.register(commands)

    gateway.register_serve(commands)

    classifiers = commands.add_parser("classifiers", help="classifiers for other gateways")
    classifiers_commands = classifiers.add_subparsers(
        dest="classifiers_command", required=True, metavar="COMMAND"
    )
    gateway.register_classifiers_serve(classifiers_commands)
    add_classifier_commands(classifiers_commands)

    gateway.register_envoy(commands)

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

    usage.register(commands)
    audit.register(commands)

    fleet = commands.add_parser("fleet", help="several replicas of one gateway")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True)
    fleet_status = fleet_commands.add_parser(
        "status", help="each replica's config version, health and drift (admin token from env)"
    )
    fleet_status.add_argument("urls", nargs="+", metavar="URL", help="admin base URLs")
    fleet_status.set_defaults(handler=_cmd_fleet_status)
    cli_keys.register(commands)
    cli_tenants.register(commands)
    cli_plugins.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
