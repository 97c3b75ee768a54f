"""The built-in ``toxicity`` classifier: P(a sentence is abusive, hostile or sexually
explicit), the highest over a text's sentences.

Three stages per sentence, the third only where the second is unsure:

1. *profanity*: the converted alt-profanity-check model (word TF-IDF + calibrated linear SVM,
   ``plugins/models/toxicity.onnx``) scores the sentence, masked profanity written out first
   (``plugins/profanity_masks.py``);
2. *static head*: a logistic regression over that score and two static MiniLM embeddings of
   the sentence (the centred mean and the element-wise maximum of its WordPiece
   token-embedding rows, ``plugins/models/minilm/``), no transformer layer: the embeddings
   carry what the words are about, so "the cock crowed" or "what does 'bastard' mean" can
   score low while a threat or a sexual proposition without a swear word scores high;
3. *context head*: where the static head scores at least ``context_from`` (about 2% of
   ordinary sentences, half of hard ones), a logistic regression over the same inputs plus
   MiniLM's sentence embedding (all six layers: word order, negation, innuendo) replaces
   its score.

Both heads, the cut-off and the recommended thresholds are in
``plugins/models/toxicity_head.npz``. Score in [0, 1]; there are no spans, so policies can
``log``, ``block`` or ``stop`` on it but not ``redact``. Read ``plugins/models/TOXICITY.md``
(limits, thresholds, latency) first. In checkstream.yaml it needs no entry; a separate
instance (a test model, say) is::

    classifiers:
      toxicity_test: {type: toxicity, model_path: ./toxicity.onnx, head_path: ./head.npz}

The profanity model is built by ``python -m plugins.training.convert_toxicity``, the heads by
``python -m plugins.training.train_toxicity``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from checkstream import Classification, Classifier, ClassifierFactory, hookimpl
from checkstream.plugins.embeddings import (
    DIMENSIONS,
    MiniLM,
    ModelFileError,
    load_session,
    shared_minilm,
)
from checkstream.plugins.profanity_masks import unmask

TYPE_NAME: Final = "toxicity"
MODEL: Final = Path(__file__).parent / "models" / "toxicity.onnx"
HEAD: Final = Path(__file__).parent / "models" / "toxicity_head.npz"
INPUT: Final = "text"
OUTPUT: Final = "probabilities"
#: Width of the head's input: the profanity feature and two embeddings.
FEATURES: Final = 1 + 2 * DIMENSIONS
#: Width of the context head's input: those and MiniLM's sentence embedding.
CONTEXT_FEATURES: Final = FEATURES + DIMENSIONS
#: Sentences tokenised per call (see ``embedding_features``).
EMBED_BATCH: Final = 64
#: A text scoring this much is not read further by the context head (``classify``), so
#: its score can be up to 1 - SURE below its highest sentence's; thresholds above SURE
#: are not supported.
SURE: Final = 0.99

#: One intra-op thread. The graph is string tokenising, a sparse TF-IDF lookup and five
#: small linear models: a call takes ~0.1-0.2 ms and has almost nothing to split. Measured
#: on the 2-core reference machine (``convert_toxicity --bench``, TOXICITY.md): a second
#: thread never sped up one text; on 16 texts of 600 characters it saved 5-10% while the
#: machine was otherwise quiet but made the call 2.4x slower (6.1 ms vs 2.5 ms) while other
#: processes kept both cores busy, which is the normal state next to Envoy and MiniLM.
THREADS: Final = 1

Matrix = npt.NDArray[np.float32]


def profanity_feature(p_offensive: npt.NDArray[np.float64]) -> Matrix:
    """The profanity model's probability as the head reads it: a clipped log-odds, scaled
    to the order of the embeddings' components."""
    p = np.clip(p_offensive, 1e-4, 1 - 1e-4)
    return np.asarray(np.log(p / (1 - p)) / 5, dtype=np.float32).reshape(-1, 1)


def embedding_features(minilm: MiniLM, sentences: list[str]) -> Matrix:
    """Per sentence, the centred mean and the L2-normalised element-wise maximum of its
    WordPiece token-embedding rows ([CLS] and [SEP] included), [n, 768].

    Sentences are tokenised together, ``EMBED_BATCH`` at a time: on the 16 benchmark
    windows (``bench/classifiers.py``, ~7 sentences each) one batch call took 1.5 ms of CPU
    against 1.95 ms one sentence at a time (alternating rounds), and the slices bound the
    [batch, longest, 384] gather for a text of thousands of sentences.
    """
    out = np.zeros((len(sentences), 2 * DIMENSIONS), dtype=np.float32)
    for start in range(0, len(sentences), EMBED_BATCH):
        ids, mask = minilm.encode(sentences[start : start + EMBED_BATCH])
        rows = np.where(mask[:, :, None] > 0, minilm.table[ids], np.float32(-1e4))
        peak = rows.max(axis=1)
        peak /= np.clip(np.linalg.norm(peak, axis=1, keepdims=True), 1e-12, None)
        out[start : start + len(ids), :DIMENSIONS] = minilm.static(ids, mask)
        out[start : start + len(ids), DIMENSIONS:] = peak
    return out


class ToxicitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Another profanity model (ONNX) with the same input and output (tests use broken ones).
    model_path: Path | None = None
    #: Another head (``.npz`` written by ``train_toxicity``), trained on that model's scores.
    head_path: Path | None = None


# Sentence ends (Latin and CJK) and line breaks.
_SENTENCE = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|\n+")


def sentences_of(text: str) -> list[str]:
    """The sentences the model scores separately (the whole text if it has none)."""
    return [part for part in _SENTENCE.split(text) if part.strip()] or [text]


class Head:
    """The two logistic regressions and their thresholds, read from the ``.npz`` file."""

    def __init__(self, path: Path) -> None:
        try:
            with np.load(path) as arrays:
                self.weights: Matrix = arrays["weights"].astype(np.float32)
                self.bias = float(arrays["bias"])
                self.context_weights: Matrix = arrays["context_weights"].astype(np.float32)
                self.context_bias = float(arrays["context_bias"])
                self.context_from = float(arrays["context_from"])
                self.log_threshold = float(arrays["log_threshold"])
                self.block_threshold = float(arrays["block_threshold"])
        except Exception as exc:  # numpy raises several unrelated types for a bad file
            raise ModelFileError(f"cannot load toxicity head {path}: {exc}") from None
        for name, found, width in (
            ("weights", self.weights, FEATURES),
            ("context_weights", self.context_weights, CONTEXT_FEATURES),
        ):
            if found.shape != (width,):
                raise ModelFileError(
                    f"toxicity head {path} has {found.shape} {name}, not ({width},)"
                )

    @staticmethod
    def _probability(features: Matrix, weights: Matrix, bias: float) -> npt.NDArray[np.float64]:
        logits = features.astype(np.float64) @ weights.astype(np.float64) + bias
        return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float64)

    def static(self, features: Matrix) -> npt.NDArray[np.float64]:
        """Stage 2, on ``FEATURES`` columns."""
        return self._probability(features, self.weights, self.bias)

    def context(self, features: Matrix) -> npt.NDArray[np.float64]:
        """Stage 3, on ``CONTEXT_FEATURES`` columns."""
        return self._probability(features, self.context_weights, self.context_bias)


class Features:
    """The head's input: the profanity model's score and the two static embeddings of each
    sentence. ``train_toxicity`` computes its training features with this very class, so
    training and serving cannot drift apart."""

    def __init__(self, model_path: Path | str = MODEL, threads: int = THREADS) -> None:
        self.model_path = Path(model_path)
        self.threads = threads
        if not self.model_path.is_file():
            raise ModelFileError(f"model file {self.model_path} not found")
        self._session: ort.InferenceSession | None = None
        self._minilm: MiniLM | None = None

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Load the profanity graph (~20 ms) and the process's shared MiniLM tables
        (``shared_minilm``, about 0.5 s the first time); once. onnxruntime's run() is safe
        to call from several threads at once."""
        if self._session is not None:
            return
        session = load_session(self.model_path, self.threads)
        inputs = {i.name: i.type for i in session.get_inputs()}
        outputs = {o.name: o.shape for o in session.get_outputs()}
        # A loadable ONNX file of the wrong kind (another model) must fail at start, not as
        # a 5xx on the first request.
        if inputs.get(INPUT) != "tensor(string)" or OUTPUT not in outputs:
            raise ModelFileError(
                f"model file {self.model_path} is not a toxicity model: expected a string "
                f"input '{INPUT}' and an output '{OUTPUT}', found inputs {sorted(inputs)} "
                f"and outputs {sorted(outputs)}"
            )
        self._minilm = shared_minilm()
        self._session = session

    def profanity(self, sentences: list[str]) -> npt.NDArray[np.float64]:
        """Stage 1: the profanity model's P(offensive) of each sentence as given."""
        self.load()
        assert self._session is not None
        # Lowercased here, not only in the graph: the graph's StringNormalizer lowercases
        # ASCII only, while the original model (scikit-learn) used str.lower(), so "JOSÉ"
        # would miss its vocabulary entry. With this, scores equal the original's (~1e-7).
        feed = np.array([t.lower() for t in sentences], dtype=object).reshape(-1, 1)
        (probabilities,) = self._session.run([OUTPUT], {INPUT: feed})
        return np.clip(np.asarray(probabilities, dtype=np.float64)[:, 1], 0.0, 1.0)

    def contextual(self, sentences: list[str]) -> Matrix:
        """MiniLM's sentence embedding (all six layers) of each sentence, masked profanity
        written out first, [n, 384]: ~16 ms per 128 tokens, so only for the sentences the
        static head is unsure of."""
        self.load()
        assert self._minilm is not None
        return self._minilm.embed([unmask(t) for t in sentences])

    def __call__(self, sentences: list[str]) -> Matrix:
        """[len(sentences), FEATURES]; masked profanity is written out first, as the
        profanity model's vocabulary has only the plain words."""
        self.load()
        assert self._minilm is not None
        plain = [unmask(t) for t in sentences]
        return np.hstack(
            [profanity_feature(self.profanity(plain)), embedding_features(self._minilm, plain)]
        )


class ToxicityClassifier:
    produces_spans = False

    def __init__(
        self,
        name: str,
        model_path: Path | str = MODEL,
        head_path: Path | str = HEAD,
        threads: int = THREADS,
    ) -> None:
        self.name = name
        # Missing files are reported now (config check); the models themselves load once
        # per serving process (checkstream_startup), or on first use.
        self.features = Features(model_path, threads)
        self.head_path = Path(head_path)
        if not self.head_path.is_file():
            raise ModelFileError(f"model file {self.head_path} not found")
        self._head: Head | None = None

    @property
    def model_path(self) -> Path:
        return self.features.model_path

    @property
    def head(self) -> Head:
        self.load()
        assert self._head is not None
        return self._head

    def load(self) -> None:
        if self._head is None:
            self.features.load()
            self._head = Head(self.head_path)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Per text, the highest score of its sentences.

        Scored per sentence because every stage averages over words: one insult inside a
        600-character window (a midstream check) scored 0.11 as a whole and 1.0 alone. The
        first two stages score all sentences of all texts in one call each. A sentence the
        static head is unsure of (``context_from`` or more) gets the context head's score
        instead, most suspicious first, and a text stops there once it scores ``SURE``:
        MiniLM costs milliseconds per sentence, and more sentences could only move the
        text's score between ``SURE`` and 1, across no threshold below ``SURE``.
        """
        if not texts:
            return []
        sentences: list[str] = []
        owners: list[int] = []
        for index, text in enumerate(texts):
            parts = sentences_of(text)
            sentences += parts
            owners += [index] * len(parts)
        head = self.head
        features = self.features(sentences)
        static = head.static(features)
        scores = [0.0] * len(texts)
        unsure: dict[int, list[int]] = {}
        for i, (owner, score) in enumerate(zip(owners, static, strict=True)):
            if score >= head.context_from:
                unsure.setdefault(owner, []).append(i)
            else:
                scores[owner] = max(scores[owner], float(score))
        for owner, indices in unsure.items():
            for i in sorted(indices, key=lambda i: -static[i]):
                if scores[owner] >= SURE:
                    break
                both = np.hstack([features[i : i + 1], self.features.contextual([sentences[i]])])
                scores[owner] = max(scores[owner], float(head.context(both)[0]))
        return [Classification(min(max(s, 0.0), 1.0)) for s in scores]


def create(name: str, settings: Mapping[str, Any]) -> ToxicityClassifier:
    """The ``toxicity`` factory; ``model_path`` and ``head_path`` are optional settings."""
    parsed = ToxicitySettings.model_validate(dict(settings))
    return ToxicityClassifier(name, parsed.model_path or MODEL, parsed.head_path or HEAD)


@hookimpl
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:
    return {TYPE_NAME: create}


@hookimpl
def checkstream_startup(classifiers: Mapping[str, Classifier]) -> None:
    """Load this process's toxicity models before traffic (not during config check)."""
    for classifier in classifiers.values():
        if isinstance(classifier, ToxicityClassifier):
            classifier.load()
