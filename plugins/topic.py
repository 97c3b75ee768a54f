"""``type: topic``: a classifier defined by example sentences, no training needed.

    classifiers:
      fin_advice: {type: topic, labels: {financial_advice: ["Which stocks should I buy?", ...]}}
      med_advice: {type: topic, preset: medical_advice}   # a shipped example set
      exact:      {type: topic, preset: medical_advice, prefilter: false}

Exactly one of ``labels`` (one or more labels, each with one or more example sentences) or
``preset`` (the name of a file in ``plugins/topics/``) is required. A text's score is the
largest cosine similarity between its MiniLM embedding and any example's, clipped to
[0, 1]: "how close is this to the nearest thing we said to catch". There are no spans (a
sentence embedding says nothing about where in the text the topic is). MiniLM reads the
first 256 tokens of a text only.

**A prefilter, then MiniLM.** MiniLM costs ~17 ms per 128-token text on one core
(``plugins.embeddings``), over the 5 ms budget per window, and most traffic is about
something else. So a text first goes through two cheaper stages, each the same "largest
cosine to an example" in a cheaper embedding, each with its own threshold:

1. *static*: the centred mean of the text's MiniLM token-embedding rows (no transformer):
   ~0.3 ms per 128-token window, tokenisation included;
2. *first layer*: MiniLM's first transformer layer, mean-pooled: ~3 ms more.

A text below either threshold **scores 0** and goes no further; a text that passes both
gets exactly MiniLM's score (~17 ms more: MiniLM runs again from the start). So a text is
flagged only if MiniLM alone would flag it, whatever the policy threshold; what the
prefilter can cost is recall, when it stops a text MiniLM would have flagged. The stages
judge a text as a whole, so a request buried in a long text about something else is
stopped (MiniLM alone mostly misses those too; ``bench/README.md`` has the numbers).

Why these stages (measured; ``bench/README.md`` has the table): the static stage alone
cannot rule out ordinary prose for medical_advice (its examples are close to any text in
static terms), and the first layer alone costs 3 ms on every window; cutting MiniLM to its
first layers instead loses the subject (they flag advice-framed requests about anything).

``prefilter`` (default ``true``; ``false`` sends every text to MiniLM):

* a preset uses the thresholds stored in its file, measured on its labelled fixture: at
  each stage the lowest score of a fixture text the preset should catch, minus
  ``STATIC_MARGIN`` or ``FIRST_LAYER_MARGIN`` (``python -m plugins.eval_topics`` prints
  them, with the recall they keep on held-out halves of the fixture);
* your own ``labels`` get, at each stage, the smallest similarity of an example to its
  nearest other example (at most ``STATIC_CAP`` for the static stage), minus the margin: a
  text about the topic is taken to be at least as close to some example as the least
  typical example is to the others. On the two presets this estimate is more lenient than
  their fixtures need; it is unchecked on other topics, so measure with a labelled set, or
  use ``false``. A label set with one example has no prefilter.

Measured (``python -m plugins.eval_topics``): the presets keep every fixture request and
flag no more than MiniLM alone; 89-97% of short chit-chat and every 128-token window of
ordinary prose stop before MiniLM, while 50-75% of requests framed as advice about *other*
subjects reach it and pay the full ~20 ms.

Texts going to MiniLM are embedded through one ``MicroBatcher`` per event loop shared by
every topic instance, so concurrent requests, and several topic classifiers looking at the
same request, share one MiniLM call.

Cosine similarities of MiniLM are not probabilities and sit in a narrow band: on the preset
fixtures, requests the preset should catch have a median score of ~0.5, near misses on the
same subject ~0.2-0.3 (some above 0.5), an exact example 1.0. Pick thresholds from a labelled
set (``python -m plugins.eval_topics``); the presets carry their measured recommendation,
far below the 0.7-0.9 a policy author might guess.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Final, Self

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator

from checkstream import Classification, Classifier, ClassifierFactory, hookimpl
from checkstream.batching import MicroBatcher
from checkstream.plugins.embeddings import DIMENSIONS, shared_minilm

TYPE_NAME: Final = "topic"
PRESETS_DIR: Final = Path(__file__).parent / "topics"

#: Batching: a request waits at most this long for others to join its MiniLM call. One
#: call on a 128-token text takes ~16 ms here, so a lone request pays little for the wait.
WINDOW_MS: Final = 2.0
#: Measured on the 2-core machine (``bench/classifiers.py``): batching saves little per
#: text (MiniLM's cost is linear in the tokens), and every caller of a batch waits for all of
#: it (~0.25 s at 16 x 128 tokens), so batches stay small.
MAX_BATCH: Final = 16
#: Taken off the lowest score a text to be caught may have at each prefilter stage
#: (measured on a preset's fixture, or estimated from the examples), so that texts a little
#: less typical than any seen still go on. Static scores need more: with 0.05 a threshold
#: chosen on half of the medical fixture's positives lost 5% of the other half (0.08: 1.7%).
STATIC_MARGIN: Final = 0.08
FIRST_LAYER_MARGIN: Final = 0.05
#: The static estimate from examples is never above this (before the margin): the presets'
#: fixtures needed 0.41 and 0.31.
STATIC_CAP: Final = 0.30

Embedding = npt.NDArray[np.float32]

# One worker thread each. MiniLM: two concurrent calls would only contend for the cores
# (plugins.embeddings.THREADS). The prefilter: its own thread, so that a text MiniLM does
# not need never waits behind a MiniLM batch. Owned here, not taken from the pipeline's
# pool, so slow embeddings never starve the other classifiers.
_EXECUTOR: Final = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkstream-topic")
_PREFILTER_EXECUTOR: Final = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="checkstream-topic-prefilter"
)
# A batcher's timer and futures belong to one event loop; extproc runs one loop, but tests
# and tools may run several in turn, so each loop gets its own (forgotten with the loop).
_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MicroBatcher[Embedding]] = (
    weakref.WeakKeyDictionary()
)

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Labels = Annotated[dict[Text, Annotated[list[Text], Field(min_length=1)]], Field(min_length=1)]
Threshold = Annotated[float, Field(ge=-1.0, le=1.0)]


def presets() -> list[str]:
    """The names of the shipped presets (``plugins/topics/<name>.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


class Prefilter(BaseModel):
    """The two prefilter thresholds: a text reaches MiniLM's remaining five layers only if
    its static score reaches ``static`` and its first-layer score reaches ``first_layer``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    static: Threshold
    first_layer: Threshold


class PresetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    labels: Labels
    #: Both measured on the preset's fixture (``python -m plugins.eval_topics``). The
    #: threshold is the one recommended to policies; the classifier does not use it.
    threshold: Annotated[float, Field(ge=0.0, le=1.0)]
    prefilter: Prefilter


def _preset_file(name: str) -> PresetFile:
    available = presets()
    if name not in available:
        raise ValueError(
            f"unknown topic preset {name!r}; presets are: {', '.join(available) or 'none'}"
        )
    path = PRESETS_DIR / f"{name}.yaml"
    try:
        return PresetFile.model_validate(yaml.safe_load(path.read_text("utf-8")))
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"topic preset file {path} is invalid: {exc}") from None


def load_preset(name: str) -> dict[str, list[str]]:
    """The labels of preset ``name``; ValueError listing the presets if there is none."""
    return dict(_preset_file(name).labels)


def preset_prefilter(name: str) -> Prefilter:
    """The prefilter thresholds stored in preset ``name``'s file."""
    return _preset_file(name).prefilter


def preset_threshold(name: str) -> float:
    """The policy threshold preset ``name`` recommends."""
    return _preset_file(name).threshold


class TopicSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    labels: Labels | None = None
    preset: str | None = None
    #: true: the preset's measured thresholds, or the examples' estimate; false: none.
    prefilter: Annotated[bool, Strict()] = True

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

    def resolved_prefilter(self) -> Prefilter | bool:
        """Thresholds, False (none), or True (estimate them from the examples)."""
        if self.prefilter and self.preset is not None:
            return preset_prefilter(self.preset)
        return self.prefilter


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


def _least_typical(examples: Embedding) -> float:
    """The lowest similarity of an example to its nearest other example (2+ examples)."""
    similarities = examples @ examples.T
    np.fill_diagonal(similarities, -np.inf)
    return float(similarities.max(axis=1).min())


def estimated_prefilter(
    static_examples: Embedding, first_layer_examples: Embedding
) -> Prefilter | None:
    """Prefilter thresholds for examples without a labelled set: at each stage, the lowest
    similarity of an example to its nearest other example (for static scores at most
    STATIC_CAP) minus the stage's margin; None (no prefilter) for a single example."""
    if static_examples.shape[0] < 2:
        return None
    return Prefilter(
        static=min(_least_typical(static_examples), STATIC_CAP) - STATIC_MARGIN,
        first_layer=_least_typical(first_layer_examples) - FIRST_LAYER_MARGIN,
    )


class TopicClassifier:
    produces_spans = False

    def __init__(
        self,
        name: str,
        labels: Mapping[str, Sequence[str]],
        prefilter: Prefilter | bool = True,
        recommended_threshold: float | None = None,
    ) -> None:
        if not labels or not all(labels.values()):
            raise ValueError("a topic classifier needs at least one label with one example")
        self.name = name
        #: A preset's measured threshold (``checkstream classifiers eval`` uses it); None
        #: for example lists, which have no labelled set to measure one on.
        self.recommended_threshold = recommended_threshold
        self.labels = {label: list(examples) for label, examples in labels.items()}
        self._prefilter_setting = prefilter
        # Embedding the examples needs MiniLM: done once per serving process
        # (checkstream_startup) or on first use, never by config check.
        self._lock = threading.Lock()
        self._loaded: tuple[Embedding, Embedding, Embedding, Prefilter | None] | None = None

    def load(self) -> None:
        """Embed the examples (and estimate the prefilter) once."""
        with self._lock:
            if self._loaded is not None:
                return
            examples = [e for label_examples in self.labels.values() for e in label_examples]
            minilm = shared_minilm()
            # [examples, 384] each, L2-normalised: a matrix product gives every cosine at once.
            full = minilm.embed(examples)
            static = minilm.embed_static(examples)
            first_layer = minilm.embed_first_layer(examples)
            setting = self._prefilter_setting
            # True means "estimate"; False: every text goes to MiniLM.
            prefilter: Prefilter | None
            if setting is True:
                prefilter = estimated_prefilter(static, first_layer)
            elif setting is False:
                prefilter = None
            else:
                prefilter = setting
            self._loaded = (full, static, first_layer, prefilter)

    def _parts(self) -> tuple[Embedding, Embedding, Embedding, Prefilter | None]:
        if self._loaded is None:
            self.load()
        assert self._loaded is not None
        return self._loaded

    @property
    def examples(self) -> Embedding:
        return self._parts()[0]

    @property
    def static_examples(self) -> Embedding:
        return self._parts()[1]

    @property
    def first_layer_examples(self) -> Embedding:
        return self._parts()[2]

    @property
    def prefilter(self) -> Prefilter | None:
        """None: every text goes to MiniLM."""
        return self._parts()[3]

    def scores(self, embeddings: Embedding) -> npt.NDArray[np.float64]:
        """The MiniLM score of each row of L2-normalised ``embeddings`` ([n, 384])."""
        return np.clip(self._best(embeddings, self.examples), 0.0, 1.0)

    def static_scores(self, static: Embedding) -> npt.NDArray[np.float64]:
        """The static prefilter score of each row of static embeddings (not clipped)."""
        return self._best(static, self.static_examples)

    def first_layer_scores(self, first_layer: Embedding) -> npt.NDArray[np.float64]:
        """The first-layer prefilter score of each row of first-layer embeddings."""
        return self._best(first_layer, self.first_layer_examples)

    @staticmethod
    def _best(embeddings: Embedding, examples: Embedding) -> npt.NDArray[np.float64]:
        if embeddings.shape[0] == 0:
            return np.zeros(0)
        similarities: npt.NDArray[np.float32] = embeddings.reshape(-1, DIMENSIONS) @ examples.T
        best: npt.NDArray[np.float64] = similarities.max(axis=1).astype(np.float64)
        return best

    def prefilter_stages(self, texts: Sequence[str]) -> npt.NDArray[np.int8]:
        """How far each text gets: 0 stopped by the static stage, 1 by the first layer, 2
        on to MiniLM (every text, without a prefilter)."""
        reached = np.full(len(texts), 2, dtype=np.int8)
        if self.prefilter is None or not texts:
            return reached
        minilm = shared_minilm()
        ids, mask = minilm.encode(list(texts))
        static = self.static_scores(minilm.static(ids, mask)) >= self.prefilter.static
        reached[~static] = 0
        if static.any():
            rows = np.nonzero(static)[0]
            # Trim the padding the stopped texts needed.
            width = int(mask[rows].sum(axis=1).max())
            first = minilm.first_layer(ids[rows, :width], mask[rows, :width])
            stopped = self.first_layer_scores(first) < self.prefilter.first_layer
            reached[rows[stopped]] = 1
        return reached

    def passes_prefilter(self, texts: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Which ``texts`` go on to MiniLM (all of them without a prefilter)."""
        passed: npt.NDArray[np.bool_] = self.prefilter_stages(texts) == 2
        return passed

    def classify_now(self, texts: Sequence[str]) -> list[Classification]:
        """Score ``texts`` in this thread, one MiniLM call at most (evaluation, tools)."""
        passed = self.passes_prefilter(texts)
        embeddings = shared_minilm().embed([t for t, p in zip(texts, passed, strict=True) if p])
        return self._merge(passed, self.scores(embeddings))

    async def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Score ``texts``; MiniLM calls are shared with concurrent callers."""
        if not texts:
            return []
        if self.prefilter is None:
            passed = np.ones(len(texts), dtype=bool)
        else:
            loop = asyncio.get_running_loop()
            passed = await loop.run_in_executor(
                _PREFILTER_EXECUTOR, self.passes_prefilter, list(texts)
            )
        survivors = [t for t, p in zip(texts, passed, strict=True) if p]
        if not survivors:
            return [Classification(0.0) for _ in texts]
        rows = await _batcher().run(survivors)
        return self._merge(passed, self.scores(np.stack(rows)))

    @staticmethod
    def _merge(
        passed: npt.NDArray[np.bool_], scores: npt.NDArray[np.float64]
    ) -> list[Classification]:
        out = np.zeros(len(passed))
        out[passed] = scores
        return [Classification(float(s)) for s in out]


def create(name: str, settings: Mapping[str, Any]) -> TopicClassifier:
    """The ``topic`` factory: ``labels`` or ``preset`` (exactly one), and ``prefilter``."""
    parsed = TopicSettings.model_validate(dict(settings))
    threshold = preset_threshold(parsed.preset) if parsed.preset is not None else None
    return TopicClassifier(name, parsed.resolved_labels(), parsed.resolved_prefilter(), threshold)


@hookimpl
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:
    return {TYPE_NAME: create}


@hookimpl
def checkstream_startup(classifiers: Mapping[str, Classifier]) -> None:
    """Embed this process's topic examples before traffic (not during config check)."""
    for classifier in classifiers.values():
        if isinstance(classifier, TopicClassifier):
            classifier.load()
