"""``type: topic``: settings, presets, scores, the labelled evaluation sets (so a regression in
the presets or the embedder fails here), and micro-batching of concurrent calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import yaml

from extproc.config import load_config
from extproc.guardrails import Guardrails, compile_guardrails
from extproc.hookspecs import Classification, Classifier
from extproc.registry import load_registry
from extproc.yamlsource import ConfigError
from plugins import topic
from plugins.embeddings import MiniLM, shared_minilm
from plugins.eval_topics import (
    FIXTURES,
    Evaluation,
    at_threshold,
    best_threshold,
    evaluate,
    held_out_f1,
    load_fixture,
    roc_auc,
)
from plugins.topic import TopicClassifier, create, load_preset, presets

FIN_LABELS = {"financial_advice": ["Which stocks should I buy?", "How should I invest my bonus?"]}


@pytest.fixture(scope="module")
def fin() -> TopicClassifier:
    return create("fin_advice", {"preset": "financial_advice"})


@pytest.fixture(scope="module")
def med() -> TopicClassifier:
    return create("med_advice", {"preset": "medical_advice"})


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
        assert 15 <= len(examples) <= 30
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
    ],
    ids=["no-label", "no-example", "blank-example", "blank-label", "string-not-list", "unknown"],
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


def test_score_is_the_best_cosine_clipped(fin: TopicClassifier) -> None:
    example = load_preset("financial_advice")["financial_advice"][0]
    same, unrelated = fin.classify_now([example, "The mitochondria is the powerhouse of the cell"])
    assert same.score == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= unrelated.score < 0.3
    assert fin.scores(-fin.examples[:1]).tolist() == [0.0]  # opposite direction: clipped


# --- evaluation sets --------------------------------------------------------------------

#: Measured (python -m plugins.eval_topics): financial AUC 0.977, F1 0.960 (held-out 0.953);
#: medical AUC 0.963, F1 0.909 (held-out 0.891). Floors sit just below, so a worse preset,
#: tokenizer or model fails here.
FLOORS = {"financial_advice": (0.96, 0.94), "medical_advice": (0.95, 0.89)}
#: The thresholds the preset files recommend, with the F1 they must keep on the fixture.
RECOMMENDED = {"financial_advice": (0.40, 0.94), "medical_advice": (0.32, 0.89)}


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


@pytest.mark.parametrize("preset", sorted(FLOORS))
def test_preset_metrics_do_not_regress(preset: str, evaluations: dict[str, Evaluation]) -> None:
    result = evaluations[preset]
    auc_floor, f1_floor = FLOORS[preset]
    assert result.auc >= auc_floor
    assert result.best.f1 >= f1_floor


@pytest.mark.parametrize("preset", sorted(RECOMMENDED))
def test_recommended_thresholds_keep_their_f1(
    preset: str, evaluations: dict[str, Evaluation]
) -> None:
    result = evaluations[preset]
    threshold, f1_floor = RECOMMENDED[preset]
    text = (topic.PRESETS_DIR / f"{preset}.yaml").read_text()
    assert f"Recommended threshold: {threshold:.2f}" in text
    assert abs(result.best.threshold - threshold) < 0.02
    assert at_threshold(result.scores, result.truth, threshold).f1 >= f1_floor


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
    fin: TopicClassifier, counting: CountingEmbed
) -> None:
    assert len(CONCURRENT_TEXTS) == 20
    alone = [fin.classify_now([t])[0].score for t in CONCURRENT_TEXTS]
    assert len({round(s, 3) for s in alone}) == 20  # distinct: a mix-up could not pass
    counting.batches.clear()
    results = await asyncio.gather(*(fin.classify([t]) for t in CONCURRENT_TEXTS))
    assert [len(r) for r in results] == [1] * 20
    assert [r[0].score for r in results] == pytest.approx(alone, abs=1e-4)
    assert all(isinstance(r[0], Classification) for r in results)
    assert sum(counting.batches) == 20
    assert len(counting.batches) < 20  # with max_batch 16: one call of 16, one of 4


async def test_topic_instances_share_one_call_for_the_same_request(
    fin: TopicClassifier, med: TopicClassifier, counting: CountingEmbed
) -> None:
    text = "Can I take ibuprofen before investing my savings?"
    f, m = await asyncio.gather(fin.classify([text]), med.classify([text]))
    assert counting.batches == [2]
    assert f[0].score == pytest.approx(fin.classify_now([text])[0].score, abs=1e-4)
    assert m[0].score == pytest.approx(med.classify_now([text])[0].score, abs=1e-4)


async def test_multi_text_call_and_empty_call(fin: TopicClassifier) -> None:
    texts = ["Should I buy gold?", "What is gold?", "Write a haiku."]
    batched = await fin.classify(texts)
    assert [c.score for c in batched] == pytest.approx(
        [c.score for c in fin.classify_now(texts)], abs=1e-4
    )
    assert await fin.classify([]) == []


async def test_model_failure_reaches_every_caller(
    fin: TopicClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(texts: list[str]) -> npt.NDArray[np.float32]:
        raise RuntimeError("onnxruntime fell over")

    monkeypatch.setattr(shared_minilm(), "embed", broken)
    outcomes = await asyncio.gather(
        fin.classify(["a"]), fin.classify(["b"]), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
