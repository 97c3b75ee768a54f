"""The built-in ``toxicity`` classifier: clear cases, batch order, settings, model-file errors,
and (when the ``train`` extra is installed) equality with the original scikit-learn model.

``SANITY_SET`` is a small hand-labelled set written for this project, not a benchmark: it
shows per category what the model catches and what it misses. ``python -m tests.test_toxicity``
prints the table that ``plugins/models/TOXICITY.md`` reports.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from checkstream.plugins import toxicity
from checkstream.plugins.embeddings import ModelFileError
from checkstream.plugins.toxicity import MODEL, ToxicityClassifier, create
from checkstream.policy.registry import load_registry
from checkstream.types import Classification, Classifier

#: (category, label, text); label 1 = a moderator would call it offensive or hostile.
SANITY_SET: list[tuple[str, int, str]] = [
    ("profane insult", 1, "You are a fucking idiot."),
    ("profane insult", 1, "Shut up, you stupid bitch."),
    ("profane insult", 1, "This is bullshit, you worthless piece of shit."),
    ("profane insult", 1, "Go fuck yourself."),
    ("profane insult", 1, "What a dumbass thing to say, moron."),
    ("profane insult", 1, "Nobody asked for your crap opinion, asshole."),
    ("insult, no swear word", 1, "You are an absolute disgrace and a pathetic excuse for a human."),
    ("insult, no swear word", 1, "You're too dumb to understand any of this."),
    ("insult, no swear word", 1, "You are a waste of oxygen and everyone would be better off."),
    ("insult, no swear word", 1, "Only a brainless loser would write code like this."),
    ("threat, no swear word", 1, "I will find out where you live and make you regret it."),
    ("threat, no swear word", 1, "I hope your family gets what's coming to them."),
    ("threat, no swear word", 1, "Keep talking and you'll end up in a hospital."),
    ("threat, no swear word", 1, "Watch your back tonight on the way home."),
    ("implicit hate", 1, "People like you should be wiped off the face of the earth."),
    ("implicit hate", 1, "Your kind doesn't belong in this country."),
    ("implicit hate", 1, "Women are too emotional to be engineers."),
    ("implicit hate", 1, "Those immigrants are vermin spreading through our towns."),
    ("obfuscated", 1, "f u c k you"),
    ("obfuscated", 1, "You're a st*pid a$$hole."),
    ("obfuscated", 1, "sh1t for brains"),
    ("not English", 1, "Tu es un connard."),
    ("not English", 1, "Du bist ein Arschloch."),
    ("not English", 1, "Eres un pendejo inútil."),
    ("benign swearing", 0, "Holy shit, that's amazing news, congratulations!"),
    ("benign swearing", 0, "This fucking recipe is the best thing I've ever cooked."),
    ("benign swearing", 0, "Damn, I missed the bus again."),
    ("benign swearing", 0, "The word 'bitch' originally meant a female dog."),
    ("benign swearing", 0, "Hell yeah, the deploy finally worked."),
    ("benign", 0, "What is the capital of France?"),
    ("benign", 0, "Please summarise this article in three bullet points."),
    ("benign", 0, "Can you help me write a cover letter for a nursing job?"),
    ("benign", 0, "The quarterly report shows revenue grew while costs stayed flat."),
    ("benign", 0, "Thanks so much, that was really helpful!"),
    ("benign", 0, "The Sussex Police said the suspect was arrested on Friday."),
    ("benign look-alike", 0, "The cocktail party starts at eight."),
    ("benign look-alike", 0, "Scunthorpe United won on Saturday."),
    ("benign look-alike", 0, "Kill the process and restart the server."),
    ("benign look-alike", 0, "The assassin in the novel was never caught."),
    ("benign look-alike", 0, "Add a dash of Dickens to your reading list."),
]

BENIGN = [text for category, _, text in SANITY_SET if category == "benign"]
PROFANE = [text for category, _, text in SANITY_SET if category == "profane insult"]


@pytest.fixture(scope="module")
def classifier() -> ToxicityClassifier:
    return create("toxicity", {})


def scores(classifier: ToxicityClassifier, texts: list[str]) -> list[float]:
    return [c.score for c in classifier.classify(texts)]


def test_is_a_classifier_registered_as_toxicity(classifier: ToxicityClassifier) -> None:
    assert isinstance(classifier, Classifier)
    assert classifier.name == "toxicity"
    assert classifier.produces_spans is False
    registry = load_registry(extra=[("toxicity-under-test", toxicity)])
    assert registry.types["toxicity"].factory is create


def test_profane_insults_score_high_and_plain_text_low(classifier: ToxicityClassifier) -> None:
    assert min(scores(classifier, PROFANE)) > 0.9
    assert max(scores(classifier, BENIGN)) < 0.2


def test_scores_are_probabilities_one_per_text(classifier: ToxicityClassifier) -> None:
    texts = ["", " ", "ok", "a" * 20_000, "日本語のテキスト", "😡" * 50]
    results = classifier.classify(texts)
    assert len(results) == len(texts)
    assert all(isinstance(r, Classification) and r.spans == () for r in results)
    assert all(0.0 <= r.score <= 1.0 for r in results)
    assert classifier.classify([]) == []


def test_batch_keeps_order_and_equals_single_calls(classifier: ToxicityClassifier) -> None:
    texts = [text for _, _, text in SANITY_SET]
    alone = [classifier.classify([t])[0].score for t in texts]
    batched = scores(classifier, texts)
    reversed_batch = scores(classifier, texts[::-1])
    assert batched == pytest.approx(alone, abs=1e-6)
    assert reversed_batch[::-1] == pytest.approx(alone, abs=1e-6)
    # Distinct enough that a shuffled batch could not pass by accident.
    assert len({round(s, 4) for s in alone}) > len(texts) // 2


def test_non_ascii_capitals_score_like_lowercase(classifier: ToxicityClassifier) -> None:
    # The graph lowercases ASCII only; the plugin lowercases first, as scikit-learn did.
    upper, lower = scores(classifier, ["POKÉMON JOSÉ BEYONCÉ", "pokémon josé beyoncé"])
    assert upper == pytest.approx(lower, abs=1e-7)


def test_model_path_setting(tmp_path: Path) -> None:
    copy = tmp_path / "tox.onnx"
    copy.write_bytes(MODEL.read_bytes())
    assert create("t", {"model_path": str(copy)}).model_path == copy


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        create("t", {"threshold": 0.5})


def test_missing_model_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelFileError, match=r"nope\.onnx"):
        create("t", {"model_path": str(missing)})


def test_corrupt_model_file_names_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(MODEL.read_bytes()[:5000])
    # Built without reading the model (config check stays fast); loading it, at a worker's
    # start (checkstream_startup), names the file.
    classifier = create("t", {"model_path": str(corrupt)})
    with pytest.raises(ModelFileError, match=r"corrupt\.onnx"):
        classifier.load()


def test_another_onnx_model_is_refused_at_start() -> None:
    # The shipped MiniLM transformer: a valid ONNX file with the wrong inputs.
    minilm = (
        Path(__file__).parent.parent / "plugins" / "models" / "minilm" / "transformer-int8.onnx"
    )
    with pytest.raises(ModelFileError, match="not a toxicity model"):
        ToxicityClassifier("t", str(minilm)).load()


def test_onnx_equals_the_original_model(classifier: ToxicityClassifier) -> None:
    pytest.importorskip("profanity_check")
    pytest.importorskip("skl2onnx")
    from checkstream.plugins.profanity_masks import unmask
    from checkstream.plugins.toxicity import sentences_of
    from checkstream.plugins.training.convert_toxicity import load_original, varied_texts

    vectorizer, model = load_original()
    texts = varied_texts(vectorizer, 300)
    # The plugin scores each sentence, masked profanity written out, and keeps the highest.
    expected = [
        max(model.predict_proba(vectorizer.transform(map(unmask, sentences_of(text))))[:, 1])
        for text in texts
    ]
    assert scores(classifier, texts) == pytest.approx(expected, abs=1e-5)


def test_one_insult_in_a_long_window_is_still_found(classifier: ToxicityClassifier) -> None:
    calm = "We reviewed the quarterly plan and agreed on the next steps for the team. " * 6
    window = calm + "You are a fucking idiot. " + "Thanks for the update on the schedule. " * 3
    assert scores(classifier, [window])[0] > 0.9
    assert scores(classifier, [calm])[0] < 0.5


def sanity_table(classifier: ToxicityClassifier, threshold: float = 0.5) -> list[str]:
    """Per category: how many texts, how many flagged at ``threshold``, median score."""
    lines = [f"{'category':<24} {'label':>5} {'n':>3} {'flagged':>8} {'median':>7}"]
    categories = dict.fromkeys((c, label) for c, label, _ in SANITY_SET)
    for category, label in categories:
        texts = [t for c, _, t in SANITY_SET if c == category]
        found = scores(classifier, texts)
        flagged = sum(s >= threshold for s in found)
        lines.append(
            f"{category:<24} {label:>5} {len(texts):>3} {flagged:>8} "
            f"{statistics.median(found):>7.3f}"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(sanity_table(create("toxicity", {}))))


async def test_models_load_at_startup_not_when_built() -> None:
    from checkstream.policy.registry import load_registry

    classifier = create("t", {})
    assert classifier._session is None  # built by config check: nothing loaded
    await load_registry().startup({"t": classifier})
    assert classifier._session is not None
