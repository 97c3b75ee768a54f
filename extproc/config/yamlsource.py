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

import numpy as np
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


#: Limits that no real config comes near and that keep a hostile file cheap to refuse: PyYAML
#: composes an alias as a reference (cheap) but everything after it, from the line index to
#: pydantic, walks the expanded tree, so a 400-byte "billion laughs" file would never finish.
MAX_DEPTH = 64
MAX_ALIASES = 1000
# Values (scalars, sequences, mappings) that aliases may add to those written in the file
# once expanded: a large config of literal values is fine, a small file exploding is not.
MAX_NODES = 100_000
# PyYAML's scanner is quadratic in the nesting of flow collections ("[[[[..."): 5,000 levels
# take a second before the composer could refuse them, so brackets are counted first. Loose
# (brackets in quoted strings count too), hence far above MAX_DEPTH.
_MAX_BRACKET_DEPTH = 1000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and many aliases while composing, and reports
    any failure to construct a value (``!!float abc``, ``!!timestamp x``, a 5,000-digit
    integer) as a located YAML error instead of a bare ``ValueError``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.key_path: list[str | int] = []
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise self._refuse(f"more than {MAX_ALIASES} aliases")
            return super().compose_node(parent, index)
        if parent is not None:
            key = index.value if isinstance(index, yaml.Node) else index
            self.key_path.append(key if isinstance(key, str | int) else str(key))
        if len(self.key_path) >= MAX_DEPTH:
            raise self._refuse(f"nested more than {MAX_DEPTH} levels deep")
        node = super().compose_node(parent, index)
        if parent is not None:
            self.key_path.pop()
        return node

    def _refuse(self, message: str) -> yaml.MarkedYAMLError:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        return yaml.composer.ComposerError(None, None, message, event.start_mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, LookupError, OverflowError) as exc:
            tag = node.tag.rsplit(":", 1)[-1]
            value = f" {node.value[:40]!r}" if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid {tag} value{value}: {exc}", node.start_mark
            ) from None


def load_yaml(path: Path) -> YamlDocument:
    """Parse ``path``; every problem with it becomes a located ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError([Problem(str(path), None, "", f"cannot read file: {exc}")]) from None
    too_deep = _bracket_overflow(text)
    if too_deep is not None:
        message = f"invalid YAML: brackets nest more than {_MAX_BRACKET_DEPTH} levels deep"
        raise ConfigError([Problem(str(path), too_deep, "", message)])
    lines: dict[KeyPath, int] = {}
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # refuses control characters (a NUL) at once
        node = loader.get_single_node()
        if node is not None:
            written: set[int] = set()
            _index_lines(node, (), lines, written)
            _check_expansion(node, len(written) + MAX_NODES)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        key = _key_at(lines, line) if lines or loader is None else tuple(loader.key_path)
        reason = exc.problem or str(exc)
        problem = Problem(str(path), line, format_key_path(key), f"invalid YAML: {reason}")
        raise ConfigError([problem]) from None
    except yaml.reader.ReaderError as exc:  # a control character such as NUL in the file
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError([Problem(str(path), line, "", f"invalid YAML: {exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(str(path), None, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:  # not expected with the limits above; never a traceback anyway
        message = f"invalid YAML: nested more than {MAX_DEPTH} levels deep"
        raise ConfigError([Problem(str(path), None, "", message)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    doc = YamlDocument(path, data, lines)
    nul = _nul_problems(doc)
    if nul:
        raise ConfigError(nul)
    return doc


def _bracket_overflow(text: str) -> int | None:
    """The line where ``[`` and ``{`` first nest past _MAX_BRACKET_DEPTH, if they do."""
    if text.count("[") + text.count("{") <= _MAX_BRACKET_DEPTH:
        return None
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    steps = np.zeros(codes.shape, dtype=np.int32)
    steps[(codes == ord("[")) | (codes == ord("{"))] = 1
    steps[(codes == ord("]")) | (codes == ord("}"))] = -1
    over = np.flatnonzero(np.cumsum(steps) > _MAX_BRACKET_DEPTH)
    return text.count("\n", 0, int(over[0])) + 1 if over.size else None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, max_nodes: int) -> None:
    """Refuse a node graph whose aliases expand past ``max_nodes`` or MAX_DEPTH, or loop.

    Sizes are computed once per node (aliases share nodes), without recursion.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = _children(node)
        if not children_done:
            on_path.add(key)
            stack.append((node, True))
            for child in children:
                if id(child) in on_path:
                    raise yaml.composer.ComposerError(
                        None, None, "an alias refers to a node that contains it", node.start_mark
                    )
                if id(child) not in sizes:
                    stack.append((child, False))
            continue
        on_path.discard(key)
        size = 1 + sum(sizes[id(c)][0] for c in children)
        depth = 1 + max((sizes[id(c)][1] for c in children), default=0)
        if size > max_nodes:
            message = f"aliases expand to more than {MAX_NODES} values beyond those written"
            raise yaml.composer.ComposerError(None, None, message, node.start_mark)
        if depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"aliases nest more than {MAX_DEPTH} levels deep", node.start_mark
            )
        sizes[key] = (size, depth)


def _key_at(lines: Mapping[KeyPath, int], line: int | None) -> KeyPath:
    """The deepest key path that starts on ``line``."""
    on_line = [k for k, n in lines.items() if n == line]
    return max(on_line, key=len, default=())


def _nul_problems(doc: YamlDocument) -> list[Problem]:
    """Strings with a NUL character ("\\0" in a quoted string): no path, header or name
    may hold one, and the OS refuses them in paths with a bare ValueError."""
    problems: list[Problem] = []
    stack: list[tuple[KeyPath, Any]] = [((), doc.data)]
    while stack and len(problems) < 20:
        key_path, value = stack.pop()
        if isinstance(value, str) and "\0" in value:
            problems.append(doc.problem(key_path, "contains a NUL character (\\0)"))
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and "\0" in k:
                    problems.append(doc.problem(key_path, "a key contains a NUL character"))
                stack.append(((*key_path, str(k)), v))
        elif isinstance(value, list):
            stack.extend(((*key_path, i), v) for i, v in enumerate(value))
    return sorted(problems, key=lambda p: p.line or 0)


def _index_lines(node: yaml.Node, prefix: KeyPath, out: dict[KeyPath, int], seen: set[int]) -> None:
    """Lines of the keys in the file. An alias's content is indexed where its anchor is,
    not again under every alias (which could be exponential): errors inside it point at
    the alias's key."""
    out.setdefault(prefix, node.start_mark.line + 1)
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[(*prefix, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*prefix, key), out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            if id(item) in seen:
                continue  # an alias: its lines are the anchor's, already indexed there
            out[(*prefix, index)] = item.start_mark.line + 1
            _index_lines(item, (*prefix, index), out, seen)


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
