"""``checkstream audit verify|prune``: check a tenant's hash-chained trail (against the usage
ledger too) and remove files past retention (CLI process).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from checkstream.cli.options import add_config_option, load_or_report
from checkstream.config.model import AuditConfig, LoadedConfig
from checkstream.config.yamlsource import ConfigError

# `audit verify`: the trail ends in a torn write (crash, full disk), not in tampering.
AUDIT_TORN = 3


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        loaded = load_or_report(args.config, require_secrets=False)
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

    loaded = load_or_report(args.config, require_secrets=False)
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
