"""``checkstream classifiers score`` and ``checkstream classifiers eval`` (CLI process).

A tenant measures a classifier on its own texts before trusting its threshold::

    checkstream classifiers score -c checkstream.yaml --classifier prompt_injection in.jsonl
    checkstream classifiers eval -c checkstream.yaml --classifier fin_advice labelled.jsonl

The classifier is built exactly as the gateway builds it: a config instance
(``classifiers: {fin_advice: {type: topic, preset: financial_advice}}``, keyword lists, a
``remote`` classifier) or a built-in type by its own name. Texts go through the
classifier's ``classify`` in batches, so what is measured is what the gateway scores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TextIO

import pydantic

from checkstream.cli.options import add_config_option
from checkstream.config.model import LoadedConfig, load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.policy.registry import PluginError, load_registry
from checkstream.types import Classification, Classifier

if TYPE_CHECKING:
    from checkstream.policy.binary_metrics import Measures

#: Used when a classifier documents no threshold (keyword, pii_detector: scores are 0 or 1).
FALLBACK_THRESHOLD = 0.5
#: Inputs with more texts than this get a progress display on stderr.
PROGRESS_OVER = 256


class InputError(Exception):
    """A bad input line, already located as ``file:line: message``."""


@dataclass(frozen=True)
class Record:
    line: int
    data: dict[str, Any]
    text: str


@dataclass(frozen=True)
class Labelled:
    text: str
    label: bool
    source: str


def read_records(stream: IO[str], name: str) -> list[Record]:
    """Every non-blank line of a JSON Lines stream: an object with a string ``text``."""
    records = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise InputError(f"{name}:{number}: expected a JSON object with 'text'")
        text = data.get("text")
        if not isinstance(text, str):
            raise InputError(f"{name}:{number}: 'text' must be a string, got {text!r:.60}")
        records.append(Record(number, data, text))
    return records


def labelled(records: Sequence[Record], name: str) -> list[Labelled]:
    """``label`` is 1/0 or true/false (1 = the classifier should flag it)."""
    out = []
    for record in records:
        label = record.data.get("label")
        if label not in (0, 1) or isinstance(label, float):
            raise InputError(
                f"{name}:{record.line}: 'label' must be 0, 1, true or false, got {label!r:.40}"
            )
        source = record.data.get("source", "")
        if not isinstance(source, str):
            raise InputError(f"{name}:{record.line}: 'source' must be a string")
        out.append(Labelled(record.text, bool(label), source))
    return out


def build_classifier(loaded: LoadedConfig, name: str) -> Classifier:
    """The config's instance ``name``, else the built-in type ``name`` with no settings.

    Raises ConfigError located at the instance for bad settings, PluginError otherwise.
    """
    registry = load_registry()
    entry = loaded.model.classifiers.get(name)
    if entry is None:
        kind = registry.types.get(name)
        if kind is None:
            raise PluginError(
                f"unknown classifier '{name}': not under classifiers: in {loaded.path} and "
                f"not a built-in type ({registry.describe()})"
            )
        settings: dict[str, Any] = {}
        where: tuple[str, ...] = ()
    else:
        kind = registry.types.get(entry.type)
        where = ("classifiers", name)
        if kind is None:
            raise ConfigError(
                [
                    loaded.doc.problem(
                        (*where, "type"),
                        f"unknown classifier type '{entry.type}' "
                        f"(installed: {registry.describe()})",
                    )
                ]
            )
        settings = dict(entry.settings)
    try:
        return kind.factory(name, settings)
    except (pydantic.ValidationError, ValueError) as exc:
        if not where:
            raise PluginError(f"type '{name}' needs settings: define an instance ({exc})") from None
        raise ConfigError([loaded.doc.problem(where, f"invalid settings: {exc}")]) from None
    except Exception as exc:
        raise PluginError(
            f"plugin '{kind.plugin}' failed to build classifier '{name}': "
            f"{type(exc).__name__}: {exc}"
        ) from None


def documented_threshold(classifier: Classifier) -> float:
    """The threshold the classifier's card recommends (``recommended_threshold``), if any."""
    value = getattr(classifier, "recommended_threshold", None)
    return float(value) if isinstance(value, int | float) else FALLBACK_THRESHOLD


class Progress:
    """``scored n/total`` on stderr: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.enabled = total > PROGRESS_OVER
        self.tty = stream.isatty()
        self.next_tenth = 1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            filled = 30 * done // self.total
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if done == self.total else ""
            self.stream.write(f"\r[{bar}] {done}/{self.total} texts{end}")
        elif done * 10 >= self.next_tenth * self.total:
            self.next_tenth = done * 10 // self.total + 1
            self.stream.write(f"scored {done}/{self.total} texts\n")
        self.stream.flush()


async def _classify(classifier: Classifier, texts: Sequence[str]) -> Sequence[Classification]:
    result = classifier.classify(texts)
    if inspect.isawaitable(result):
        result = await result
    if len(result) != len(texts):
        raise PluginError(
            f"classifier '{classifier.name}' returned {len(result)} results for {len(texts)} texts"
        )
    return result


async def classify_all(
    classifier: Classifier, texts: Sequence[str], batch_size: int, progress: Progress
) -> list[Classification]:
    out: list[Classification] = []
    try:
        for start in range(0, len(texts), batch_size):
            out.extend(await _classify(classifier, texts[start : start + batch_size]))
            progress.update(len(out))
    finally:
        await load_registry().shutdown()  # remote classifiers' channels, among others
    return out


# --- output ---------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _measures_json(m: Measures) -> dict[str, Any]:
    return {
        "threshold": m.threshold,
        "rows": m.rows,
        "positives": m.positives,
        "negatives": m.negatives,
        "flagged": m.flagged,
        "true_positives": m.true_positives,
        "false_positives": m.false_positives,
        "precision": m.precision,
        "recall": m.recall,
        "f1": m.f1,
        "false_positive_rate": m.false_positive_rate,
    }


#: ``--by length`` buckets, in characters: short prompts, paragraphs, documents.
LENGTH_BUCKETS = ((200, "<200 chars"), (1000, "200-999 chars"), (None, "1000+ chars"))


def length_bucket(text: str) -> str:
    return next(name for limit, name in LENGTH_BUCKETS if limit is None or len(text) < limit)


def report(
    items: Sequence[Labelled],
    scores: Sequence[float],
    classifier: str,
    threshold: float,
    by: str = "source",
) -> dict[str, Any]:
    """Overall, per-source and swept measures as one JSON-able object."""
    # numpy only here: `checkstream` imports this module for every command.
    import numpy as np

    from checkstream.policy.binary_metrics import measure, roc_auc, sweep

    s = np.asarray(scores, dtype=np.float64)
    y = np.array([i.label for i in items], dtype=bool)
    keys = [length_bucket(i.text) if by == "length" else i.source for i in items]
    sources = np.array(keys, dtype=object)
    groups: dict[str, Any] = {}
    order = [name for _, name in LENGTH_BUCKETS] if by == "length" else sorted(set(keys))
    for source in [k for k in order if k in set(keys)] if len(set(keys)) > 1 else []:
        mask = sources == source
        groups[source or "(none)"] = {
            **_measures_json(measure(s[mask], y[mask], threshold)),
            "roc_auc": roc_auc(s[mask], y[mask]),
        }
    return {
        "classifier": classifier,
        "threshold": threshold,
        "overall": {**_measures_json(measure(s, y, threshold)), "roc_auc": roc_auc(s, y)},
        "by": by,
        "groups": groups,
        "sweep": [_measures_json(m) for m in sweep(s, y, threshold)],
    }


def render_report(data: dict[str, Any]) -> str:
    header = [
        data["by"],
        "rows",
        "positives",
        "negatives",
        "precision",
        "recall",
        "F1",
        "FPR",
        "ROC AUC",
    ]

    def line(name: str, m: dict[str, Any]) -> str:
        return _row(
            [
                name,
                str(m["rows"]),
                str(m["positives"]),
                str(m["negatives"]),
                _fmt(m["precision"]),
                _fmt(m["recall"]),
                _fmt(m["f1"]),
                _fmt(m["false_positive_rate"]),
                _fmt(m["roc_auc"]),
            ]
        )

    out = [
        f"classifier {data['classifier']}, threshold {data['threshold']:g} "
        "(flagged = score >= threshold)",
        "",
        _row(header),
        _row(["---"] * len(header)),
        line("all", data["overall"]),
        *(line(name, m) for name, m in data["groups"].items()),
        "",
        "threshold sweep (all sources)",
        "",
        _row(["threshold", "flagged", "precision", "recall", "F1", "FPR"]),
        _row(["---"] * 6),
    ]
    for m in data["sweep"]:
        mark = " (used)" if m["threshold"] == round(data["threshold"], 4) else ""
        out.append(
            _row(
                [
                    f"{m['threshold']:g}{mark}",
                    str(m["flagged"]),
                    _fmt(m["precision"]),
                    _fmt(m["recall"]),
                    _fmt(m["f1"]),
                    _fmt(m["false_positive_rate"]),
                ]
            )
        )
    return "\n".join(out) + "\n"


# --- commands -------------------------------------------------------------------------------


def _open_input(path: str) -> tuple[IO[str], str]:
    if path == "-":
        return sys.stdin, "<stdin>"
    return open(path, encoding="utf-8"), path


def _prepare(args: argparse.Namespace) -> tuple[Classifier, list[Record], float] | None:
    """Config, classifier and input, or None after printing why not."""
    try:
        loaded = load_config(args.config, require_secrets=False)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return None
    try:
        stream, name = _open_input(args.input)
    except OSError as exc:
        print(f"checkstream: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return None
    try:
        with stream if stream is not sys.stdin else contextlib.nullcontext(stream):
            records = read_records(stream, name)
    except (InputError, UnicodeDecodeError) as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return None
    try:
        classifier = build_classifier(loaded, args.classifier)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return None
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return None
    threshold = args.threshold if args.threshold is not None else documented_threshold(classifier)
    return classifier, records, threshold


def _score(classifier: Classifier, texts: Sequence[str], batch_size: int) -> list[Classification]:
    return asyncio.run(
        classify_all(classifier, texts, batch_size, Progress(len(texts), sys.stderr))
    )


def cmd_score(args: argparse.Namespace) -> int:
    prepared = _prepare(args)
    if prepared is None:
        return 1
    classifier, records, threshold = prepared
    try:
        results = _score(classifier, [r.text for r in records], args.batch_size)
    except Exception as exc:  # a remote that is down, a plugin bug: the user's to see, briefly
        print(f"checkstream: scoring failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    out = sys.stdout
    for record, result in zip(records, results, strict=True):
        line = dict(record.data)
        line["score"] = round(float(result.score), 6)
        line["flagged"] = bool(result.score >= threshold)
        if result.spans:
            line["spans"] = [
                {"start": s.start, "end": s.end, "label": s.label} for s in result.spans
            ]
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    prepared = _prepare(args)
    if prepared is None:
        return 1
    classifier, records, threshold = prepared
    name = "<stdin>" if args.input == "-" else args.input
    try:
        items = labelled(records, name)
    except InputError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    if not items:
        print(f"checkstream: {name}: no labelled lines", file=sys.stderr)
        return 1
    try:
        results = _score(classifier, [i.text for i in items], args.batch_size)
    except Exception as exc:
        print(f"checkstream: scoring failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    data = report(items, [r.score for r in results], args.classifier, threshold, args.by)
    if args.format == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(render_report(data))
    return 0


def _threshold(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def add_commands(commands: Any) -> None:
    """Add ``score`` and ``eval`` to the ``classifiers`` sub-command parser."""
    for name, handler, help_text in [
        ("score", cmd_score, "score JSON Lines texts: one JSON line out per line in"),
        ("eval", cmd_eval, "precision, recall, F1, FPR, ROC AUC on labelled JSON Lines"),
    ]:
        parser = commands.add_parser(name, help=help_text)
        add_config_option(parser)
        parser.add_argument(
            "--classifier",
            required=True,
            metavar="NAME",
            help="an instance under classifiers: or a built-in type",
        )
        parser.add_argument(
            "--threshold",
            type=_threshold,
            help="flag at score >= this (default: the classifier's documented threshold)",
        )
        parser.add_argument("--batch-size", type=_positive, default=32, help="texts per call")
        if name == "score":
            parser.add_argument(
                "input",
                nargs="?",
                default="-",
                metavar="INPUT.jsonl",
                help="lines with 'text' ('-' or absent: stdin)",
            )
        else:
            parser.add_argument(
                "input",
                metavar="LABELLED.jsonl",
                help="lines with 'text', 'label' (1/0) and optional 'source' ('-': stdin)",
            )
            parser.add_argument(
                "--format",
                choices=["table", "json"],
                default="table",
                help="a table for people, or JSON (default table)",
            )
            parser.add_argument(
                "--by",
                choices=["source", "length"],
                default="source",
                help="group rows by 'source' or by length (<200, 200-999, 1000+ characters)",
            )
        parser.set_defaults(handler=handler)
