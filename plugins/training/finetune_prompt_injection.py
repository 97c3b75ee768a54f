"""Fine-tune the first layer(s) of MiniLM on prompt-injection windows; export to ONNX.

Run ``.venv/bin/python -m plugins.training.finetune_prompt_injection`` (needs the ``train``
and ``finetune`` extras; the latter is ``torch==2.13.0``, CPU). It writes a candidate model
file (``--out``) with the same interface as ``plugins/models/prompt_injection.onnx`` (inputs
``text`` and ``wordpieces``, output ``p_injection``), so the plugin serves it unchanged.

Data: exactly the linear model's training set (``train_prompt_injection.load_splits`` and
its ``Trainer.train_on("both")``: S-Labs and neuralchemy train splits, chit-chat at weight 10,
the ``pi_corpora`` windows with their ``EXTRA_WEIGHTS``) plus short fragments of a fifth of
the benign document and code windows (``document_fragments``), class-balanced by weight. Texts
longer than one window are read at their first ``WINDOW`` pieces, as the linear model's
token part reads them; document and code sources are already cut into served windows.

Model (``pi_transformer.WindowClassifier``): [CLS] + the window's pieces, MiniLM's frozen
word embeddings as shipped, its first ``--layers`` transformer layers (fine-tuned), mean
pooling, one linear head. AdamW, linear warm-up and decay, length-bucketed batches, seeded.

Export: the network to ONNX (opset 17), its MatMuls dynamically quantised to int8 (per
channel), the word-embedding table stored as uint8; then merged with the shipped linear
graph so one file computes both, and ``p_injection`` = ``--mix`` x linear + (1 - ``--mix``)
x transformer per window (``--mix 0``: the transformer alone). The plugin takes a text's
highest window.

Threshold: as the linear model's (``train_prompt_injection.quick``): the best mean F1 over
the S-Labs and neuralchemy validation splits (texts scored as served: windows, max) among
thresholds keeping the false-positive rate of unseen document windows
(``docs/validation``) at or under 2%. The held-out set (``bench/heldout``) is not read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from sklearn.metrics import f1_score, roc_auc_score

from checkstream.plugins.prompt_injection import (
    LINEAR_MODEL,
    MODEL,
    OUTPUT,
    PIECES_INPUT,
    THRESHOLD_KEY,
    PromptInjectionClassifier,
    WordPieces,
)
from checkstream.plugins.training.pi_transformer import POOLINGS, WindowClassifier
from checkstream.plugins.training.train_prompt_injection import (
    EXTRA_WEIGHTS,
    MAX_DOCS_FPR,
    THRESHOLDS,
    Split,
    load_splits,
)

SEED = 0
CHITCHAT_WEIGHT = 10.0
OPSET = 17
#: Output of the transformer part inside the merged graph, kept for diagnostics.
TRANSFORMER_OUTPUT = "p_transformer"
LINEAR_OUTPUT = "p_linear"
#: Torch float32 against the exported float32 graph: rounding only.
EXPORT_TOLERANCE = 1e-4


def training_set(
    splits: dict[str, Split],
) -> tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Texts, labels and class-balanced sample weights (mean 1) of the linear model's
    training set."""
    names = ["s-labs/train", "neuralchemy/train", "chitchat/train", *EXTRA_WEIGHTS]
    texts: list[str] = []
    labels: list[float] = []
    weights: list[float] = []
    for name in names:
        split = splits[name]
        weight = CHITCHAT_WEIGHT if name == "chitchat/train" else EXTRA_WEIGHTS.get(name, 1.0)
        texts += split.texts
        labels += [float(y) for y in split.y]
        weights += [weight] * len(split.y)
    fragments = document_fragments(
        [t for name in DOCUMENT_SPLITS for t in splits[name].texts], FRAGMENT_SHARE
    )
    texts += fragments
    labels += [0.0] * len(fragments)
    weights += [1.0] * len(fragments)
    y = np.array(labels, np.float32)
    w = np.array(weights, np.float32)
    # Balanced like class_weight="balanced": each class carries half the total weight.
    for label in (0.0, 1.0):
        w[y == label] *= 0.5 * w.sum() / w[y == label].sum()
    return texts, y, w / w.mean()


#: Benign document and code windows; a share of them is also cut into short fragments.
DOCUMENT_SPLITS = ("docs/train", "code/train", "debian-docs/train")
FRAGMENT_SHARE = 0.2


def document_fragments(windows: list[str], share: float) -> list[str]:
    """Short pieces (40-250 characters, from a word start to a word end) of a seeded share
    of the benign document windows.

    The windows are all about 64 pieces long, so without these the only short texts in
    training are prompts: a first network flagged 20% of short benign texts, nearly all of
    them a line or two of release notes or code (a pasted snippet, or the last window's
    worth of a short text), which the linear model, reading words, does not.
    """
    rng = random.Random(SEED)
    out = []
    for window in windows:
        if rng.random() >= share or len(window) < 80:
            continue
        starts = [0] + [i + 1 for i, ch in enumerate(window[: len(window) // 2]) if ch.isspace()]
        start = rng.choice(starts)
        end = min(len(window), start + rng.randrange(40, 250))
        while end < len(window) and not window[end].isspace():
            end += 1
        fragment = window[start:end].strip()
        if fragment:
            out.append(fragment)
    return out


def encode(pieces: WordPieces, texts: list[str]) -> list[npt.NDArray[np.int64]]:
    """Each text's ids (at most WINDOW), without padding."""
    out = []
    for start in range(0, len(texts), 512):
        for row in pieces.ids(texts[start : start + 512]):
            out.append(row[row != pieces.pad_id])
    return out


def pad(rows: list[npt.NDArray[np.int64]], pad_id: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad_id, np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def batches(lengths: list[int], size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding, same randomness)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    out = []
    for start in range(0, len(order), size * 50):
        chunk = sorted(order[start : start + size * 50], key=lambda i: lengths[i])
        out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(out)
    return out


def train(
    model: WindowClassifier,
    ids: list[npt.NDArray[np.int64]],
    y: npt.NDArray[np.float32],
    w: npt.NDArray[np.float32],
    epochs: float,
    lr: float,
    batch_size: int,
) -> None:
    rng = random.Random(SEED)
    plan: list[list[int]] = []
    while len(plan) < epochs * len(ids) / batch_size:
        plan += batches([len(r) for r in ids], batch_size, rng)
    plan = plan[: int(epochs * len(ids) / batch_size)]
    head = list(model.head.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    optimiser = torch.optim.AdamW(
        [{"params": body, "lr": lr}, {"params": head, "lr": lr * 10}], weight_decay=0.01
    )
    warmup = max(1, len(plan) // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min((step + 1) / warmup, max(0.0, (len(plan) - step) / (len(plan) - warmup))),
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    model.train()
    started = time.perf_counter()
    running = 0.0
    for step, batch in enumerate(plan):
        logits = model(pad([ids[i] for i in batch], model.pad_id))
        loss = (loss_fn(logits, torch.from_numpy(y[batch])) * torch.from_numpy(w[batch])).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        running = 0.98 * running + 0.02 * float(loss)
        if step % 200 == 0 or step == len(plan) - 1:
            elapsed = time.perf_counter() - started
            print(f"  step {step + 1}/{len(plan)} loss {running:.4f} {elapsed:.0f} s", flush=True)
    model.eval()


@torch.no_grad()
def window_logits(
    model: WindowClassifier, pieces: WordPieces, windows: list[str]
) -> npt.NDArray[np.float32]:
    ids = encode(pieces, windows)
    out = np.zeros(len(windows), np.float32)
    order = np.argsort([len(r) for r in ids], kind="stable")
    for start in range(0, len(order), 128):
        index = order[start : start + 128]
        out[index] = model(pad([ids[i] for i in index], model.pad_id)).numpy()
    return out


def text_scores(
    window_p: dict[str, float], pieces: WordPieces, texts: list[str]
) -> npt.NDArray[np.float64]:
    """A text's score as served: its highest window's."""
    return np.array([max(window_p[w] for w in pieces.windows(t)) for t in texts])


def choose_threshold(
    validation: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]],
    docs: npt.NDArray[np.float64],
) -> tuple[float, float]:
    """The linear model's rule: best mean validation F1 with docs FPR <= MAX_DOCS_FPR;
    returns (threshold, mean F1)."""
    means = [
        statistics.fmean(f1_score(y, p >= t, zero_division=0) for y, p in validation)
        for t in THRESHOLDS
    ]
    allowed = [i for i, t in enumerate(THRESHOLDS) if float((docs >= t).mean()) <= MAX_DOCS_FPR]
    best = max(allowed, key=lambda i: means[i])
    return float(THRESHOLDS[best]), means[best]


def export_transformer(model: WindowClassifier, path: Path) -> None:
    """The network as float32 ONNX: ``wordpieces`` -> ``p_transformer`` (a probability)."""

    class Probability(torch.nn.Module):
        def __init__(self, inner: WindowClassifier) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.inner(ids))

    example = torch.full((2, 16), 1000, dtype=torch.int64)
    torch.onnx.export(
        Probability(model).eval(),
        (example,),
        str(path),
        input_names=[PIECES_INPUT],
        output_names=[TRANSFORMER_OUTPUT],
        dynamic_axes={PIECES_INPUT: {0: "batch", 1: "pieces"}, TRANSFORMER_OUTPUT: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def merge(
    linear_path: Path,
    transformer: onnx.ModelProto,
    mix: float,
    threshold: float,
    notes: dict[str, str],
) -> onnx.ModelProto:
    """One graph with the shipped linear model's interface: ``p_injection`` = mix x the
    linear model + (1 - mix) x the transformer, per window. With mix 0 the linear part is
    left out and the ``text`` input is unused."""
    linear = onnx.load(str(linear_path))
    linear = onnx.compose.add_prefix(linear, "linear/", rename_inputs=False, rename_outputs=False)
    transformer = onnx.compose.add_prefix(
        transformer, "transformer/", rename_inputs=False, rename_outputs=False
    )
    for node in linear.graph.node:  # its output becomes the linear part's
        node.output[:] = [LINEAR_OUTPUT if o == OUTPUT else o for o in node.output]
    nodes = list(transformer.graph.node)
    initializers = list(transformer.graph.initializer)
    if mix > 0:
        nodes += linear.graph.node
        initializers += linear.graph.initializer
        initializers += [
            helper.make_tensor("mix_linear", TensorProto.FLOAT, [], [mix]),
            helper.make_tensor("mix_transformer", TensorProto.FLOAT, [], [1 - mix]),
        ]
        nodes += [
            helper.make_node("Mul", [LINEAR_OUTPUT, "mix_linear"], ["weighted_linear"]),
            helper.make_node(
                "Mul", [TRANSFORMER_OUTPUT, "mix_transformer"], ["weighted_transformer"]
            ),
            helper.make_node("Add", ["weighted_linear", "weighted_transformer"], [OUTPUT]),
        ]
    else:
        nodes.append(helper.make_node("Identity", [TRANSFORMER_OUTPUT], [OUTPUT]))
    graph = helper.make_graph(
        nodes,
        "prompt_injection_minilm_head",
        list(linear.graph.input),
        [
            helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(TRANSFORMER_OUTPUT, TensorProto.FLOAT, ["batch"]),
        ],
        initializers,
    )
    opsets = {o.domain: o.version for o in transformer.opset_import}
    if mix > 0:
        for o in linear.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]
    )
    model.ir_version = max(linear.ir_version, transformer.ir_version)
    metadata = {
        THRESHOLD_KEY: f"{threshold:g}",
        "producer": "plugins/training/finetune_prompt_injection.py",
        "mix_linear": f"{mix:g}",
        **notes,
    }
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MODEL, help="model file to write")
    parser.add_argument("--linear", type=Path, default=LINEAR_MODEL, help="linear model to merge")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--pooling", choices=POOLINGS, default="mean+max")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--mix",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75],
        help="linear weights to evaluate; the best by mean validation F1 is exported",
    )
    parser.add_argument("--checkpoint", type=Path, help="save/load the fine-tuned weights here")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    print("Loading data ...", flush=True)
    splits = load_splits()
    pieces = WordPieces()
    texts, y, w = training_set(splits)
    ids = encode(pieces, texts)
    print(
        f"{len(texts)} training texts ({int(y.sum())} injections), "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    model = WindowClassifier(args.layers, pieces.pad_id, args.pooling)
    if args.checkpoint and args.checkpoint.exists():
        model.load_state_dict(torch.load(args.checkpoint))
        model.eval()
    else:
        train_started = time.perf_counter()
        train(model, ids, y, w, args.epochs, args.lr, args.batch)
        print(f"trained in {time.perf_counter() - train_started:.0f} s", flush=True)
        if args.checkpoint:
            torch.save(model.state_dict(), args.checkpoint)

    # Validation, scored as served: every window of a text, its highest.
    linear = PromptInjectionClassifier("linear", args.linear)
    names = ["s-labs/validation", "neuralchemy/validation", "docs/validation"]
    windows = sorted({w for n in names for t in splits[n].texts for w in pieces.windows(t)})
    transformer_p = 1 / (1 + np.exp(-window_logits(model, pieces, windows).astype(np.float64)))
    linear_p = np.concatenate(
        [linear.window_scores(windows[i : i + 256]) for i in range(0, len(windows), 256)]
    ).astype(np.float64)
    results = []
    for mix in args.mix:
        window_p = dict(zip(windows, mix * linear_p + (1 - mix) * transformer_p, strict=True))
        validation = [
            (splits[n].y, text_scores(window_p, pieces, splits[n].texts)) for n in names[:2]
        ]
        docs = text_scores(window_p, pieces, splits["docs/validation"].texts)
        threshold, mean_f1 = choose_threshold(validation, docs)
        aucs = [roc_auc_score(y_, p) for y_, p in validation]
        print(
            f"mix {mix:g}: threshold {threshold:g}, validation mean F1 {mean_f1:.4f}, "
            f"AUC S-Labs {aucs[0]:.4f} neuralchemy {aucs[1]:.4f}, "
            f"docs FPR {float((docs >= threshold).mean()):.4f}",
            flush=True,
        )
        results.append((mean_f1, -args.mix.index(mix), mix, threshold))
    _, _, mix, threshold = max(results)
    print(f"exporting mix {mix:g} at threshold {threshold:g}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        float32 = Path(tmp) / "float32.onnx"
        int8 = Path(tmp) / "int8.onnx"
        export_transformer(model, float32)
        quantize_dynamic(
            float32,
            int8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        )
        notes = {
            "layers": str(args.layers),
            "pooling": args.pooling,
            "epochs": f"{args.epochs:g}",
            "training_seconds": f"{time.perf_counter() - started:.0f}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
        }
        onnx.save(merge(args.linear, onnx.load(str(int8)), mix, threshold, notes), str(args.out))
        # Export parity: the float32 graph against torch, on validation windows.
        import onnxruntime as ort

        session = ort.InferenceSession(str(float32), providers=["CPUExecutionProvider"])
        sample = windows[:: max(1, len(windows) // 300)]
        onnx_p = np.array(
            [session.run(None, {PIECES_INPUT: pieces.ids([s])})[0][0] for s in sample]
        )
        torch_p = 1 / (1 + np.exp(-window_logits(model, pieces, sample)))
        export_diff = float(np.abs(onnx_p - torch_p).max())
    served = PromptInjectionClassifier("candidate", args.out)
    served_p = np.array([served.window_scores([s])[0] for s in sample])
    expected = mix * np.array([linear.window_scores([s])[0] for s in sample]) + (1 - mix) * torch_p
    int8_diff = np.abs(served_p - expected)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, sha256 {digest}); "
        f"max |onnx float32 - torch| {export_diff:.1e}; int8 served vs torch: "
        f"max {int8_diff.max():.3f}, mean {int8_diff.mean():.4f} over {len(sample)} windows; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    return 0 if export_diff <= EXPORT_TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
