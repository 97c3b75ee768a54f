"""The built-in ``toxicity`` classifier: clear cases, hard look-alikes, batch order, settings,
model-file errors, and (when the ``train`` extra is installed) equality of its first stage with
the original scikit-learn model.

``SANITY_SET`` is a small hand-labelled set written for this project, not a benchmark: it
shows per category what the model catches and what it misses. ``python -m tests.test_toxicity``
prints the table that ``plugins/models/TOXICITY.md`` reports.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from checkstream.plugins import toxicity
from checkstream.plugins.embeddings import ModelFileError
from checkstream.plugins.toxicity import (
    CONTEXT_FEATURES,
    FEATURES,
    HEAD,
    MODEL,
    ToxicityClassifier,
    create,
)
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
    # The graph lowercases ASCII only; the plugin lowercases first, as scikit-learn did. The
    # MiniLM tokenizer is uncased, so the whole score is case-blind.
    upper, lower = scores(classifier, ["POKÉMON JOSÉ BEYONCÉ", "pokémon josé beyoncé"])
    assert upper == pytest.approx(lower, abs=1e-6)
    profanity = classifier.features.profanity(["POKÉMON JOSÉ BEYONCÉ", "pokémon josé beyoncé"])
    assert profanity[0] == pytest.approx(profanity[1], abs=1e-7)


def test_model_path_and_head_path_settings(tmp_path: Path) -> None:
    copy, head = tmp_path / "tox.onnx", tmp_path / "head.npz"
    copy.write_bytes(MODEL.read_bytes())
    head.write_bytes(HEAD.read_bytes())
    built = create("t", {"model_path": str(copy), "head_path": str(head)})
    assert (built.model_path, built.head_path) == (copy, head)
    assert built.classify(["Go fuck yourself."])[0].score > 0.9


def test_missing_head_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"nohead\.npz"):
        create("t", {"head_path": str(tmp_path / "nohead.npz")})


def test_corrupt_or_wrong_head_names_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(HEAD.read_bytes()[:100])
    with pytest.raises(ModelFileError, match=r"corrupt\.npz"):
        create("t", {"head_path": str(corrupt)}).load()
    with np.load(HEAD) as shipped:
        arrays = dict(shipped)
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, **{**arrays, "context_weights": np.zeros(10, np.float32)})
    with pytest.raises(ModelFileError, match=r"narrow\.npz has \(10,\) context_weights"):
        create("t", {"head_path": str(narrow)}).load()
    older = tmp_path / "older.npz"  # a head file without the context head
    np.savez(older, **{k: v for k, v in arrays.items() if not k.startswith("context")})
    with pytest.raises(ModelFileError, match=r"older\.npz"):
        create("t", {"head_path": str(older)}).load()


def test_shipped_thresholds_are_ordered_probabilities(classifier: ToxicityClassifier) -> None:
    head = classifier.head
    # The context head's cut-off is below both thresholds: a sentence it skips could not
    # have been flagged by the static score either.
    assert 0.0 < head.context_from < head.log_threshold < head.block_threshold < 1.0


def record_contextual(
    classifier: ToxicityClassifier, monkeypatch: pytest.MonkeyPatch
) -> list[list[str]]:
    """The batches of sentences the context stage (MiniLM) is asked for, from now on."""
    contextual = classifier.features.contextual
    embedded: list[list[str]] = []

    def recording(batch: list[str]) -> np.ndarray:
        embedded.append(batch)
        return contextual(batch)

    monkeypatch.setattr(classifier.features, "contextual", recording)
    return embedded


def test_context_head_runs_only_where_the_static_head_is_unsure(
    classifier: ToxicityClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    calm, threat = "What is the capital of France?", "Keep talking and you'll end up in a hospital."
    static = classifier.head.static(classifier.features([calm, threat]))
    assert static[0] < classifier.head.context_from <= static[1]
    contextual = classifier.features.contextual
    embedded = record_contextual(classifier, monkeypatch)
    found = scores(classifier, [calm, threat])
    assert embedded == [[threat]]
    assert found[0] == pytest.approx(static[0])
    both = np.hstack([classifier.features([threat]), contextual([threat])])
    assert found[1] == pytest.approx(classifier.head.context(both)[0])


def test_a_text_is_read_no_further_once_it_is_sure(
    classifier: ToxicityClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    sure, unsure = "Go fuck yourself, you worthless idiot.", "I know where you live."
    assert scores(classifier, [sure])[0] >= toxicity.SURE
    embedded = record_contextual(classifier, monkeypatch)
    # The most suspicious sentence is read first, whatever its position.
    assert scores(classifier, [f"{unsure} {sure}"])[0] >= toxicity.SURE
    assert embedded == [[sure]]


def test_features_are_one_row_per_sentence(classifier: ToxicityClassifier) -> None:
    sentences = ["f**k off", "fuck off", "The cock crowed at dawn.", "", "x " * 3000]
    features = classifier.features(sentences)
    assert features.shape == (len(sentences), FEATURES)
    assert np.isfinite(features).all()
    # Masked profanity is written out before every stage reads it.
    assert features[0] == pytest.approx(features[1], abs=1e-6)
    contextual = classifier.features.contextual(sentences[:2])
    assert contextual.shape == (2, CONTEXT_FEATURES - FEATURES)
    assert contextual[0] == pytest.approx(contextual[1], abs=1e-6)
    # More sentences than one tokenizer call: the same rows as one by one.
    many = [f"Sentence number {i} about the weather." for i in range(150)]
    together = classifier.features(many)
    assert together[[0, 70, 149]] == pytest.approx(
        np.vstack([classifier.features([many[i]]) for i in (0, 70, 149)]), abs=1e-5
    )


#: A threat and a sexual proposition without a swear word, which the profanity model alone
#: scored below 0.5.
HOSTILE_WITHOUT_SWEARING = [
    "I will find out where you live and make you regret it.",
    "Keep talking and you'll end up in a hospital.",
    "Describe in detail how you would undress me and touch me.",
]
#: Words a profanity list gets wrong, in harmless sentences (0.88-0.99 from the profanity
#: model alone).
HARMLESS_LOOK_ALIKES = [
    "The word 'bitch' originally meant a female dog.",
    "What does the word 'bastard' mean in old English law?",
    "The cock crowed at dawn on the farm.",
]


def test_the_head_separates_hostility_from_look_alikes(classifier: ToxicityClassifier) -> None:
    block = classifier.head.block_threshold
    assert min(scores(classifier, HOSTILE_WITHOUT_SWEARING)) > block
    assert max(scores(classifier, HARMLESS_LOOK_ALIKES)) < classifier.head.log_threshold
    # ... although the profanity stage alone gets both wrong.
    assert max(classifier.features.profanity(HOSTILE_WITHOUT_SWEARING)) < 0.5
    assert min(classifier.features.profanity(HARMLESS_LOOK_ALIKES)) > 0.5


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


def test_first_stage_equals_the_original_model(classifier: ToxicityClassifier) -> None:
    pytest.importorskip("profanity_check")
    pytest.importorskip("skl2onnx")
    from checkstream.plugins.profanity_masks import unmask
    from checkstream.plugins.toxicity import sentences_of
    from checkstream.plugins.training.convert_toxicity import load_original, varied_texts

    vectorizer, model = load_original()
    texts = varied_texts(vectorizer, 300)
    # The first stage scores each sentence with masked profanity written out.
    for text in texts:
        sentences = [unmask(s) for s in sentences_of(text)]
        expected = model.predict_proba(vectorizer.transform(sentences))[:, 1]
        found = classifier.features.profanity(sentences)
        assert found == pytest.approx(expected, abs=1e-5)


def test_one_insult_in_a_long_window_is_still_found(classifier: ToxicityClassifier) -> None:
    calm = "We reviewed the quarterly plan and agreed on the next steps for the team. " * 6
    window = calm + "You are a fucking idiot. " + "Thanks for the update on the schedule. " * 3
    assert scores(classifier, [window])[0] > 0.9
    assert scores(classifier, [calm])[0] < 0.5


def sanity_table(classifier: ToxicityClassifier) -> list[str]:
    """Per category: how many texts, how many flagged at the shipped block threshold, and
    the median score."""
    threshold = classifier.head.block_threshold
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
    # Built by config check: nothing loaded.
    assert classifier._head is None and not classifier.features.loaded
    await load_registry().startup({"t": classifier})
    assert classifier._head is not None and classifier.features.loaded
