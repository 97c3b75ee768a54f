"""``checkstream keys new|list``: hashed CheckStream keys (CLI).

A new key is printed once and stored nowhere: the config gets only its SHA-256 digest.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, date, datetime

import yaml

from checkstream.cli.options import add_config_option
from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.tenants.keyindex import entry_for, new_key, stored_keys

# Enough of a digest to tell keys apart in a listing, far too little to test guesses against.
_DIGEST_SHOWN = 8


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="hashed CheckStream API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser("new", help="make a key: printed once, with its YAML entry")
    new.add_argument("--tenant", required=True, metavar="ID", help="the tenant the key is for")
    new.add_argument("--name", required=True, help="what the key is for (ci, app-prod, ...)")
    new.add_argument("--expires", type=_future_date, metavar="YYYY-MM-DD", help="last valid day")
    new.add_argument("-c", "--config", help="also check the tenant exists and the name is free")
    new.set_defaults(handler=_cmd_new)
    listing = keys_commands.add_parser("list", help="keys per tenant: name, expiry, status")
    add_config_option(listing)
    listing.set_defaults(handler=_cmd_list)


def _future_date(text: str) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None
    if day < datetime.now(UTC).date():
        raise argparse.ArgumentTypeError(f"{text} is in the past")
    return day


def key_entry_yaml(name: str, key: str, expires: date | None) -> str:
    entry = entry_for(name, key, expires).model_dump(exclude_none=True)
    return yaml.safe_dump([entry], sort_keys=False)


def _cmd_new(args: argparse.Namespace) -> int:
    if args.config is not None:
        try:
            loaded = load_config(args.config, require_secrets=False)
        except ConfigError as exc:
            print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
            return 1
        tenant = loaded.model.tenants.configs.get(args.tenant)
        if tenant is None:
            print(f"checkstream: unknown tenant '{args.tenant}' in {loaded.path}", file=sys.stderr)
            return 1
        if any(entry.name == args.name for entry in tenant.api_keys):
            print(
                f"checkstream: tenant '{args.tenant}' already has a key named '{args.name}'",
                file=sys.stderr,
            )
            return 1
    key = new_key()
    print(f"API key for tenant '{args.tenant}' (shown once, stored nowhere):")
    print(key)
    print()
    print(f"Add this entry to tenants.configs.{args.tenant}.api_keys:")
    sys.stdout.write(key_entry_yaml(args.name, key, args.expires))
    return 0


def _expiry_label(expires: date | datetime | None) -> str:
    if expires is None:
        return "never"
    if isinstance(expires, datetime):
        aware = expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)
        return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"end of {expires.isoformat()} UTC"


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.config, require_secrets=False)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return 1
    now = time.time()
    rows = [("TENANT", "NAME", "STORED", "EXPIRES", "STATUS", "DIGEST")]
    for key in stored_keys(loaded.model):
        expires = _expiry_label(key.expires)
        status = "expired" if key.expires_at is not None and now >= key.expires_at else "active"
        stored = "plaintext" if key.plaintext else "sha256"
        digest = "-" if key.plaintext else key.digest[:_DIGEST_SHOWN] + "…"
        rows.append((key.tenant, key.name, stored, expires, status, digest))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
