"""``checkstream tenants new|export|purge``: a tenant's onboarding and offboarding (CLI)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checkstream.audit.trail import resolve_audit_dirs
from checkstream.cli.options import add_config_option
from checkstream.config.model import LoadedConfig, load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.gateway.runtime import check_config
from checkstream.ledger.usage import UsageError
from checkstream.policy.registry import PluginError
from checkstream.tenants.keyindex import new_key
from checkstream.tenants.ledger_rows import LedgerRows, LedgerRowsError, ledger_rows
from checkstream.tenants.offboarding import OffboardingError, export_tenant, purge_tenant
from checkstream.tenants.onboarding import (
    OnboardingError,
    add_tenant,
    load_template,
    policy_text,
    template_names,
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenants = commands.add_parser("tenants", help="onboard and offboard tenants")
    sub = tenants.add_subparsers(dest="tenants_command", required=True)

    new = sub.add_parser("new", help="add a tenant and its policy from a shipped template")
    new.add_argument("name", metavar="NAME", help="the tenant id")
    add_config_option(new)
    new.add_argument(
        "--template", required=True, choices=template_names(), help="policy template to start from"
    )
    new.add_argument("--backend-url", required=True, metavar="URL", help="the tenant's LLM backend")
    new.add_argument(
        "--format",
        choices=["openai", "anthropic"],
        default="openai",
        help="the API its clients speak (default openai)",
    )
    new.add_argument("--token-env", metavar="VAR", help="managed auth: the backend key's env var")
    new.add_argument("--key-name", default="first", help="name of the first API key (first)")
    new.set_defaults(handler=_cmd_new)

    export = sub.add_parser("export", help="a tenant's usage, audit trail and checksums")
    add_config_option(export)
    export.add_argument("--tenant", required=True, metavar="ID", help="the tenant to export")
    export.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory")
    export.set_defaults(handler=_cmd_export)

    purge = sub.add_parser("purge", help="delete a tenant's ledger rows and audit files")
    add_config_option(purge)
    purge.add_argument("--tenant", required=True, metavar="ID", help="the tenant to purge")
    purge.add_argument("--export", metavar="DIR", help="its export; must hold all that goes")
    purge.add_argument("--yes", action="store_true", help="really delete")
    purge.add_argument(
        "--force",
        action="store_true",
        help="even if the tenant is still configured or no export is given",
    )
    purge.set_defaults(handler=_cmd_purge)


def _fail(message: str) -> int:
    print(f"checkstream: {message}", file=sys.stderr)
    return 1


def _cmd_new(args: argparse.Namespace) -> int:
    path = Path(args.config)
    try:
        original = path.read_text()
    except OSError as exc:
        return _fail(f"{path}: {exc.strerror}")
    policy_rel = f"policies/{args.name}.yaml"
    policy_file = path.parent / policy_rel
    if policy_file.exists():
        return _fail(f"{policy_file} already exists")
    key = new_key()
    try:
        template = load_template(args.template)
        updated = add_tenant(
            original,
            args.name,
            template,
            backend_url=args.backend_url,
            streaming_format=args.format,
            policy_path=f"./{policy_rel}",
            key_name=args.key_name,
            key=key,
            token_env=args.token_env,
        )
    except OnboardingError as exc:
        return _fail(f"{path}: {exc}")
    policy_file.parent.mkdir(parents=True, exist_ok=True)
    policy_file.write_text(policy_text(template, args.name))
    path.write_text(updated)
    # The new config must pass the same check `config check` runs, or nothing changes.
    problem = _check(path)
    if problem is not None:
        path.write_text(original)
        policy_file.unlink()
        print(problem, file=sys.stderr)
        return _fail(f"tenant '{args.name}' not added: {path} is as it was")
    print(f"tenant '{args.name}' added to {path} from template '{args.template}'")
    print(f"policy: {policy_file}")
    print(f"API key '{args.key_name}' (shown once, stored nowhere; its digest is in the config):")
    print(key)
    loaded = load_config(path, require_secrets=False)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    tenants, policies = len(loaded.model.tenants.configs), len(loaded.policies)
    print(
        f"config check: {path}: OK ({tenants} tenant{'s' * (tenants != 1)}, "
        f"{policies} policy file{'s' * (policies != 1)})"
    )
    return 0


def _check(path: Path) -> str | None:
    try:
        check_config(load_config(path, require_secrets=False))
    except ConfigError as exc:
        return f"checkstream: invalid configuration\n{exc}"
    except PluginError as exc:
        return f"checkstream: {exc}"
    return None


def _stores(args: argparse.Namespace) -> tuple[LoadedConfig, LedgerRows, Path | None] | str:
    """The config, the usage ledger and the tenant's audit trail directory (if any)."""
    try:
        loaded = load_config(args.config, require_secrets=False)
        audited = resolve_audit_dirs(loaded)
    except ConfigError as exc:
        return f"invalid configuration\n{exc}"
    if args.tenant in audited:
        trail: Path | None = audited[args.tenant][0]
    else:
        # No longer configured (or audit turned off): the default place, if a trail is there.
        default = loaded.path.parent / "audit" / args.tenant
        trail = default if default.is_dir() else None
    try:
        ledger = ledger_rows(loaded)
    except UsageError as exc:
        return str(exc)
    return loaded, ledger, trail


def _cmd_export(args: argparse.Namespace) -> int:
    found = _stores(args)
    if isinstance(found, str):
        return _fail(found)
    _loaded, ledger, trail = found
    try:
        done = export_tenant(args.tenant, ledger, trail, Path(args.out))
    except (OffboardingError, LedgerRowsError) as exc:
        return _fail(str(exc))
    print(
        f"exported tenant '{args.tenant}' to {done.directory}: {done.usage_rows} usage rows, "
        f"{done.audit_files} audit files ({done.audit_records} records)"
    )
    print(f"manifest sha256: {done.manifest_sha256}")
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    found = _stores(args)
    if isinstance(found, str):
        return _fail(found)
    loaded, ledger, trail = found
    if args.tenant in loaded.model.tenants.configs and not args.force:
        return _fail(
            f"tenant '{args.tenant}' is still in {loaded.path}: remove it (and reload) first, "
            "or pass --force"
        )
    if args.export is None and not args.force:
        return _fail("give --export DIR (from `checkstream tenants export`), or pass --force")
    if not args.yes:
        return _fail(f"this deletes tenant '{args.tenant}''s usage rows and audit files: add --yes")
    export = Path(args.export) if args.export is not None else None
    try:
        done = purge_tenant(args.tenant, ledger, trail, export)
    except (OffboardingError, LedgerRowsError) as exc:
        return _fail(str(exc))
    print(
        f"purged tenant '{args.tenant}': {done.usage_rows} usage rows, "
        f"{done.audit_files} audit files; recorded in {ledger} (table purges)"
    )
    return 0
