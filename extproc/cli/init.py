"""``checkstream init [DIR]``: write a commented starter config and policy (CLI process).

The starter is one tenant on an OpenAI-compatible backend with a PII redaction rule, a
keyword rule and usage accounting on; it passes ``checkstream config check`` as written.
Existing files are never overwritten unless asked (``--force``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from checkstream.tenants.keyindex import digest_of, new_key

CONFIG_NAME: Final = "checkstream.yaml"
POLICY_PATH: Final = "policies/default.yaml"

STARTER_CONFIG: Final = """\
# CheckStream starter config, written by `checkstream init`.
# Check it:  checkstream config check -c checkstream.yaml
# Diagnose:  checkstream doctor -c checkstream.yaml
# Run it:    checkstream run -c checkstream.yaml
# Every key: README.md ("Configuration") and docs/operations.md.

server:
  host: 127.0.0.1          # 0.0.0.0 to accept clients from other machines
  port: 8080               # where clients send OpenAI / Anthropic API calls
  admin_port: 9090         # /metrics, /readyz, /admin/* (token: CHECKSTREAM_ADMIN_TOKEN)

limits: {backend: memory}  # one process; several replicas share limits through Redis:
                           # {backend: redis, url: "redis://127.0.0.1:6379/0"}

usage:                     # one row per request: `checkstream usage -c checkstream.yaml ...`
  enabled: true
  path: ./checkstream-usage.db   # relative to this file

pricing:                   # USD per million tokens; models without a price cost 0
  gpt-4o-mini: {input: 0.15, output: 0.60}
  gpt-4o: {input: 2.50, output: 10.00}

classifiers:               # named classifier instances; built-in types need no entry
  banned_terms: {type: keyword, terms: ["project falcon", "internal only"]}

tenants:
  resolution:              # how a request finds its tenant, tried in order
    - api_key_mapping: true          # Authorization: Bearer <key> or x-api-key
  # No default_tenant: a request without a known key is refused. Hand out more keys with
  # `checkstream keys new --tenant default --name NAME`; only their SHA-256 is stored here.
  configs:
    default:
      api_keys:
        - {name: first, sha256: "$DIGEST"}   # the key `checkstream init` printed once
      # Any OpenAI-compatible backend: OpenAI, vLLM (http://host:8000/v1), Ollama
      # (http://127.0.0.1:11434/v1), or the built-in demo (`checkstream run --demo`).
      backend_url: "https://api.openai.com/v1"
      streaming_format: openai       # openai | anthropic (also the shape of error bodies)
      auth:                          # the backend key, read from the environment at start
        type: bearer
        token_env: OPENAI_API_KEY
      classifiers: [pii_detector, banned_terms]   # checked on prompts and on answers
      policy_path: ./policies/default.yaml        # what to do when one fires
      rate_limit: {requests_per_minute: 600}
"""

STARTER_POLICY: Final = """\
# What the default tenant does when a classifier fires (written by `checkstream init`).
# Actions: log (record only) | redact (rewrite the text) | block (refuse the prompt) |
# stop (end a streamed answer). Lint it: checkstream policy lint -c checkstream.yaml FILE
version: "1.0"
name: default-policy
policies:
  - name: mask_pii
    trigger: {classifier: pii_detector}        # threshold from the tenant, then the global one
    action: redact                             # emails, phones, cards... become [REDACTED:EMAIL]
  - name: no_internal_terms
    trigger: {classifier: banned_terms, threshold: 0.5}
    action: block                              # prompts: 400 content_policy_violation
    regulation: "internal: confidential codenames"
"""


def write_starter(directory: Path, *, force: bool, key: str) -> list[Path]:
    """Write the starter files into ``directory``, the config holding only the SHA-256 of
    ``key``; raise FileExistsError naming the first file that exists (unless ``force``)."""
    config = STARTER_CONFIG.replace("$DIGEST", digest_of(key))
    files = {directory / CONFIG_NAME: config, directory / POLICY_PATH: STARTER_POLICY}
    if not force:
        for path in files:
            if path.exists():
                raise FileExistsError(path)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


def _cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        key = new_key()
        written = write_starter(directory, force=args.force, key=key)
    except FileExistsError as exc:
        print(
            f"checkstream: {exc.args[0]} already exists; nothing written "
            "(--force overwrites the starter files)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"checkstream: cannot write the starter config: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    config = directory / CONFIG_NAME
    print(f"the tenant's first CheckStream key (shown once, only its hash is stored): {key}")
    print(
        "next: set OPENAI_API_KEY (or edit backend_url and auth), then\n"
        f"  checkstream config check -c {config}\n"
        f"  checkstream doctor -c {config}\n"
        f"  checkstream run -c {config}"
    )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``init`` to the CLI's subcommands."""
    init = commands.add_parser(
        "init", help="write a commented starter checkstream.yaml and policy file"
    )
    init.add_argument(
        "directory", nargs="?", default=".", metavar="DIR", help="where to write them (.)"
    )
    init.add_argument("--force", action="store_true", help="overwrite existing starter files")
    init.set_defaults(handler=_cmd_init)
