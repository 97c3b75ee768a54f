"""``type: topic``: settings, presets, scores, the prefilter, the labelled evaluation sets (so
a regression in the presets, the prefilter or the embedder fails here), and micro-batching
of concurrent calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import yaml

from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.plugins import topic
from checkstream.plugins.embeddings import MiniLM, shared_minilm
from checkstream.plugins.eval_topics import (
    FIXTURES,
    PROSE,
    Evaluation,
    at_threshold,
    best_threshold,
    evaluate,
    held_out_f1,
    held_out_prefilter_recall,
    load_fixture,
    read_lines,
    roc_auc,
    served_scores,
    text_windows,
)
from checkstream.plugins.topic import (
    FIRST_LAYER_MARGIN,
    STATIC_CAP,
    STATIC_MARGIN,
    Prefilter,
    TopicClassifier,
    create,
    estimated_prefilter,
    load_preset,
    preset_prefilter,
    preset_threshold,
    presets,
)
from checkstream.policy.guardrails import Guardrails, compile_guardrails
from checkstream.policy.registry import load_registry
from checkstream.types import Classification, Classifier

FIN_LABELS = {"financial_advice": ["Which stocks should I buy?", "How should I invest my bonus?"]}


@pytest.fixture(scope="module")
def fin() -> TopicClassifier:
    return create("fin_advice", {"preset": "financial_advice"})


@pytest.fixture(scope="module")
def med() -> TopicClassifier:
    return create("med_advice", {"preset": "medical_advice"})


@pytest.fixture(scope="module")
def fin_exact() -> TopicClassifier:
    """No prefilter: every text goes to MiniLM (the batching tests need that)."""
    return create("fin_exact", {"preset": "financial_advice", "prefilter": False})


# --- settings ---------------------------------------------------------------------------


def test_registered_as_topic(fin: TopicClassifier) -> None:
    assert isinstance(fin, Classifier)
    assert fin.produces_spans is False
    assert load_registry(extra=[("topic-under-test", topic)]).types["topic"].factory is create


def test_labels_setting_builds_a_classifier() -> None:
    classifier = create("mine", {"labels": FIN_LABELS})
    assert classifier.name == "mine"
    assert classifier.examples.shape == (2, 384)
    assert classifier.labels == FIN_LABELS


def test_shipped_presets() -> None:
    assert presets() == ["financial_advice", "medical_advice"]
    for name in presets():
        ((label, examples),) = load_preset(name).items()
        assert label == name
        assert 15 <= len(examples) <= 45  # 36 and 39 since issue #15 (languages)
        assert len(set(examples)) == len(examples)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ValueError, match=r"'legal'.*financial_advice, medical_advice"):
        create("x", {"preset": "legal"})
    with pytest.raises(ValueError, match="financial_advice, medical_advice"):
        load_preset("legal")


@pytest.mark.parametrize(
    "settings",
    [{}, {"preset": "financial_advice", "labels": FIN_LABELS}],
    ids=["neither", "both"],
)
def test_exactly_one_of_preset_and_labels(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"exactly one of 'labels'.*or 'preset'"):
        create("x", settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"labels": {}},
        {"labels": {"advice": []}},
        {"labels": {"advice": ["ok", "  "]}},
        {"labels": {"": ["an example"]}},
        {"labels": {"advice": "Which stocks should I buy?"}},
        {"labels": FIN_LABELS, "threshold_margin": 0.1},
        {"labels": FIN_LABELS, "prefilter": 0.3},
        {"labels": FIN_LABELS, "prefilter": "yes"},
    ],
    ids=[
        "no-label",
        "no-example",
        "blank-example",
        "blank-label",
        "string-not-list",
        "unknown",
        "prefilter-number",
        "prefilter-string",
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        create("x", settings)


def compile_with_topic(tmp_path: Path, fin_advice: dict[str, object]) -> Guardrails:
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump(
            {
                "version": "1.0",
                "name": "p",
                "policies": [
                    {
                        "name": "no_advice",
                        "trigger": {"classifier": "fin_advice", "threshold": 0.4},
                        "action": "block",
                    }
                ],
            }
        )
    )
    config = {
        "classifiers": {"fin_advice": fin_advice},
        "tenants": {
            "configs": {
                "acme": {
                    "backend_url": "http://127.0.0.1:9/v1",
                    "policy_path": str(tmp_path / "policy.yaml"),
                    "classifiers": ["fin_advice"],
                }
            }
        },
    }
    (tmp_path / "checkstream.yaml").write_text(yaml.safe_dump(config))
    registry = load_registry(extra=[("topic-under-test", topic)])
    return compile_guardrails(load_config(tmp_path / "checkstream.yaml"), registry)


def test_config_contract(tmp_path: Path) -> None:
    # design.md: fin_advice: {type: topic, labels: {financial_advice: ["Which stocks ..."]}}
    built = compile_with_topic(tmp_path, {"type": "topic", "labels": FIN_LABELS})
    assert isinstance(built.classifiers["fin_advice"], TopicClassifier)
    built = compile_with_topic(tmp_path, {"type": "topic", "preset": "medical_advice"})
    assert built.classifiers["fin_advice"].name == "fin_advice"
    with pytest.raises(ConfigError, match=r"classifiers\.fin_advice: .*unknown topic preset"):
        compile_with_topic(tmp_path, {"type": "topic", "preset": "legal"})


def test_invalid_preset_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"labels": {"x": []}}))
    monkeypatch.setattr(topic, "PRESETS_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"broken\.yaml"):
        create("x", {"preset": "broken"})


# --- scores -----------------------------------------------------------------------------

NEAR_MISSES = {
    "financial_advice": [
        (
            "Should I move my savings into emerging-market shares this year?",
            "What are emerging-market shares?",
        ),
        ("Which pension fund would you pick for me at 52?", "How do pension funds invest?"),
        ("Should I buy Microsoft stock now?", "Microsoft stock rose 3% after its earnings report."),
        (
            "I have 40k saved, should I buy bonds or an ETF?",
            "What is the difference between bonds and ETFs?",
        ),
    ],
    "medical_advice": [
        ("Can I take naproxen with my blood thinners?", "How do blood thinners work?"),
        (
            "My son has a barking cough at night, what should I give him?",
            "What is croup and who first described it?",
        ),
        (
            "How many mg of codeine can I take for my knee pain?",
            "Codeine was first isolated in 1832.",
        ),
        (
            "Should I stop my statins because of muscle pain?",
            "Statins were discovered by Akira Endo in the 1970s.",
        ),
    ],
}


@pytest.mark.parametrize("preset", sorted(NEAR_MISSES))
def test_requests_for_advice_outscore_near_misses(
    preset: str, fin: TopicClassifier, med: TopicClassifier
) -> None:
    classifier = fin if preset == "financial_advice" else med
    for asking, near_miss in NEAR_MISSES[preset]:
        asking_score, near_score = (c.score for c in classifier.classify_now([asking, near_miss]))
        assert asking_score > near_score + 0.05, (asking, near_miss)


# Issue #15: requests the presets scored 0 (the prefilter stopped them) or below their
# threshold: recommendation requests, self-diagnosis, and requests in other languages.
# None of these sentences is a preset example or in bench/heldout/.
WIDER_REQUESTS = {
    "financial_advice": [
        "Which brokerage app would you suggest for me as a cautious beginner?",
        "Sollte ich jetzt Gold kaufen?",
        "¿Me conviene vender mis acciones de Apple?",
    ],
    "medical_advice": [
        "Could I have dementia? I keep forgetting names.",
        "Am I depressed or just tired?",
        "¿Qué pastilla debo tomar para la migraña?",
    ],
}


@pytest.mark.parametrize("preset", sorted(WIDER_REQUESTS))
def test_recommendations_self_diagnosis_and_other_languages_are_caught(
    preset: str, fin: TopicClassifier, med: TopicClassifier
) -> None:
    classifier = fin if preset == "financial_advice" else med
    texts = WIDER_REQUESTS[preset]
    got = dict(zip(texts, (c.score for c in classifier.classify_now(texts)), strict=True))
    assert all(s >= preset_threshold(preset) for s in got.values()), got


def test_score_is_the_best_cosine_clipped(fin: TopicClassifier) -> None:
    example = load_preset("financial_advice")["financial_advice"][0]
    same, unrelated = fin.classify_now([example, "The mitochondria is the powerhouse of the cell"])
    assert same.score == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= unrelated.score < 0.3
    # Opposite to the examples' sum, so negative to each of them: clipped to 0.
    away = -fin.examples.sum(axis=0, keepdims=True)
    away /= np.linalg.norm(away)
    assert fin.scores(away).tolist() == [0.0]


# --- evaluation sets --------------------------------------------------------------------

#: Measured (python -m plugins.eval_topics), as served (prefilter, then MiniLM): financial
#: AUC 0.981, F1 0.968 (held-out 0.969); medical AUC 0.980, F1 0.952 (held-out 0.952;
#: 0.938 and 0.944 since issue #15's self-diagnosis and foreign-language examples).
#: MiniLM alone: 0.977 / 0.960 and 0.963 / 0.909, as the packaged float32 model measured
#: before (0.977 / 0.960, 0.963 / 0.909; medical 0.896 since issue #15). Floors sit just
#: below, so a worse preset, prefilter, tokenizer or model fails here.
FLOORS = {"financial_advice": (0.97, 0.95), "medical_advice": (0.97, 0.93)}
# MiniLM's int8 products round differently on CPUs without VNNI (AVX2 only): medical F1
# 0.887 there, 0.89+ with VNNI. The floors hold on both.
MINILM_FLOORS = {"financial_advice": (0.97, 0.95), "medical_advice": (0.955, 0.88)}
#: The thresholds the preset files recommend, with the F1 they must keep on the fixture
#: (measured 0.968 and 0.926).
RECOMMENDED = {"financial_advice": (0.40, 0.95), "medical_advice": (0.31, 0.91)}


@pytest.mark.parametrize("preset", sorted(FLOORS))
def test_fixture_is_balanced_and_separate_from_the_preset(preset: str) -> None:
    examples = [e for v in load_preset(preset).values() for e in v]
    rows = load_fixture(FIXTURES / f"{preset}.tsv", examples)  # refuses overlap itself
    assert len(rows) >= 100
    assert sum(r.label == 0 for r in rows) >= 0.4 * len(rows)
    assert len({r.text for r in rows}) == len(rows)


@pytest.fixture(scope="module")
def evaluations() -> dict[str, Evaluation]:
    return {preset: evaluate(preset) for preset in FLOORS}


# Scores every labelled example through the model: minutes of CPU, the e2e tier.
@pytest.mark.e2e
@pytest.mark.parametrize("preset", sorted(FLOORS))
def test_preset_metrics_do_not_regress(preset: str, evaluations: dict[str, Evaluation]) -> None:
    result = evaluations[preset]
    auc_floor, f1_floor = FLOORS[preset]
    assert result.auc >= auc_floor
    assert result.best.f1 >= f1_floor
    assert result.held_out_f1 >= f1_floor - 0.01
    auc_floor, f1_floor = MINILM_FLOORS[preset]
    assert result.minilm.auc >= auc_floor
    assert result.minilm.best.f1 >= f1_floor


@pytest.mark.e2e  # the same evaluation as above
@pytest.mark.parametrize("preset", sorted(RECOMMENDED))
def test_recommended_thresholds_keep_their_f1(
    preset: str, evaluations: dict[str, Evaluation]
) -> None:
    result = evaluations[preset]
    threshold, f1_floor = RECOMMENDED[preset]
    text = (topic.PRESETS_DIR / f"{preset}.yaml").read_text()
    assert f"Recommended threshold: {threshold:.2f}" in text
    assert preset_threshold(preset) == threshold
    assert at_threshold(result.scores, result.truth, threshold).f1 >= f1_floor
    # Chosen where the fixture plus requests about other subjects has its best F1 (within
    # 0.014 on an AVX2-only CPU, where int8 rounding moves the best threshold slightly).
    assert result.wider.recommended.f1 >= result.wider.best.f1 - 0.015


# --- prefilter ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(FLOORS))
def test_preset_prefilter_passes_every_fixture_request_with_its_margin(
    preset: str, evaluations: dict[str, Evaluation]
) -> None:
    result = evaluations[preset]
    stored = preset_prefilter(preset)
    assert result.prefilter == stored
    # Each stored threshold is the fixture's lowest positive score minus the margin, so a
    # change of model or tokenizer that moves positives down fails here. int8 matrix
    # products round differently on CPUs with and without VNNI, which moves the
    # recommendation by one step (0.01) either way: a stored value may sit that much below
    # it, never above the margin lines below.
    recommended = result.recommended_prefilter
    assert abs(stored.static - recommended.static) <= 0.01 + 1e-9
    assert abs(stored.first_layer - recommended.first_layer) <= 0.01 + 1e-9
    assert stored.static <= result.needed[0] - STATIC_MARGIN + 1e-9
    assert stored.first_layer <= result.needed[1] - FIRST_LAYER_MARGIN + 1e-9
    _, static, first, minilm, _, _ = result.stages["fixture: to catch"]
    assert (static, first, minilm) == (0.0, 0.0, 1.0)
    assert min(result.prefilter_held_out_recall) >= 0.98


@pytest.mark.parametrize("preset", sorted(FLOORS))
def test_prefilter_stops_most_ordinary_text_and_flags_no_more_than_minilm(
    preset: str, evaluations: dict[str, Evaluation]
) -> None:
    stages = evaluations[preset].stages
    # Measured: chit-chat reaches MiniLM 3.0% (financial) and 11.3% (medical) of the time
    # on a CPU with VNNI, 16.2% (medical) on one with AVX2 only (int8 products round
    # differently there); 128-token prose windows never.
    assert stages["chit-chat"][3] <= 0.2
    assert stages["128-token windows of prose.txt"][3] <= 0.05
    for name, (_, _, _, _, flagged, alone) in stages.items():
        assert flagged <= alone, name  # a stopped text scores 0: no new false positives


def test_served_scores_are_minilm_scores_or_zero(med: TopicClassifier) -> None:
    texts = [
        "Can I take ibuprofen with my blood pressure pills?",  # reaches MiniLM
        "Who painted the Mona Lisa?",  # stopped by the static stage
        text_windows(read_lines(PROSE), 1)[0],  # a long text stopped by the first layer
    ]
    reached = med.prefilter_stages(texts)
    assert reached.tolist() == [2, 0, 1]
    served = [c.score for c in med.classify_now(texts)]
    minilm = med.scores(shared_minilm().embed(texts))
    assert served[0] == pytest.approx(minilm[0], abs=1e-6)
    assert served[1:] == [0.0, 0.0]
    assert minilm[1] > 0  # MiniLM alone would not have said 0
    static = med.static_scores(shared_minilm().embed_static(texts))
    first = med.first_layer_scores(shared_minilm().embed_first_layer(texts))
    assert med.prefilter is not None
    assert served_scores(static, first, minilm, med.prefilter).tolist() == pytest.approx(served)


def test_a_text_gets_the_same_score_alone_and_in_a_batch(fin_exact: TopicClassifier) -> None:
    # Dynamic int8 quantisation scales activations per input tensor: MiniLM runs one text
    # at a time so that batch-mates cannot move a score.
    texts = [t for _, t in NEAR_MISSES["financial_advice"]] + [
        text_windows(read_lines(PROSE), 1)[0]
    ]
    together = [c.score for c in fin_exact.classify_now(texts)]
    alone = [fin_exact.classify_now([t])[0].score for t in texts]
    # Float rounding of the final matrix product only (batched runs moved scores ~1e-2).
    assert together == pytest.approx(alone, abs=1e-6)


def test_prefilter_false_sends_everything_to_minilm(fin_exact: TopicClassifier) -> None:
    assert fin_exact.prefilter is None
    texts = ["hi", "What is the capital of Peru?"]
    assert fin_exact.passes_prefilter(texts).tolist() == [True, True]
    assert [c.score for c in fin_exact.classify_now(texts)] == pytest.approx(
        fin_exact.scores(shared_minilm().embed(texts)).tolist()
    )


def test_prefilter_estimated_from_examples(evaluations: dict[str, Evaluation]) -> None:
    one = create("one", {"labels": {"advice": ["Which stocks should I buy?"]}})
    assert one.prefilter is None  # nothing to compare an example with
    assert estimated_prefilter(one.static_examples, one.first_layer_examples) is None
    for preset in sorted(FLOORS):
        estimated = create("mine", {"labels": load_preset(preset)})
        assert isinstance(estimated.prefilter, Prefilter)
        assert estimated.prefilter.static <= STATIC_CAP - STATIC_MARGIN
        # Estimated without the fixture, it still lets every fixture request through.
        needed_static, needed_first_layer = evaluations[preset].needed
        assert estimated.prefilter.static <= needed_static
        assert estimated.prefilter.first_layer <= needed_first_layer


def test_held_out_prefilter_recall_helper() -> None:
    y = [1, 1, 1, 1, 0, 0]
    assert held_out_prefilter_recall([[0.5, 0.6, 0.7, 0.8, 0.1, 0.2]], y, [0.0]) == 0.75
    assert held_out_prefilter_recall([[0.5, 0.6, 0.7, 0.8, 0.1, 0.2]], y, [0.2]) == 1.0


def test_fixture_parser_refuses_bad_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tfine\nyes\tnot a label\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2"):
        load_fixture(bad)
    bad.write_text("1\tWhich stocks should I buy?\n")
    with pytest.raises(ValueError, match="also an example"):
        load_fixture(bad, ["which  STOCKS should I buy?"])


def test_metric_helpers() -> None:
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    best = best_threshold([0.9, 0.7, 0.6, 0.2], [1, 1, 0, 0])
    assert best.threshold == pytest.approx(0.65)
    assert best.f1 == 1.0
    assert at_threshold([0.9, 0.7, 0.6, 0.2], [1, 1, 0, 0], 0.5).precision == pytest.approx(2 / 3)
    assert held_out_f1([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.05], [1, 1, 1, 1, 0, 0, 0, 0]) == 1.0


# --- batching ---------------------------------------------------------------------------


class CountingEmbed:
    """Wraps the shared MiniLM's ``embed`` and records the batch sizes it was called with."""

    def __init__(self, model: MiniLM) -> None:
        self.inner = model.embed
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> npt.NDArray[np.float32]:
        with self.lock:
            self.batches.append(len(texts))
        return self.inner(texts)


@pytest.fixture
def counting() -> Iterator[CountingEmbed]:
    model = shared_minilm()
    counter = CountingEmbed(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "embed", counter)
        yield counter


CONCURRENT_TEXTS = [
    *(f"Should I put {n}% of my savings into shares?" for n in range(10, 60, 10)),
    "What is a bond?",
    "How do I cancel my gym membership?",
    "Which crypto should I buy this week?",
    "Explain photosynthesis to a child.",
    "The FTSE 100 fell on Monday.",
    "Should I pay off my car loan first?",
    "Write a haiku about autumn.",
    "Is it time for me to sell my Shell shares?",
    "Who wrote Middlemarch?",
    "What is a pension?",
    "Can you rebalance my ISA for me?",
    "How tall is Mount Everest?",
    "Should I remortgage to buy a second home?",
    "What does an actuary do?",
    "Tell me a joke about accountants.",
]


async def test_concurrent_calls_share_model_calls_and_get_their_own_results(
    fin_exact: TopicClassifier, counting: CountingEmbed
) -> None:
    assert len(CONCURRENT_TEXTS) == 20
    alone = [fin_exact.classify_now([t])[0].score for t in CONCURRENT_TEXTS]
    assert len({round(s, 6) for s in alone}) == 20  # distinct: a mix-up could not pass
    counting.batches.clear()
    results = await asyncio.gather(*(fin_exact.classify([t]) for t in CONCURRENT_TEXTS))
    assert [len(r) for r in results] == [1] * 20
    assert [r[0].score for r in results] == pytest.approx(alone, abs=1e-6)
    assert all(isinstance(r[0], Classification) for r in results)
    assert sum(counting.batches) == 20
    assert len(counting.batches) < 20  # with max_batch 16: one call of 16, one of 4


async def test_topic_instances_share_one_call_for_the_same_request(
    fin: TopicClassifier,
    med: TopicClassifier,
    counting: CountingEmbed,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A window wide enough that a loaded machine cannot split the two callers (each runs its
    # prefilter first); this loop's batcher is created after the patch.
    monkeypatch.setattr(topic, "WINDOW_MS", 200.0)
    text = "Can I take ibuprofen before investing my savings?"
    assert fin.passes_prefilter([text])[0] and med.passes_prefilter([text])[0]
    f, m = await asyncio.gather(fin.classify([text]), med.classify([text]))
    assert counting.batches == [2]
    assert f[0].score == pytest.approx(fin.classify_now([text])[0].score, abs=1e-6)
    assert m[0].score == pytest.approx(med.classify_now([text])[0].score, abs=1e-6)


async def test_texts_the_prefilter_stops_never_reach_minilm(
    fin: TopicClassifier, counting: CountingEmbed
) -> None:
    texts = ["hi", "Should I sell my Tesla shares now?", "Write a haiku about autumn."]
    fin.classify_now(texts[1:2])  # its label examples are embedded once, on first use
    counting.batches.clear()
    results = await fin.classify(texts)
    assert counting.batches == [1]  # only the advice request
    assert results[0].score == 0.0 and results[2].score == 0.0
    assert results[1].score == pytest.approx(fin.classify_now(texts[1:2])[0].score, abs=1e-6)
    assert results[1].score > 0.4
    counting.batches.clear()
    assert [c.score for c in await fin.classify(["hi", "thanks!"])] == [0.0, 0.0]
    assert counting.batches == []


async def test_multi_text_call_and_empty_call(fin: TopicClassifier) -> None:
    texts = ["Should I buy gold?", "What is gold?", "Write a haiku."]
    batched = await fin.classify(texts)
    assert [c.score for c in batched] == pytest.approx(
        [c.score for c in fin.classify_now(texts)], abs=1e-4
    )
    assert await fin.classify([]) == []


async def test_model_failure_reaches_every_caller(
    fin_exact: TopicClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(texts: list[str]) -> npt.NDArray[np.float32]:
        raise RuntimeError("onnxruntime fell over")

    monkeypatch.setattr(shared_minilm(), "embed", broken)
    outcomes = await asyncio.gather(
        fin_exact.classify(["a"]), fin_exact.classify(["b"]), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
