"""The built-in ``prompt_injection`` classifier: P(text holds a prompt-injection attempt).

    # checkstream.yaml: usable by its type name with the shipped model; an entry is needed
    # only for another model file
    classifiers:
      pi_retrained: {type: prompt_injection, model_path: ./retrained.onnx}
    # policy file: 0.52 is the recommended threshold (about 2.5% of benign prompts flagged
    # on the model card's held-out set); block only at 0.8. Read the card's limits
    # (injections hidden in long documents, long technical documents) first.
    policies:
      - name: prompt_injection
        trigger: {classifier: prompt_injection, threshold: 0.52}
        action: log

One ONNX file (``plugins/models/prompt_injection.onnx``, card in
``plugins/models/PROMPT_INJECTION.md``) that scores windows of at most ``WINDOW`` WordPiece
tokens; a text scores as its highest window, so one injected sentence inside a long document
is not diluted, and the model only ever judges window-sized text, which is what it was
trained on (benign documents and code cut into the same windows among them). A window's
score is the mean of two models' probabilities, computed in the one graph:

* a linear model (``plugins/models/prompt_injection_linear.onnx``, retrained by
  ``plugins/training/train_prompt_injection``): word 1-2-gram TF-IDF computed inside the
  graph from the text, plus a learned score per WordPiece token (a logistic-regression head
  on all-MiniLM-L6-v2's input token embeddings), averaged over the window;
* the first transformer layer of all-MiniLM-L6-v2, fine-tuned with a classification head
  on mean- and max-pooled token outputs, dynamically quantised to int8
  (``plugins/training/finetune_prompt_injection``, which also merges the two graphs). It
  reads the same WordPiece ids, so word order and context count, not only which words occur.

The text is normalised here, in Python, identically at training and serving (``normalise``),
and tokenised with the MiniLM WordPiece tokenizer shipped in ``plugins/models/minilm/``.
Scores carry no spans.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer

from checkstream import Classification, Classifier, ClassifierFactory, hookimpl
from checkstream.plugins.embeddings import TOKENIZER, ModelFileError, load_session

TYPE_NAME: Final = "prompt_injection"
MODEL: Final = Path(__file__).parent / "models" / "prompt_injection.onnx"
#: The linear model alone: what ``train_prompt_injection`` writes and the fine-tuning script
#: merges into MODEL. Servable too (``model_path``), at a sixth of the cost per window.
LINEAR_MODEL: Final = MODEL.with_name("prompt_injection_linear.onnx")

#: Graph interface, shared with the training script that writes the model.
TEXT_INPUT: Final = "text"  # string [batch, 1], already ``normalise``d
PIECES_INPUT: Final = "wordpieces"  # int64 [batch, pieces], padded with the vocabulary size
OUTPUT: Final = "p_injection"  # float32 [batch]
#: ONNX metadata key holding the threshold recommended by the model card.
THRESHOLD_KEY: Final = "recommended_threshold"

#: Texts are scored in windows of at most this many WordPiece tokens (both the TF-IDF and
#: the per-token part see only the window), and a text's score is its highest window's. A
#: long document then cannot dilute one injected sentence, and the model only ever judges
#: window-sized texts, which is what it was trained on (long training documents are cut
#: into the same windows by ``windows``).
WINDOW: Final = 64
#: Consecutive windows overlap by WINDOW - STRIDE pieces, so an instruction cut by one
#: window boundary is whole in the next window.
STRIDE: Final = 32
#: Pieces of one text that are scored at most: the first and last halves of this many,
#: which bounds the work per text (64 windows, ~25,000 characters of English) whatever a
#: client sends. Beyond it the middle of a huge text is not read (see the model card).
MAX_PIECES: Final = 6144
#: Characters handed to the tokenizer: it tokenises everything it is given, so a huge text
#: is cut first (8 characters per piece is generous) at its head and tail.
MAX_PIECE_CHARS: Final = 8 * MAX_PIECES

#: One intra-op thread, measured: at batch 1 two threads gain nothing (~170 µs either way
#: for 60 characters), at batch 16 they are slower (16 texts of 128 tokens: 3.7-5.2 ms on
#: one thread, 6.9-10.3 ms on two, over four runs) as the per-row string ops do not
#: parallelise; and on a 2-core machine shared with Envoy and other classifiers a second
#: thread only contends.
THREADS: Final = 1
#: A cascade in front of the shipped model: every window is scored by the linear model
#: first (batched, ~0.6 ms a window), and only windows it scores at least this high go
#: through the combined graph (~3.4 ms a window). A window below it cannot reach 0.52
#: combined (the mean of its linear score and a fine-tuned probability of at most 1), so
#: it scores its linear half, and every decision at a threshold of 0.52 or more is the
#: combined model's. On the card's held-out set 71% of benign windows stop here.
CASCADE_BELOW: Final = 0.04


def _invisible_map() -> dict[int, int | None]:
    table: dict[int, int | None] = {}
    # Zero-width and bidi format characters split or hide words ("ig\u200bnore") without
    # changing what a model reads: drop them so the words are seen whole.
    for start, end in [
        (0x00AD, 0x00AD),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xE0000, 0xE001F),
        (0xE007F, 0xE007F),
    ]:
        table.update(dict.fromkeys(range(start, end + 1)))
    # Unicode tag characters are invisible copies of ASCII, used to smuggle instructions
    # past a human reviewer ("ASCII smuggling"): make the hidden text visible to the model.
    table.update({cp: cp - 0xE0000 for cp in range(0xE0020, 0xE007F)})
    return table


_INVISIBLE: Final = _invisible_map()


def normalise(text: str) -> str:
    """The text as the model sees it, at training and at serving.

    NFKC folds compatibility look-alikes used for obfuscation (full-width letters, ligatures,
    mathematical bold) into plain letters. Lowercasing happens here rather than in the ONNX
    graph because onnxruntime lowercases per character under a C locale, which differs from
    Python for a few letters (Greek final sigma); this way both sides get identical input.
    """
    return unicodedata.normalize("NFKC", text.translate(_INVISIBLE)).lower()


class WordPieces:
    """Token ids for the graph's per-token scores, padded with ``pad_id`` (= vocabulary size,
    which the graph maps to score 0 and leaves out of the mean)."""

    def __init__(self, tokenizer_path: Path | str = TOKENIZER) -> None:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise ModelFileError(f"cannot load tokenizer file {tokenizer_path}: {exc}") from None
        self.pad_id = tokenizer.get_vocab_size()
        # The shipped tokenizer.json pads and truncates to 128 for MiniLM: replace both.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.splitter = tokenizer
        padded = Tokenizer.from_str(tokenizer.to_str())
        padded.enable_truncation(WINDOW)
        padded.enable_padding(pad_id=self.pad_id, pad_token="[PAD]")
        self.tokenizer = padded

    def ids(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        """[len(texts), longest] ids of already-normalised windows (at most WINDOW each; at
        least one column, so an all-empty batch still has a well-formed shape)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)
        if ids.shape[1] == 0:
            return np.full((len(texts), 1), self.pad_id, dtype=np.int64)
        return ids

    def windows(self, text: str) -> list[str]:
        """The windows of one normalised text: the text itself if it has at most WINDOW
        pieces, else overlapping slices of WINDOW pieces, each starting at a word."""
        if len(text) > MAX_PIECE_CHARS:
            half = MAX_PIECE_CHARS // 2
            text = text[:half] + "\n" + text[-half:]
        offsets = self.splitter.encode(text, add_special_tokens=False).offsets
        n = len(offsets)
        if n <= WINDOW:
            return [text]
        if n > MAX_PIECES:
            half = MAX_PIECES // 2
            offsets = offsets[:half] + offsets[-half:]
            n = MAX_PIECES
        starts = list(range(0, n - WINDOW + 1, STRIDE))
        if starts[-1] + WINDOW < n:
            starts.append(n - WINDOW)
        out = []
        for start in starts:
            begin = offsets[start][0]
            # Back to the start of the word, so no window begins inside one ("##ing").
            while begin > 0 and not text[begin - 1].isspace():
                begin -= 1
            out.append(text[begin : offsets[start + WINDOW - 1][1]])
        return out


class PromptInjectionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Another model file with the same interface (tests, or a retrained model).
    model_path: str | None = None


class PromptInjectionClassifier:
    produces_spans = False
    # Injections come in through what users and tools write. System prompts legitimately
    # give instructions, and this model scores them as injections (see the model card).
    sources = frozenset({"user", "tool"})
    # Not inline: a call takes ~1-10 ms, too long for the event loop.

    def __init__(
        self,
        name: str,
        model_path: Path | str = MODEL,
        tokenizer_path: Path | str = TOKENIZER,
        threads: int = THREADS,
    ) -> None:
        self.name = name
        self.model_path = Path(model_path)
        self.threads = threads
        # A missing file is reported now (config check); the model itself loads once per
        # serving process (checkstream_startup), or on first use.
        if not self.model_path.is_file():
            raise ModelFileError(f"model file {self.model_path} not found")
        self.pieces = WordPieces(tokenizer_path)
        self._session: ort.InferenceSession | None = None
        #: The linear model in front of the shipped combined one (CASCADE_BELOW); another
        #: model file is served as it is.
        self._first: ort.InferenceSession | None = None
        self._threshold = 0.5

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            self.load()
        assert self._session is not None
        return self._session

    @property
    def recommended_threshold(self) -> float:
        """The threshold the model was tuned for, from its metadata."""
        self.session  # noqa: B018 - loads the model, whose metadata holds it
        return self._threshold

    def load(self) -> None:
        """Load the model (once); ``ModelFileError`` naming the file if it is corrupt or
        not a prompt-injection model."""
        if self._session is not None:
            return
        session = load_session(self.model_path, threads=self.threads)
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if inputs != {TEXT_INPUT, PIECES_INPUT} or OUTPUT not in outputs:
            raise ModelFileError(
                f"model file {self.model_path} is not a prompt-injection model: inputs "
                f"{sorted(inputs)}, outputs {sorted(outputs)}"
            )
        metadata = session.get_modelmeta().custom_metadata_map
        self._threshold = float(metadata.get(THRESHOLD_KEY, "0.5"))
        if self.model_path.resolve() == MODEL.resolve() and LINEAR_MODEL.is_file():
            self._first = load_session(LINEAR_MODEL, threads=self.threads)
        self._session = session

    def scores(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """The model's P(injection) per text, in order: its highest window's."""
        return self._run([normalise(t) for t in texts])

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        normalised = [normalise(t) for t in texts]
        probabilities = self._run(normalised)
        # A blank text cannot carry an instruction, but the model would give it its
        # intercept: score it 0. min/max guard the [0, 1] contract against float rounding at
        # the sigmoid's ends.
        return [
            Classification(min(1.0, max(0.0, float(p))) if text.strip() else 0.0)
            for text, p in zip(normalised, probabilities, strict=True)
        ]

    def window_scores(self, normalised: list[str]) -> npt.NDArray[np.float32]:
        """P(injection) of each already-normalised window.

        With the shipped model, the linear model scores every window first (one batch), and
        only those at ``CASCADE_BELOW`` or above go on to the combined graph. That graph
        runs one window per call, because the transformer part is dynamically quantised:
        the int8 scale of its activations is computed over the whole input tensor, so in a
        batch a window's score would depend on its batch-mates and their padding. Alone, a
        window always gets the same score (and the per-call overhead, ~0.05 ms, is small
        next to the layer).
        """
        session = self.session
        out = np.zeros(len(normalised), dtype=np.float32)
        todo: Sequence[int] = range(len(normalised))
        if self._first is not None and normalised:
            # The linear graph has no quantised activations: batching it is exact.
            (linear,) = self._first.run([OUTPUT], self._inputs(normalised))
            out = np.asarray(linear, dtype=np.float32).reshape(-1) / 2
            todo = [i for i in todo if out[i] * 2 >= CASCADE_BELOW]
        for i in todo:
            window = normalised[i]
            (probability,) = session.run([OUTPUT], self._inputs([window]))
            out[i] = np.asarray(probability, dtype=np.float32).reshape(-1)[0]
        return out

    def _inputs(self, windows: list[str]) -> dict[str, Any]:
        return {
            TEXT_INPUT: np.array(windows, dtype=object).reshape(-1, 1),
            PIECES_INPUT: self.pieces.ids(windows),
        }

    def _run(self, normalised: list[str]) -> npt.NDArray[np.float32]:
        windows = [self.pieces.windows(t) for t in normalised]
        flat = [w for text_windows in windows for w in text_windows]
        window_p = self.window_scores(flat)
        out = np.zeros(len(normalised), dtype=np.float32)
        at = 0
        for i, text_windows in enumerate(windows):
            out[i] = window_p[at : at + len(text_windows)].max()
            at += len(text_windows)
        return out


def create(name: str, settings: Mapping[str, Any]) -> Classifier:
    parsed = PromptInjectionSettings.model_validate(dict(settings))
    return PromptInjectionClassifier(name, parsed.model_path or MODEL)


@hookimpl
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:
    return {TYPE_NAME: create}


@hookimpl
def checkstream_startup(classifiers: Mapping[str, Classifier]) -> None:
    """Load this process's prompt-injection models before traffic (not during config check)."""
    for classifier in classifiers.values():
        if isinstance(classifier, PromptInjectionClassifier):
            classifier.load()
