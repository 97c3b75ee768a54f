"""Convert the alt-profanity-check model to ``plugins/models/toxicity.onnx`` and verify it.

Run ``python -m plugins.training.convert_toxicity [--out PATH]`` (needs the ``train`` extra:
alt-profanity-check, scikit-learn, skl2onnx, onnx). With ``--bench`` it only times the plugin
on the model at ``--out``, one versus two onnxruntime threads.

alt-profanity-check 1.9.1 (MIT) ships two joblib files: a word ``TfidfVectorizer`` (unigrams,
English stop words) and a ``CalibratedClassifierCV`` over five ``LinearSVC`` folds (sigmoid
calibration). ``make_pipeline(vectorizer, model)`` converts to one ONNX graph taking a string
tensor ``[n, 1]`` and returning ``probabilities`` ``[n, 2]``; column 1 is P(offensive).

Three deviations from skl2onnx's defaults, each needed for identical scores or a working file:

* ``locale: C.UTF-8`` on the vectorizer: skl2onnx's default (``en_US.UTF-8``) makes
  onnxruntime fail at session start on machines without that locale, which is most containers.
* ``zipmap: False`` on the classifier: a plain float tensor instead of a list of dicts, so
  the plugin reads one array and never builds Python dicts per text.
* the Tokenizer node's pattern is replaced by a Unicode one (see ``convert``).

The graph still lowercases ASCII only, so callers lowercase with ``str.lower()`` first
(``prepare``; the plugin does the same).

After writing the file the script scores a few hundred varied strings (hand-written edge
cases plus seeded random mixtures of the vectorizer's own vocabulary, so offensive and benign
words both occur at many densities) with the original model and with onnxruntime, prints the
largest absolute difference of P(offensive) and exits non-zero if it exceeds ``TOLERANCE``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import joblib  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
from skl2onnx.common.data_types import StringTensorType  # type: ignore[import-untyped]
from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]

from checkstream.plugins.embeddings import load_session

OUT = Path(__file__).resolve().parent.parent / "models" / "toxicity.onnx"
# float32 inside onnxruntime versus float64 in scikit-learn: differences of ~1e-7 are
# expected; anything near 1e-4 would mean a tokenisation mismatch, not rounding.
TOLERANCE = 1e-5
UNICODE_WORD = r"[\p{L}\p{N}_]+"

HAND_WRITTEN = [
    "",
    " ",
    "a",
    "Hello, how are you today?",
    "What is the capital of France?",
    "Please summarise this article about renewable energy in three bullet points.",
    "You are a fucking idiot.",
    "FUCK YOU",
    "fuck",
    "Fuck!!!",
    "f*ck you",
    "what the hell is this shit",
    "This movie was shit, honestly.",
    "Holy shit, that's amazing news, congratulations!",
    "Shut up, you stupid moron.",
    "you're such a bitch",
    "son of a bitch, I stubbed my toe",
    "I will find where you live and hurt you.",
    "People like you don't deserve to live.",
    "Go back to where you came from.",
    "The assassin killed the king in act three.",
    "Scunthorpe United won the match.",
    "The cocktail party starts at 8pm; bring a dictionary.",
    "My grandmother's dog is a female dog, a bitch in breeding terms.",
    "Assess the class assignment.",
    "Kill the process with SIGTERM, then restart the daemon.",
    "idiot-proof instructions for setting up your router",
    "don't be a jerk",
    "stupid stupid stupid",
    "You absolute donkey.",
    "Wikipedia talk page: please stop vandalising the article.",
    "user_talk wikipedia_talk __toc__ fair_use",
    "Café naïve résumé jalapeño",
    "pokémon josé beyoncé expért",
    "POKÉMON JOSÉ BEYONCÉ ΜΕΛ ΕΤΗΤΗΣ",
    "İstanbul ǅemal ﬁne ﬂuff \uff26\uff35\uff23\uff2b \uff53\uff48\uff49\uff54",  # fullwidth
    "fuck\u0301 shi\u0308t a\u200bss",
    "Пошёл ты, идиот",
    "Tu es un connard",
    "Du bist ein Arschloch",
    "馬鹿野郎",
    "連絡 見学 迷惑",
    "μελ ετητης βcommand",
    "😀😡🤬 💩",
    "fuck😡",
    "shit💩shit",
    "shitñ fuckß",
    "ÄSSHOLE Asshole aSSHOLE",
    "tab\tseparated\ttext\nwith newlines\r\nand carriage returns",
    "numbers 1992 2005 42 3.14 0x1f",
    "under_score snake_case_identifier __dunder__",
    "hyphen-ated words-and-more-hyphens",
    "it's can't won't y'all",
    "<b>html</b> &amp; entities &lt;script&gt;",
    "http://example.com/fuck?shit=1",
    "email me at someone@example.com",
    "a" * 5000,
    "lorem ipsum " * 400,
    "stupid " * 300,
]


def load_original() -> tuple[Any, Any]:
    data = resources.files("profanity_check") / "data"
    with warnings.catch_warnings():
        # Should the installed scikit-learn differ from the one that pickled these files, its
        # version warning says nothing useful: the comparison below is what tells.
        warnings.simplefilter("ignore")
        vectorizer = joblib.load(str(data / "vectorizer.joblib"))
        model = joblib.load(str(data / "model.joblib"))
    return vectorizer, model


def convert(vectorizer: Any, model: Any) -> bytes:
    pipeline = make_pipeline(vectorizer, model)
    onx = convert_sklearn(
        pipeline,
        initial_types=[("text", StringTensorType([None, 1]))],
        options={id(vectorizer): {"locale": "C.UTF-8"}, id(model): {"zipmap": False}},
    )
    # skl2onnx turns the vectorizer's token pattern (?u)\b\w\w+\b into [a-zA-Z0-9_]+ because
    # onnxruntime's regex engine (RE2) has an ASCII-only \w. Python's Unicode \w is exactly
    # [\p{L}\p{N}_] (checked over every code point with unicodedata 14), so this pattern
    # splits text where scikit-learn does: with the ASCII one, "fuckß" became the vocabulary
    # word "fuck" in ONNX but the unknown word "fuckß" in scikit-learn.
    (tokenizer,) = [node for node in onx.graph.node if node.op_type == "Tokenizer"]
    (tokenexp,) = [a for a in tokenizer.attribute if a.name == "tokenexp"]
    tokenexp.s = UNICODE_WORD.encode()
    return bytes(onx.SerializeToString())


def varied_texts(vectorizer: Any, count: int = 400, seed: int = 20261123) -> list[str]:
    """Hand-written edge cases, then random vocabulary mixtures up to ``count`` strings."""
    rng = random.Random(seed)
    vocabulary = sorted(vectorizer.vocabulary_)
    separators = [" ", "  ", ", ", ". ", "! ", "\n", "-", "'", "?"]
    # Letters, digits and marks from other scripts glued to words: where tokenisers disagree.
    foreign = "éßñøçÄÖÜ日本語Жжαβ٣४½\u0301\u200b😀"
    texts = list(HAND_WRITTEN)
    while len(texts) < count:
        words = rng.choices(vocabulary, k=rng.randint(1, 40))
        if rng.random() < 0.3:
            words = [w.upper() if rng.random() < 0.5 else w.capitalize() for w in words]
        if rng.random() < 0.3:
            words = [w + rng.choice(foreign) if rng.random() < 0.3 else w for w in words]
        texts.append("".join(w + rng.choice(separators) for w in words).strip())
    return texts


def prepare(texts: list[str]) -> npt.NDArray[np.object_]:
    """The model's input for ``texts``, as the plugin builds it.

    Texts are lowercased in Python first: the graph's StringNormalizer lowercases only ASCII
    under the C.UTF-8 locale ("JOSÉ" stays "josÉ" and misses the vocabulary word "josé"),
    while scikit-learn uses ``str.lower()``. Lowercasing first makes the graph's own
    lowercasing a no-op.
    """
    return np.array([t.lower() for t in texts], dtype=object).reshape(-1, 1)


def max_difference(path: Path, vectorizer: Any, model: Any, texts: list[str]) -> float:
    expected = model.predict_proba(vectorizer.transform(texts))[:, 1]
    session = load_session(path, threads=1)
    (probabilities,) = session.run(["probabilities"], {"text": prepare(texts)})
    diff = np.abs(np.asarray(probabilities)[:, 1].astype(np.float64) - expected)
    worst = int(np.argmax(diff))
    raw = np.array(texts, dtype=object).reshape(-1, 1)
    (unlowered,) = session.run(["probabilities"], {"text": raw})
    raw_diff = np.abs(np.asarray(unlowered)[:, 1].astype(np.float64) - expected)
    print(
        f"{len(texts)} texts; max |P_onnx - P_sklearn| = {diff[worst]:.3g} "
        f"(text {worst}: {texts[worst][:60]!r}); mean {diff.mean():.3g}; "
        f"P(offensive) range in the set {expected.min():.3f}..{expected.max():.3f}, "
        f"{int((expected >= 0.5).sum())} of them >= 0.5"
    )
    print(
        f"without lowercasing in Python first: max difference {raw_diff.max():.3g}, "
        f"{int((raw_diff > TOLERANCE).sum())} texts off (non-ASCII capitals)"
    )
    return float(diff[worst])


def bench(model: Path, rounds: int = 7) -> None:
    """Median microseconds per ``classify`` call of the plugin, 1 versus 2 threads.

    Rounds alternate between the two sessions so that load from other processes on the
    machine hits both alike; the median of the rounds is printed.
    """
    from checkstream.plugins.toxicity import ToxicityClassifier

    sentence = "The quarterly report shows revenue grew, but the damn forecast is too rosy. "
    window = (sentence * 12)[:600]  # ~128 MiniLM tokens, a midstream window
    cases = {
        "1 x 60 chars": [sentence[:60]],
        "1 x 600 chars (~128 tokens)": [window],
        "16 x 600 chars": [window] * 16,
        "1 x 2,000 chars": [(sentence * 30)[:2000]],
    }
    classifiers = {t: ToxicityClassifier("bench", model, threads=t) for t in (1, 2)}
    timings: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for case, texts in cases.items():
            for threads, classifier in classifiers.items():
                for _ in range(20):
                    classifier.classify(texts)
                calls = 200
                start = time.perf_counter()
                for _ in range(calls):
                    classifier.classify(texts)
                elapsed = (time.perf_counter() - start) / calls * 1e6
                timings.setdefault((case, threads), []).append(elapsed)
    print(f"{'call':<30} {'1 thread':>10} {'2 threads':>10}   (median us per call)")
    for case in cases:
        one, two = (statistics.median(timings[case, t]) for t in (1, 2))
        print(f"{case:<30} {one:>10.0f} {two:>10.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--count", type=int, default=400, help="texts to verify on")
    parser.add_argument("--bench", action="store_true", help="only time the model at --out")
    args = parser.parse_args(argv)
    if args.bench:
        bench(args.out)
        return 0
    vectorizer, model = load_original()
    args.out.write_bytes(convert(vectorizer, model))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    worst = max_difference(args.out, vectorizer, model, varied_texts(vectorizer, args.count))
    if worst > TOLERANCE:
        print(f"FAILED: difference above {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
