"""``type: topic``: a classifier defined by example sentences, no training needed.

    classifiers:
      fin_advice: {type: topic, labels: {financial_advice: ["Which stocks should I buy?", ...]}}
      med_advice: {type: topic, preset: medical_advice}   # a shipped example set

Exactly one of ``labels`` (one or more labels, each with one or more example sentences) or
``preset`` (the name of a file in ``plugins/topics/``) is required. Every example is
embedded once, at construction, with the shared MiniLM (``plugins.embeddings``). A text's
score is the largest cosine similarity between its embedding and any example of any label,
clipped to [0, 1]: "how close is this to the nearest thing we said to catch". There are no
spans (a sentence embedding says nothing about where in the text the topic is).

Texts are embedded through one ``MicroBatcher`` per event loop shared by every topic
instance, so concurrent requests, and several topic classifiers looking at the same
request, share one MiniLM call. MiniLM reads the first 256 tokens of a text only.

Cosine similarities of MiniLM are not probabilities and sit in a narrow band: on the preset
fixtures, requests the preset should catch have a median score of ~0.5, near misses on the
same subject ~0.2-0.3 (some above 0.5), an exact example 1.0. Pick thresholds from a labelled
set (``python -m plugins.eval_topics``); the presets carry their measured recommendation
(0.40 and 0.32), far below the 0.7-0.9 a policy author might guess.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Final, Self

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from extproc.batching import MicroBatcher
from extproc.hookspecs import Classification, ClassifierFactory, hookimpl
from plugins.embeddings import DIMENSIONS, shared_minilm

TYPE_NAME: Final = "topic"
PRESETS_DIR: Final = Path(__file__).parent / "topics"

#: Batching: a request waits at most this long for others to join its model call. One MiniLM
#: call on a short prompt takes 10-20 ms here, so a lone request pays little for the wait.
WINDOW_MS: Final = 2.0
#: Measured on the 2-core machine (``eval_topics --latency``): 128-token texts cost ~19 ms
#: each alone and ~19 ms each in a batch of 16 when the machine is quiet, 55-70 ms versus
#: ~49 ms when other processes load it. Larger batches gain little more per text, and every
#: caller of a batch waits for all of it (~0.3-0.8 s at 16 x 128 tokens).
MAX_BATCH: Final = 16

Embedding = npt.NDArray[np.float32]

# One worker thread: MiniLM already uses both cores of the reference machine for one call
# (plugins.embeddings.THREADS), so two concurrent calls would only contend. Owned here, not
# taken from the pipeline's pool, so slow embeddings never starve the other classifiers.
_EXECUTOR: Final = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkstream-topic")
# A batcher's timer and futures belong to one event loop; extproc runs one loop, but tests
# and tools may run several in turn, so each loop gets its own (forgotten with the loop).
_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MicroBatcher[Embedding]] = (
    weakref.WeakKeyDictionary()
)

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Labels = Annotated[dict[Text, Annotated[list[Text], Field(min_length=1)]], Field(min_length=1)]


def presets() -> list[str]:
    """The names of the shipped presets (``plugins/topics/<name>.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


class PresetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    labels: Labels


def load_preset(name: str) -> dict[str, list[str]]:
    """The labels of preset ``name``; ValueError listing the presets if there is none."""
    available = presets()
    if name not in available:
        raise ValueError(
            f"unknown topic preset {name!r}; presets are: {', '.join(available) or 'none'}"
        )
    path = PRESETS_DIR / f"{name}.yaml"
    try:
        return dict(PresetFile.model_validate(yaml.safe_load(path.read_text("utf-8"))).labels)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"topic preset file {path} is invalid: {exc}") from None


class TopicSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    labels: Labels | None = None
    preset: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.labels is None) == (self.preset is None):
            raise ValueError(
                "a topic classifier needs exactly one of 'labels' (label: [example "
                f"sentences]) or 'preset' (one of: {', '.join(presets())})"
            )
        if self.preset is not None and self.preset not in presets():
            # Checked here so the error points at the setting; load_preset says it again.
            raise ValueError(
                f"unknown topic preset {self.preset!r}; presets are: {', '.join(presets())}"
            )
        return self

    def resolved_labels(self) -> dict[str, list[str]]:
        return dict(self.labels) if self.labels is not None else load_preset(str(self.preset))


def _embed_rows(texts: list[str]) -> list[Embedding]:
    # Looked up at call time, not bound once, so every instance uses the process's one model.
    return list(shared_minilm().embed(texts))


def _batcher() -> MicroBatcher[Embedding]:
    loop = asyncio.get_running_loop()
    batcher = _BATCHERS.get(loop)
    if batcher is None:
        batcher = MicroBatcher(_embed_rows, _EXECUTOR, max_batch=MAX_BATCH, window_ms=WINDOW_MS)
        _BATCHERS[loop] = batcher
    return batcher


class TopicClassifier:
    produces_spans = False

    def __init__(self, name: str, labels: Mapping[str, Sequence[str]]) -> None:
        if not labels or not all(labels.values()):
            raise ValueError("a topic classifier needs at least one label with one example")
        self.name = name
        self.labels = {label: list(examples) for label, examples in labels.items()}
        examples = [e for label_examples in self.labels.values() for e in label_examples]
        # [examples, 384], L2-normalised: a matrix product gives every cosine at once.
        self.examples: Embedding = shared_minilm().embed(examples)

    def scores(self, embeddings: Embedding) -> npt.NDArray[np.float64]:
        """The score of each row of L2-normalised ``embeddings`` ([n, 384])."""
        if embeddings.shape[0] == 0:
            return np.zeros(0)
        similarities: npt.NDArray[np.float32] = embeddings.reshape(-1, DIMENSIONS) @ self.examples.T
        best: npt.NDArray[np.float64] = similarities.max(axis=1).astype(np.float64)
        return np.clip(best, 0.0, 1.0)

    def classify_now(self, texts: Sequence[str]) -> list[Classification]:
        """Score ``texts`` in this thread with one model call (evaluation, tools)."""
        embeddings = shared_minilm().embed(list(texts))
        return [Classification(float(s)) for s in self.scores(embeddings)]

    async def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Score ``texts``; the model call is shared with concurrent callers."""
        if not texts:
            return []
        rows = await _batcher().run(texts)
        return [Classification(float(s)) for s in self.scores(np.stack(rows))]


def create(name: str, settings: Mapping[str, Any]) -> TopicClassifier:
    """The ``topic`` factory: ``labels`` or ``preset`` (exactly one)."""
    parsed = TopicSettings.model_validate(dict(settings))
    return TopicClassifier(name, parsed.resolved_labels())


@hookimpl
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:
    return {TYPE_NAME: create}
