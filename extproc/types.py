"""The data a classifier plugin exchanges with CheckStream (every process that classifies).

Plugin authors import these from ``checkstream`` itself; ``hookspecs.py`` says when each hook
runs, this module what flows through it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` found by a classifier, e.g. ``Span(8, 25, "EMAIL")``."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class Classification:
    """A classifier's verdict on one text."""

    score: float
    spans: tuple[Span, ...] = field(default=())


@runtime_checkable
class Classifier(Protocol):
    """What a classifier type's factory returns."""

    #: The name policies use in ``trigger.classifier`` (the factory receives it).
    name: str
    #: True if ``classify`` returns spans, so policies may ``redact`` with it.
    produces_spans: bool

    def classify(
        self, texts: Sequence[str]
    ) -> Sequence[Classification] | Awaitable[Sequence[Classification]]:
        """Score every text of the batch; one Classification per text, in order."""
        ...


#: Builds a classifier from its instance name and the settings under ``classifiers.<name>``
#: in checkstream.yaml (without ``type``; empty when the type is used by its own name).
#: Raise ``ValueError`` (or a pydantic ``ValidationError``) for bad settings: CheckStream
#: reports it at that key, with file and line.
ClassifierFactory = Callable[[str, Mapping[str, Any]], Classifier]
