"""Read a YAML file into plain data and report errors in the user's terms.

Every error a user can cause in a YAML file is reported as ``file:line: key.path: message``.
PyYAML's composed node tree knows where each key sits, pydantic knows which key is wrong;
this module joins the two so neither the config model nor the policy model has to care.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file, located as precisely as the file allows."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """A file could not be accepted; carries every problem found, each already located."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class YamlDocument:
    path: Path
    data: Any
    lines: Mapping[KeyPath, int]

    def line_of(self, key_path: KeyPath) -> int | None:
        """Line of the deepest key on ``key_path`` that exists in the file (1-based)."""
        for end in range(len(key_path), -1, -1):
            line = self.lines.get(key_path[:end])
            if line is not None:
                return line
        return None

    def problem(self, key_path: KeyPath, message: str) -> Problem:
        return Problem(str(self.path), self.line_of(key_path), format_key_path(key_path), message)


def load_yaml(path: Path) -> YamlDocument:
    """Parse ``path``; syntax errors and unreadable files become a located ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(path), None, "", f"cannot read file: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        reason = exc.problem or str(exc)
        raise ConfigError([Problem(str(path), line, "", f"invalid YAML: {reason}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(str(path), None, "", f"invalid YAML: {exc}")]) from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    return YamlDocument(path, data, lines)


def _index_lines(node: yaml.Node, prefix: KeyPath, out: dict[KeyPath, int]) -> None:
    out.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[(*prefix, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*prefix, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*prefix, index)] = item.start_mark.line + 1
            _index_lines(item, (*prefix, index), out)


def format_key_path(key_path: Iterable[str | int]) -> str:
    text = ""
    for part in key_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def validation_problems(
    doc: YamlDocument,
    error: pydantic.ValidationError,
    model: type[pydantic.BaseModel],
    redact: Iterable[KeyPath] = (),
) -> list[Problem]:
    """Turn pydantic's errors into located problems in the user's terms.

    ``redact`` lists mappings whose keys are secrets (API keys): their keys are shown as
    ``<key>`` so an error message never repeats a credential.
    """
    secret_maps = set(redact)
    problems = []
    for item in error.errors(include_url=False):
        loc: KeyPath = tuple(p for p in item["loc"] if isinstance(p, str | int))
        # Tagged unions add the tag as a pseudo key; it is not in the user's file.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))
        # A mapping key that fails validation (a tenant id) gets a "[key]" pseudo element.
        bad_key = bool(loc) and loc[-1] == "[key]"
        loc = loc[:-1] if bad_key else loc
        shown = tuple("<key>" if i > 0 and loc[:i] in secret_maps else p for i, p in enumerate(loc))
        message = _message(item, model, loc)
        problems.append(
            Problem(
                str(doc.path),
                doc.line_of(loc),
                format_key_path(shown),
                f"invalid name: {message}" if bad_key else message,
            )
        )
    return sorted(problems, key=lambda p: p.line or 0)


def _message(item: Any, model: type[pydantic.BaseModel], loc: KeyPath) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    message = str(item["msg"])
    return message[len("Value error, ") :] if message.startswith("Value error, ") else message


def _known_keys(model: type[pydantic.BaseModel], parent: KeyPath) -> list[str]:
    """Field names valid at ``parent``, found by walking the model's annotations."""
    current: Any = model
    for part in parent:
        if isinstance(part, int):
            current = _item_type(current)
            continue
        if isinstance(current, type) and issubclass(current, pydantic.BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field else None
        else:
            current = _item_type(current)
        current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, pydantic.BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if getattr(annotation, "__origin__", None) is None and len(args) == 1:
        return args[0]
    if type(annotation).__name__ == "UnionType" and len(args) == 1:
        return args[0]
    return annotation


def _item_type(annotation: Any) -> Any:
    args = getattr(_unwrap(annotation), "__args__", ())
    return _unwrap(args[-1]) if args else None
