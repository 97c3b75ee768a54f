"""The built-in ``toxicity`` classifier: offensive language, scored by a converted
alt-profanity-check model (word TF-IDF + calibrated linear SVM) in onnxruntime.

Score is P(offensive) in [0, 1]; there are no spans (the model scores whole texts), so
policies can ``log``, ``block`` or ``stop`` on it but not ``redact``. Read
``plugins/models/TOXICITY.md`` before relying on it: the model is a profanity detector and
misses hostility phrased without swear words. In checkstream.yaml it needs no entry; a
separate instance (a test model, say) is::

    classifiers:
      toxicity_test: {type: toxicity, model_path: ./toxicity.onnx}

The model file is built by ``python -m plugins.training.convert_toxicity``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from checkstream import Classification, Classifier, ClassifierFactory, hookimpl
from checkstream.plugins.embeddings import ModelFileError, load_session
from checkstream.plugins.profanity_masks import unmask

TYPE_NAME: Final = "toxicity"
MODEL: Final = Path(__file__).parent / "models" / "toxicity.onnx"
INPUT: Final = "text"
OUTPUT: Final = "probabilities"

#: One intra-op thread. The graph is string tokenising, a sparse TF-IDF lookup and five
#: small linear models: a call takes ~0.1-0.2 ms and has almost nothing to split. Measured
#: on the 2-core reference machine (``convert_toxicity --bench``, TOXICITY.md): a second
#: thread never sped up one text; on 16 texts of 600 characters it saved 5-10% while the
#: machine was otherwise quiet but made the call 2.4x slower (6.1 ms vs 2.5 ms) while other
#: processes kept both cores busy, which is the normal state next to Envoy and MiniLM.
THREADS: Final = 1


class ToxicitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Another ONNX file with the same input and output (tests use broken ones).
    model_path: Path | None = None


# Sentence ends (Latin and CJK) and line breaks.
_SENTENCE = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|\n+")


def sentences_of(text: str) -> list[str]:
    """The sentences the model scores separately (the whole text if it has none)."""
    return [part for part in _SENTENCE.split(text) if part.strip()] or [text]


class ToxicityClassifier:
    produces_spans = False

    def __init__(self, name: str, model_path: Path | str = MODEL, threads: int = THREADS) -> None:
        self.name = name
        self.model_path = Path(model_path)
        self.threads = threads
        # A missing file is reported now (config check); the model itself loads once per
        # serving process (checkstream_startup), or on first use.
        if not self.model_path.is_file():
            raise ModelFileError(f"model file {self.model_path} not found")
        self._session: ort.InferenceSession | None = None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            self.load()
        assert self._session is not None
        return self._session

    def load(self) -> None:
        """Load the model (once): building a session parses the 1 MB graph (~20 ms), and
        onnxruntime's run() is safe to call from several threads at once."""
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
        self._session = session

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Per text, the highest P(offensive) of its sentences; one onnxruntime call.

        Scored per sentence because the model averages over words: one insult inside a
        600-character window (a midstream check) scored 0.11 as a whole and 1.0 alone.
        """
        if not texts:
            return []
        sentences: list[str] = []
        owners: list[int] = []
        for index, text in enumerate(texts):
            parts = sentences_of(text)
            sentences += parts
            owners += [index] * len(parts)
        # Lowercased here, not only in the graph: the graph's StringNormalizer lowercases
        # ASCII only, while the original model (scikit-learn) used str.lower(), so "JOSÉ"
        # would miss its vocabulary entry. With this, scores equal the original's (~1e-7).
        # Masked profanity ("f**k", "f u c k") is written out first: the model's vocabulary
        # has only the plain words (plugins/profanity_masks.py).
        feed = np.array([unmask(t).lower() for t in sentences], dtype=object).reshape(-1, 1)
        (probabilities,) = self.session.run([OUTPUT], {INPUT: feed})
        per_sentence = np.clip(np.asarray(probabilities, dtype=np.float64)[:, 1], 0.0, 1.0)
        scores = [0.0] * len(texts)
        for owner, score in zip(owners, per_sentence, strict=True):
            scores[owner] = max(scores[owner], float(score))
        return [Classification(s) for s in scores]


def create(name: str, settings: Mapping[str, Any]) -> ToxicityClassifier:
    """The ``toxicity`` factory; ``model_path`` is the only (optional) setting."""
    parsed = ToxicitySettings.model_validate(dict(settings))
    return ToxicityClassifier(name, parsed.model_path or MODEL)


@hookimpl
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:
    return {TYPE_NAME: create}


@hookimpl
def checkstream_startup(classifiers: Mapping[str, Classifier]) -> None:
    """Load this process's toxicity models before traffic (not during config check)."""
    for classifier in classifiers.values():
        if isinstance(classifier, ToxicityClassifier):
            classifier.load()
