"""Run a phase's classifiers over some texts and turn their scores into one verdict.

Pure of gRPC and HTTP: texts in, ``Verdict`` out. Classifiers of a phase run concurrently;
sync ones in a thread pool (never on the event loop) unless they declare ``inline``. Texts
over ``INLINE_MAX_CHARS`` go to ``large_inputs`` (processes, or threads of their own), so
one tenant's huge prompt never stalls the event loop or the threads other tenants share. A
classifier that raises, times out or returns a malformed result makes the verdict a
failure naming it; the caller applies the tenant's fail mode.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

from checkstream.formats.texts import mask_placeholders
from checkstream.ops.metrics import CLASSIFIER_LATENCY
from checkstream.policy.guardrails import STRENGTH, PhasePlan, Rule
from checkstream.policy.large_inputs import INLINE_MAX_CHARS, LargeInputs
from checkstream.types import Classification, Classifier, Span


@dataclass(frozen=True)
class Trigger:
    rule: Rule
    score: float


@dataclass(frozen=True)
class Verdict:
    #: The strongest action triggered, or None when nothing triggered.
    action: str | None = None
    triggers: tuple[Trigger, ...] = ()
    #: Per text: the spans to replace, when the action is ``redact``.
    redactions: tuple[tuple[Span, ...], ...] = ()
    #: Set when a classifier failed: "classifier 'x': why". The verdict is then unusable.
    failure: str | None = None
    failed_classifier: str | None = None
    scores: Mapping[str, float] = field(default_factory=dict)

    def outcome(self, *, fail_open: bool) -> Outcome:
        """What every phase (ingress, egress, midstream) does with this verdict, decided here
        once: ``pass`` (nothing fired, only ``log`` rules, or a failed check the tenant lets
        through), ``fail`` (a failed check, failing closed), ``block`` (a ``block`` or
        ``stop`` rule: ``deciding`` names it) or ``redact`` (``redactions`` say where)."""
        if self.failure is not None:
            return "pass" if fail_open else "fail"
        if self.action in ("block", "stop"):
            return "block"
        if self.action == "redact":
            return "redact"
        return "pass"

    @property
    def deciding(self) -> Trigger | None:
        """The trigger whose action won (the first rule with the strongest action)."""
        for trigger in self.triggers:
            if trigger.rule.action == self.action:
                return trigger
        return None


Outcome = Literal["pass", "fail", "block", "redact"]

CLEAN = Verdict()
_UNREAD = Classification(0.0)


class ClassifierFailure(Exception):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"classifier '{name}': {reason}")
        self.name = name


class Checker:
    def __init__(
        self,
        classifiers: Mapping[str, Classifier],
        executor: Executor,
        timeout_s: float,
        large: LargeInputs | None = None,
    ) -> None:
        self.classifiers = classifiers
        self.executor = executor
        self.timeout_s = timeout_s
        #: Where large inputs go; None: the thread pool (inline ones too).
        self.large = large

    async def check(
        self, plan: PhasePlan, texts: Sequence[str], sources: Sequence[str] | None = None
    ) -> Verdict:
        """Run the plan's classifiers over ``texts``; ``sources`` says whose words each text
        holds (``checkstream.formats.texts.SOURCES``), for classifiers that read only some."""
        if not plan.rules or not any(texts):
            return CLEAN
        texts = [mask_placeholders(text) for text in texts]
        names = tuple(dict.fromkeys(rule.classifier for rule in plan.rules))
        picks = {name: self._picks(name, sources) for name in names}
        n = len(texts)
        try:
            small = sum(map(len, texts)) <= INLINE_MAX_CHARS
            if small and all(_runs_inline(self.classifiers[name]) for name in names):
                # Microseconds of work each: tasks and a timer would cost more than the
                # checks, and a timeout could not interrupt synchronous code anyway.
                inline = {
                    name: _spread(
                        picks[name], self._classify_inline(name, _pick(texts, picks[name])), n
                    )
                    for name in names
                }
                return decide(plan, inline, n)
            found = await asyncio.wait_for(
                asyncio.gather(
                    *(self.classify(name, _pick(texts, picks[name]), plan.tenant) for name in names)
                ),
                self.timeout_s,
            )
            results = [_spread(picks[name], r, n) for name, r in zip(names, found, strict=True)]
        except TimeoutError:
            return Verdict(
                failure=f"classifiers {', '.join(names)} took longer than {self.timeout_s:g}s",
                failed_classifier=names[0] if len(names) == 1 else "timeout",
            )
        except ClassifierFailure as exc:
            return Verdict(failure=str(exc), failed_classifier=exc.name)
        return decide(plan, dict(zip(names, results, strict=True)), len(texts))

    def _picks(self, name: str, sources: Sequence[str] | None) -> list[int] | None:
        """Indices of the texts classifier ``name`` reads, or None for all of them."""
        wanted = getattr(self.classifiers[name], "sources", None)
        if wanted is None or sources is None:
            return None
        return [i for i, source in enumerate(sources) if source in wanted]

    def _classify_inline(self, name: str, texts: Sequence[str]) -> list[Classification]:
        if not texts:
            return []
        started = time.perf_counter()
        try:
            result = self.classifiers[name].classify(texts)
        except Exception as exc:
            raise ClassifierFailure(name, f"raised {type(exc).__name__}: {exc}") from exc
        CLASSIFIER_LATENCY.labels(name).observe((time.perf_counter() - started) * 1000)
        return validate(name, texts, result)

    async def classify(
        self, name: str, texts: Sequence[str], tenant: str = ""
    ) -> list[Classification]:
        """One classifier's validated results: sync ones off the event loop, unless inline
        and small; ``tenant`` queues large inputs behind that tenant's own."""
        if not texts:
            return []
        classifier = self.classifiers[name]
        started = time.perf_counter()
        try:
            is_async = inspect.iscoroutinefunction(classifier.classify)
            inline = _runs_inline(classifier)
            big = not is_async and sum(map(len, texts)) > INLINE_MAX_CHARS
            if big and self.large is not None:
                result: Any = await self.large.classify(tenant, classifier, texts)
            elif (inline and not big) or is_async:
                result = classifier.classify(texts)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.executor, classifier.classify, texts)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            raise ClassifierFailure(name, f"raised {type(exc).__name__}: {exc}") from exc
        CLASSIFIER_LATENCY.labels(name).observe((time.perf_counter() - started) * 1000)
        return validate(name, texts, result)


def _pick(texts: Sequence[str], picks: list[int] | None) -> Sequence[str]:
    return texts if picks is None else [texts[i] for i in picks]


def _spread(picks: list[int] | None, results: list[Classification], n: int) -> list[Classification]:
    """Results for all ``n`` texts: a text the classifier did not read scores 0."""
    if picks is None:
        return results
    full = [_UNREAD] * n
    for index, result in zip(picks, results, strict=True):
        full[index] = result
    return full


def _runs_inline(classifier: Classifier) -> bool:
    return bool(getattr(classifier, "inline", False)) and not inspect.iscoroutinefunction(
        classifier.classify
    )


def validate(name: str, texts: Sequence[str], result: Any) -> list[Classification]:
    """Refuse anything but one well-formed Classification per text."""
    if not isinstance(result, Sequence) or len(result) != len(texts):
        got = len(result) if isinstance(result, Sequence) else type(result).__name__
        raise ClassifierFailure(name, f"returned {got} results for {len(texts)} texts")
    for text, item in zip(texts, result, strict=True):
        if not isinstance(item, Classification):
            raise ClassifierFailure(name, f"returned {type(item).__name__}, not Classification")
        score = item.score
        # Any real number: a numpy float from a model is as good as a Python one.
        if (
            not isinstance(score, numbers.Real)
            or isinstance(score, bool)
            or math.isnan(score)
            or not 0.0 <= score <= 1.0
        ):
            raise ClassifierFailure(name, f"returned score {score!r} outside [0, 1]")
        if not isinstance(item.spans, tuple | list):
            raise ClassifierFailure(name, f"returned spans {item.spans!r}, not a tuple")
        for span in item.spans:
            if not (
                isinstance(span, Span)
                and _offset(span.start)
                and _offset(span.end)
                and 0 <= span.start < span.end <= len(text)
            ):
                raise ClassifierFailure(name, f"returned span {span!r} outside its text")
    return list(result)


def _offset(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decide(plan: PhasePlan, results: Mapping[str, Sequence[Classification]], n: int) -> Verdict:
    """The strongest action whose rule's threshold is met (stop/block > redact > log)."""
    scores = {name: max((c.score for c in res), default=0.0) for name, res in results.items()}
    triggers = tuple(
        Trigger(rule, scores[rule.classifier])
        for rule in plan.rules
        if scores[rule.classifier] >= rule.threshold
    )
    if not triggers:
        return Verdict(scores=scores)
    action = max((t.rule.action for t in triggers), key=STRENGTH.__getitem__)
    redactions: tuple[tuple[Span, ...], ...] = ()
    if action == "redact":
        per_text: list[list[Span]] = [[] for _ in range(n)]
        for trigger in triggers:
            if trigger.rule.action != "redact":
                continue
            for index, item in enumerate(results[trigger.rule.classifier]):
                # Only texts that themselves cross the threshold lose their spans.
                if item.score >= trigger.rule.threshold:
                    per_text[index].extend(item.spans)
        redactions = tuple(tuple(spans) for spans in per_text)
    return Verdict(action, triggers, redactions, scores=scores)
