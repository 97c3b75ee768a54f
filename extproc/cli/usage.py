"""``checkstream usage``: tokens and cost per tenant for one month, from the ledger (CLI
process).
"""

from __future__ import annotations

import argparse
import sys

from checkstream.cli.options import add_config_option, load_or_report


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _cmd_usage(args: argparse.Namespace) -> int:
    from checkstream.ledger.backends import read_report
    from checkstream.ledger.usage import UsageError, render

    loaded = load_or_report(args.config, require_secrets=False)
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
