"""A new tenant from a shipped template, written into an existing config (CLI).

Templates live in ``extproc/templates/<name>.yaml``: a description, the classifier instances
the tenant needs, the tenant's config keys and its policy. The config file is edited with a
round-trip YAML parser (ruamel.yaml), so its comments, key order, quoting, flow style and
indentation stay as the operator wrote them; only the new tenant (and any missing classifier
instance) is added.
"""

from __future__ import annotations

import copy
import io
import itertools
import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from checkstream.tenants.keyindex import digest_of

TEMPLATE_DIR = "templates"
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class OnboardingError(Exception):
    """Why a tenant cannot be added; the message is for the operator."""


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    classifiers: CommentedMap
    tenant: CommentedMap
    policy: CommentedMap


def template_names() -> list[str]:
    folder = files("checkstream.tenants") / TEMPLATE_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_template(name: str) -> Template:
    if name not in template_names():
        raise OnboardingError(f"no template '{name}' (shipped: {', '.join(template_names())})")
    text = (files("checkstream.tenants") / TEMPLATE_DIR / f"{name}.yaml").read_text()
    data = _round_trip(text).load(text)
    return Template(
        name, str(data["description"]), data["classifiers"], data["tenant"], data["policy"]
    )


def _indentation(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) as the file already uses them, for ruamel's dumper."""
    mapping, offset = 2, 0
    lines = text.splitlines()
    for line, following in itertools.pairwise(lines):
        key = re.match(r"^( *)[^\s#-][^:]*:\s*(#.*)?$", line)
        if key is None:
            continue
        indent = len(key.group(1))
        child = re.match(r"^( *)(- )?", following)
        assert child is not None
        depth = len(child.group(1)) - indent
        if child.group(2):
            offset = max(depth, 0)
            break
        if depth > 0 and following.strip() and not following.lstrip().startswith("#"):
            mapping = depth
    return mapping, offset + 2, offset


def _round_trip(text: str) -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the operator's long lines
    mapping, sequence, offset = _indentation(text)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def dump(yaml: YAML, data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _flow(items: dict[str, Any]) -> CommentedMap:
    node = CommentedMap(items)
    node.fa.set_flow_style()
    return node


def add_tenant(
    config_text: str,
    tenant_id: str,
    template: Template,
    *,
    backend_url: str,
    streaming_format: str,
    policy_path: str,
    key_name: str,
    key: str,
    token_env: str | None = None,
) -> str:
    """``config_text`` with the tenant added; only the new nodes are new text."""
    if not _TENANT_ID.match(tenant_id):
        raise OnboardingError(
            f"invalid tenant id {tenant_id!r}: letters, digits, '.', '_', '-' (128 at most)"
        )
    yaml = _round_trip(config_text)
    mapping = _indentation(config_text)[0] * 2  # tenants.configs.<id>
    try:
        data = yaml.load(config_text)
    except YAMLError as exc:
        raise OnboardingError(f"the config is not valid YAML: {exc}") from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        raise OnboardingError("the config's top level is not a mapping")
    tenants = data.setdefault("tenants", CommentedMap())
    configs = tenants.setdefault("configs", CommentedMap())
    if not isinstance(tenants, CommentedMap) or not isinstance(configs, CommentedMap):
        raise OnboardingError("tenants.configs is not a mapping")
    if tenant_id in configs:
        raise OnboardingError(f"tenant '{tenant_id}' already exists")
    if template.classifiers:
        classifiers = data.setdefault("classifiers", CommentedMap())
        for name, definition in template.classifiers.items():
            if name not in classifiers:
                classifiers[name] = copy.deepcopy(definition)
            elif dict(classifiers[name]) != dict(definition):
                raise OnboardingError(
                    f"classifier '{name}' already exists with other settings than template "
                    f"'{template.name}' needs ({dict(definition)}): rename one of them"
                )
    tenant = CommentedMap()
    tenant["backend_url"] = backend_url
    if streaming_format != "openai":
        tenant["streaming_format"] = streaming_format
    tenant["policy_path"] = policy_path
    for name, value in template.tenant.items():
        tenant[name] = copy.deepcopy(value)
    if token_env is not None:
        tenant["auth"] = _flow({"type": "bearer", "token_env": token_env})
    keys = CommentedSeq([_flow({"name": key_name, "sha256": digest_of(key)})])
    # Flow style: comments after a block sequence that ends a tenant stay glued to it when
    # the next tenant is added, after a flow one they stay before the next key.
    keys.fa.set_flow_style()
    tenant["api_keys"] = keys
    configs[tenant_id] = tenant
    note = f"from template '{template.name}' (checkstream tenants new)"
    configs.yaml_set_comment_before_after_key(tenant_id, before=note, indent=mapping)
    return dump(yaml, data)


def policy_text(template: Template, tenant_id: str) -> str:
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    body = dump(yaml, template.policy)
    return f"# Policy of tenant '{tenant_id}', from template '{template.name}'.\n{body}"
