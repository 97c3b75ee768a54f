"""Classifier plugins: discovery, load errors, factory errors, runtime failures, end to end.

A third-party plugin here is real: a module plus a ``*.dist-info`` directory holding
``METADATA`` and ``entry_points.txt``, exactly what ``pip install`` leaves in site-packages.
Putting that directory on ``sys.path`` (in-process) or ``PYTHONPATH`` (a gateway) installs it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders
from prometheus_client import REGISTRY

from checkstream.cli.main import main
from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.gateway.exchange import Exchange
from checkstream.gateway.runtime import Runtime
from checkstream.hookspecs import hookimpl
from checkstream.policy.guardrails import PhasePlan, Rule, compile_guardrails
from checkstream.policy.pipeline import Checker
from checkstream.policy.registry import PluginError, Registry, load_registry
from checkstream.types import Classification, ClassifierFactory, Span
from tests.support import (
    Gateway,
    RecordingUpstream,
    gateway_ports,
    request,
    start_gateway,
    write_config,
)

# -- third-party plugins, as source -----------------------------------------------------------

SHOUTING_PLUGIN = '''\
"""type: shouting: the fraction of cased letters that are uppercase."""
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from checkstream.hookspecs import hookimpl
from checkstream.types import Classification, Span

WORD = re.compile(r"[^\\W\\d_]{2,}")


class ShoutingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_letters: Annotated[int, Field(ge=1)] = 10


class ShoutingClassifier:
    produces_spans = True
    inline = True

    def __init__(self, name, settings):
        self.name = name
        self.min_letters = settings.min_letters

    def classify(self, texts):
        results = []
        for text in texts:
            upper = sum(c.isupper() for c in text)
            cased = upper + sum(c.islower() for c in text)
            if cased < self.min_letters:
                results.append(Classification(0.0))
                continue
            spans = tuple(
                Span(m.start(), m.end(), "SHOUTING")
                for m in WORD.finditer(text)
                if m.group().isupper()
            )
            results.append(Classification(upper / cased, spans))
        return results


def build_shouting(name, settings):
    return ShoutingClassifier(name, ShoutingSettings.model_validate(dict(settings)))


@hookimpl
def checkstream_classifier_types():
    return {"shouting": build_shouting}
'''

# A classifier whose model server is down: every call raises.
FAULTY_PLUGIN = """\
from checkstream.hookspecs import hookimpl

SECRET_DETAIL = "model server 10.9.8.7:50061 unreachable"


class Faulty:
    produces_spans = False

    def __init__(self, name):
        self.name = name

    def classify(self, texts):
        raise RuntimeError(SECRET_DETAIL)


@hookimpl
def checkstream_classifier_types():
    return {"faulty": lambda name, settings: Faulty(name)}
"""

BROKEN_PLUGIN = "import checkstream_test_module_that_does_not_exist\n"


def install(
    site: Path, dist: str, modules: Mapping[str, str], entry_points: Mapping[str, str]
) -> Path:
    """Lay out ``site`` as pip would after installing distribution ``dist``."""
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    table = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[checkstream]\n{table}")
    return site


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Put a site directory first on sys.path; its modules are forgotten afterwards."""
    sites: list[Path] = []

    def add(site: Path) -> None:
        monkeypatch.syspath_prepend(str(site))
        # importlib.metadata caches directory listings; make it look again.
        importlib.invalidate_caches()
        sites.append(site)

    yield add
    for site in sites:
        for path in site.glob("*.py"):
            sys.modules.pop(path.stem, None)


@pytest.fixture
def shouting_site(tmp_path: Path) -> Path:
    return install(
        tmp_path / "site",
        "cs_shouting",
        {"cs_shouting": SHOUTING_PLUGIN},
        {"shouting": "cs_shouting"},
    )


# -- discovery ---------------------------------------------------------------------------------


def test_installed_plugin_is_found_by_its_entry_point(
    shouting_site: Path, on_path: Callable[[Path], None]
) -> None:
    assert "shouting" not in load_registry().types
    on_path(shouting_site)
    assert importlib.metadata.version("cs_shouting") == "0.1"
    registry = load_registry()
    kind = registry.types["shouting"]
    assert kind.plugin == "shouting"  # the entry point's name, used in error messages
    # Built-ins are plugins too, found the same way.
    assert {"keyword", "shouting"} <= set(registry.types)
    shout = kind.factory("shout", {"min_letters": 5})
    calm, loud = shout.classify(["just asking", "STOP the PRESSES now"])
    assert calm == Classification(0.0)
    assert loud.score == pytest.approx(11 / 17)
    assert loud.spans == (Span(0, 4, "SHOUTING"), Span(9, 16, "SHOUTING"))


def test_plugin_that_fails_to_import_names_its_entry_point(
    tmp_path: Path, on_path: Callable[[Path], None]
) -> None:
    on_path(install(tmp_path, "cs_broken", {"cs_broken": BROKEN_PLUGIN}, {"broken": "cs_broken"}))
    with pytest.raises(PluginError) as caught:
        load_registry()
    assert str(caught.value) == (
        "plugin 'broken' (cs_broken) failed to import: ModuleNotFoundError: "
        "No module named 'checkstream_test_module_that_does_not_exist'"
    )


def _offering(types: Any) -> object:
    class Plugin:
        @hookimpl
        def checkstream_classifier_types(self) -> Any:
            return types

    return Plugin()


def _never_built(name: str, settings: Mapping[str, Any]) -> Any:
    raise AssertionError("not called")


def test_two_plugins_offering_one_type_are_refused_naming_both() -> None:
    with pytest.raises(PluginError) as caught:
        load_registry(
            extra=[
                ("loud_a", _offering({"shouting": _never_built})),
                ("loud_b", _offering({"shouting": _never_built})),
            ]
        )
    message = str(caught.value)
    assert message.startswith("classifier type 'shouting' is offered by both plugin ")
    assert "plugin 'loud_a'" in message
    assert "plugin 'loud_b'" in message


def test_plugin_may_not_take_over_a_builtin_type() -> None:
    with pytest.raises(PluginError) as caught:
        load_registry(extra=[("imposter", _offering({"keyword": _never_built}))])
    message = str(caught.value)
    assert "classifier type 'keyword'" in message
    assert "plugin 'keyword'" in message
    assert "plugin 'imposter'" in message


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (
            ["shouting"],
            "checkstream_classifier_types must return a mapping of type name to factory, got list",
        ),
        (
            None,
            "checkstream_classifier_types must return a mapping of type name to factory, "
            "got NoneType",
        ),
        ({"shouting": "not callable"}, "classifier type 'shouting' needs a callable factory"),
    ],
    ids=["list", "none", "factory-not-callable"],
)
def test_hook_returning_a_non_mapping_is_refused(offered: Any, expected: str) -> None:
    with pytest.raises(PluginError) as caught:
        load_registry(extra=[("odd", _offering(offered))])
    assert str(caught.value) == f"plugin 'odd': {expected}"


def test_hook_that_raises_is_refused_naming_the_plugin() -> None:
    class Raises:
        @hookimpl
        def checkstream_classifier_types(self) -> Mapping[str, ClassifierFactory]:
            raise KeyError("model.onnx")

    with pytest.raises(PluginError) as caught:
        load_registry(extra=[("exploding", Raises())])
    assert str(caught.value) == (
        "plugin 'exploding' failed in checkstream_classifier_types: KeyError('model.onnx')"
    )


def test_hook_with_a_wrong_signature_is_refused() -> None:
    class WrongSignature:
        @hookimpl
        def checkstream_classifier_types(self, config: Any) -> Any:
            return {}

    with pytest.raises(PluginError, match=r"(?s)^plugin 'wrong' cannot be registered: .*'config'"):
        load_registry(extra=[("wrong", WrongSignature())])


# -- factory errors: located in checkstream.yaml -----------------------------------------------

FACTORY_CONFIG = """\
classifiers:
  shout:
    type: shouting
    min_letters: {min_letters}
tenants:
  configs:
    acme:
      backend_url: "http://127.0.0.1:9/v1"
      classifiers: [shout]
"""


@pytest.fixture
def shouting_registry(shouting_site: Path, on_path: Callable[[Path], None]) -> Registry:
    on_path(shouting_site)
    return load_registry()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "Input should be greater than or equal to 1"),
        ("lots", "Input should be a valid integer, unable to parse string as an integer"),
    ],
)
def test_bad_settings_are_reported_at_the_key_and_line(
    tmp_path: Path, shouting_registry: Registry, value: str, message: str
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(FACTORY_CONFIG.format(min_letters=value))
    with pytest.raises(ConfigError) as caught:
        compile_guardrails(load_config(path), shouting_registry)
    located = [(p.file, p.line, p.path, p.message) for p in caught.value.problems]
    assert (str(path), 4, "classifiers.shout.min_letters", message) in located
    assert f"{path}:4: classifiers.shout.min_letters: {message}" in str(caught.value)


def test_unknown_setting_is_reported_at_its_line(
    tmp_path: Path, shouting_registry: Registry
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(FACTORY_CONFIG.format(min_letters="10").replace("min_letters", "min_leters"))
    with pytest.raises(ConfigError) as caught:
        compile_guardrails(load_config(path), shouting_registry)
    located = [(p.line, p.path, p.message) for p in caught.value.problems]
    assert (4, "classifiers.shout.min_leters", "unknown key") in located


def test_bad_settings_are_the_only_problem_reported(
    tmp_path: Path, shouting_registry: Registry
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(FACTORY_CONFIG.format(min_letters="0"))
    with pytest.raises(ConfigError) as caught:
        compile_guardrails(load_config(path), shouting_registry)
    assert [p.path for p in caught.value.problems] == ["classifiers.shout.min_letters"]


def _factory_plugin(factory: ClassifierFactory) -> object:
    return _offering({"fragile": factory})


def _compile_fragile(tmp_path: Path, factory: ClassifierFactory) -> ConfigError:
    path = tmp_path / "checkstream.yaml"
    path.write_text(
        "tenants:\n"
        "  configs:\n"
        "    acme: {backend_url: 'http://127.0.0.1:9/v1', classifiers: [frag]}\n"
        "classifiers:\n"
        "  frag: {type: fragile, model: /models/frag.onnx}\n"
    )
    registry = load_registry(extra=[("fragile_plugin", _factory_plugin(factory))])
    with pytest.raises(ConfigError) as caught:
        compile_guardrails(load_config(path), registry)
    return caught.value


def test_factory_raising_is_reported_naming_the_plugin(tmp_path: Path) -> None:
    def factory(name: str, settings: Mapping[str, Any]) -> Any:
        raise RuntimeError(f"cannot open {settings['model']}")

    error = _compile_fragile(tmp_path, factory)
    assert (
        f"{tmp_path / 'checkstream.yaml'}:5: classifiers.frag: plugin 'fragile_plugin' failed "
        "to build classifier 'frag': RuntimeError: cannot open /models/frag.onnx"
    ) in str(error)


def test_factory_value_error_is_invalid_settings(tmp_path: Path) -> None:
    def factory(name: str, settings: Mapping[str, Any]) -> Any:
        raise ValueError("model must be a .bin file")

    error = _compile_fragile(tmp_path, factory)
    assert (
        f"{tmp_path / 'checkstream.yaml'}:5: classifiers.frag: invalid settings for fragile: "
        "model must be a .bin file"
    ) in str(error)


def test_factory_returning_a_non_classifier_is_reported(tmp_path: Path) -> None:
    error = _compile_fragile(tmp_path, lambda name, settings: object())
    assert (
        "classifiers.frag: plugin 'fragile_plugin' returned a classifier without "
        "name, produces_spans, classify"
    ) in str(error)


def test_factory_validation_error_from_pydantic_directly(tmp_path: Path) -> None:
    class Settings(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        model: int

    def factory(name: str, settings: Mapping[str, Any]) -> Any:
        Settings.model_validate(dict(settings))
        raise AssertionError("unreachable")

    error = _compile_fragile(tmp_path, factory)
    assert any(p.path == "classifiers.frag.model" and p.line == 5 for p in error.problems)


# -- the CLI with a third-party plugin ---------------------------------------------------------


def test_config_check_and_policy_lint_see_the_plugin(
    tmp_path: Path,
    shouting_site: Path,
    on_path: Callable[[Path], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    on_path(shouting_site)
    (tmp_path / "acme.yaml").write_text(SHOUT_POLICY)
    config = tmp_path / "checkstream.yaml"
    config.write_text(
        "classifiers:\n"
        "  shout: {type: shouting, min_letters: 10}\n"
        "tenants:\n"
        "  configs:\n"
        "    acme: {backend_url: 'http://127.0.0.1:9/v1', classifiers: [shout],"
        " policy_path: acme.yaml}\n"
    )
    assert main(["config", "check", str(config)]) == 0
    assert main(["policy", "lint", "-c", str(config), str(tmp_path / "acme.yaml")]) == 0
    out, _ = capsys.readouterr()
    assert out == f"{config}: OK (1 tenant, 1 policy file)\n{tmp_path / 'acme.yaml'}: OK\n"
    # Without -c only type names are known, so the instance name is not.
    assert main(["policy", "lint", str(tmp_path / "acme.yaml")]) == 1
    _, err = capsys.readouterr()
    assert "unknown classifier 'shout' (known: " in err
    assert "shouting" in err


def test_cli_refuses_a_broken_plugin_naming_it(
    tmp_path: Path, on_path: Callable[[Path], None], capsys: pytest.CaptureFixture[str]
) -> None:
    on_path(
        install(
            tmp_path / "site", "cs_broken", {"cs_broken": BROKEN_PLUGIN}, {"broken": "cs_broken"}
        )
    )
    config = tmp_path / "checkstream.yaml"
    config.write_text("tenants:\n  configs:\n    acme: {backend_url: 'http://127.0.0.1:9/v1'}\n")
    assert main(["config", "check", str(config)]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("checkstream: plugin 'broken' (cs_broken) failed to import: ")


# -- runtime failures through the Checker ------------------------------------------------------


class Fake:
    """A classifier whose ``classify`` is whatever the test needs."""

    produces_spans = True

    def __init__(
        self, name: str, classify: Callable[[Sequence[str]], Any], inline: bool = False
    ) -> None:
        self.name = name
        self.inline = inline
        self._classify = classify

    def classify(self, texts: Sequence[str]) -> Any:
        return self._classify(texts)


class AsyncFake:
    produces_spans = False

    def __init__(self, name: str, delay: float = 0.0, score: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.score = score
        self.calls = 0

    async def classify(self, texts: Sequence[str]) -> list[Classification]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return [Classification(self.score) for _ in texts]


def plan(*classifiers: str, action: str = "block", threshold: float = 0.5) -> PhasePlan:
    rules = tuple(Rule(f"rule_{c}", c, threshold, action, None, None) for c in classifiers)  # type: ignore[arg-type]
    return PhasePlan(classifiers, rules)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-classifier")
    yield pool
    pool.shutdown(wait=True)


TEXTS = ["first text", "second text"]


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (lambda texts: [Classification(0.1)], "returned 1 results for 2 texts"),
        (lambda texts: [Classification(0.1)] * 3, "returned 3 results for 2 texts"),
        (lambda texts: None, "returned NoneType results for 2 texts"),
        (lambda texts: [Classification(1.5)] * 2, "returned score 1.5 outside [0, 1]"),
        (lambda texts: [Classification(-0.1)] * 2, "returned score -0.1 outside [0, 1]"),
        (lambda texts: [Classification(float("nan"))] * 2, "returned score nan outside [0, 1]"),
        (lambda texts: [Classification("0.5")] * 2, "returned score '0.5' outside [0, 1]"),  # type: ignore[arg-type]
        (
            lambda texts: [Classification(0.9, (Span(3, 11, "X"),))] * 2,
            "returned span Span(start=3, end=11, label='X') outside its text",
        ),
        (
            lambda texts: [Classification(0.9, (Span(-1, 2, "X"),))] * 2,
            "returned span Span(start=-1, end=2, label='X') outside its text",
        ),
        (
            lambda texts: [Classification(0.9, (Span(4, 4, "X"),))] * 2,
            "returned span Span(start=4, end=4, label='X') outside its text",
        ),
        (lambda texts: [{"score": 0.9}] * 2, "returned dict, not Classification"),
    ],
    ids=[
        "too-few",
        "too-many",
        "none",
        "above-1",
        "below-0",
        "nan",
        "str-score",
        "span-past-end",
        "span-negative",
        "span-empty",
        "dict",
    ],
)
async def test_malformed_result_is_a_failure_naming_the_classifier(
    executor: ThreadPoolExecutor, result: Callable[[Sequence[str]], Any], reason: str
) -> None:
    checker = Checker(
        {"ok": Fake("ok", lambda t: [Classification(0.0)] * len(t)), "bad": Fake("bad", result)},
        executor,
        timeout_s=2.0,
    )
    verdict = await checker.check(plan("ok", "bad"), TEXTS)
    assert verdict.failure == f"classifier 'bad': {reason}"
    assert verdict.failed_classifier == "bad"
    assert verdict.action is None


@pytest.mark.parametrize("inline", [False, True], ids=["threaded", "inline"])
async def test_raising_classifier_is_a_failure_naming_it(
    executor: ThreadPoolExecutor, inline: bool
) -> None:
    def boom(texts: Sequence[str]) -> Any:
        raise RuntimeError("model server unreachable")

    checker = Checker({"boom": Fake("boom", boom, inline=inline)}, executor, timeout_s=2.0)
    verdict = await checker.check(plan("boom"), TEXTS)
    assert verdict.failure == "classifier 'boom': raised RuntimeError: model server unreachable"
    assert verdict.failed_classifier == "boom"


async def test_raising_async_classifier_is_a_failure_naming_it(
    executor: ThreadPoolExecutor,
) -> None:
    class Broken:
        name = "remote"
        produces_spans = False

        async def classify(self, texts: Sequence[str]) -> list[Classification]:
            raise ConnectionResetError("peer went away")

    verdict = await Checker({"remote": Broken()}, executor, 2.0).check(plan("remote"), TEXTS)
    assert verdict.failure == "classifier 'remote': raised ConnectionResetError: peer went away"


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(lambda texts: [Classification(0.9, None)] * 2, id="spans-none"),  # type: ignore[arg-type]
        pytest.param(
            lambda texts: [Classification(0.9, (Span("0", "2", "X"),))] * 2,  # type: ignore[arg-type]
            id="span-offsets-str",
        ),
        pytest.param(
            lambda texts: [Classification(0.9, (Span(0.0, 2.5, "X"),))] * 2,  # type: ignore[arg-type]
            id="span-offsets-float",
        ),
    ],
)
async def test_malformed_spans_are_a_failure(
    executor: ThreadPoolExecutor, result: Callable[[Sequence[str]], Any]
) -> None:
    checker = Checker({"bad": Fake("bad", result)}, executor, timeout_s=2.0)
    verdict = await checker.check(plan("bad", action="redact"), TEXTS)
    assert verdict.failure is not None
    assert verdict.failed_classifier == "bad"


async def test_sync_classifier_runs_in_the_executor_and_async_on_the_loop(
    executor: ThreadPoolExecutor,
) -> None:
    loop_thread = threading.current_thread()
    seen: dict[str, threading.Thread] = {}
    async_done = threading.Event()

    def sync_classify(texts: Sequence[str]) -> list[Classification]:
        seen["sync"] = threading.current_thread()
        # Both classifiers of the phase run at once: the async one finishes while this one
        # still runs. Run one after the other, this wait would time out.
        assert async_done.wait(5)
        return [Classification(0.9 if "bad" in t else 0.0) for t in texts]

    class Async:
        name = "remote"
        produces_spans = False

        async def classify(self, texts: Sequence[str]) -> list[Classification]:
            seen["async"] = threading.current_thread()
            await asyncio.sleep(0.01)
            async_done.set()
            return [Classification(0.2) for _ in texts]

    def inline_classify(texts: Sequence[str]) -> list[Classification]:
        seen["inline"] = threading.current_thread()
        return [Classification(0.0) for _ in texts]

    checker = Checker(
        {
            "local": Fake("local", sync_classify),
            "remote": Async(),
            "regex": Fake("regex", inline_classify, inline=True),
        },
        executor,
        timeout_s=5.0,
    )
    verdict = await checker.check(plan("local", "remote", "regex"), ["fine", "bad words"])
    assert verdict.failure is None
    assert verdict.action == "block"
    assert verdict.deciding is not None and verdict.deciding.rule.classifier == "local"
    assert dict(verdict.scores) == {"local": 0.9, "remote": 0.2, "regex": 0.0}
    assert seen["sync"] is not loop_thread
    assert seen["sync"].name.startswith("test-classifier")
    assert seen["async"] is loop_thread
    assert seen["inline"] is loop_thread


async def test_batch_is_one_call_with_results_in_text_order(
    executor: ThreadPoolExecutor,
) -> None:
    calls: list[list[str]] = []

    def classify(texts: Sequence[str]) -> list[Classification]:
        calls.append(list(texts))
        return [
            Classification(1.0, (Span(0, 4, "SECRET"),))
            if t.startswith("sk-")
            else Classification(0.0)
            for t in texts
        ]

    checker = Checker({"secrets": Fake("secrets", classify)}, executor, 2.0)
    texts = ["hello", "sk-123 is my key", "bye"]
    verdict = await checker.check(plan("secrets", action="redact"), texts)
    assert calls == [texts]
    assert verdict.action == "redact"
    # Spans stay with the text they were found in.
    assert verdict.redactions == ((), (Span(0, 4, "SECRET"),), ())


async def test_classifier_without_a_rule_or_without_text_is_not_run(
    executor: ThreadPoolExecutor,
) -> None:
    unused = AsyncFake("unused")
    checker = Checker({"unused": unused}, executor, 2.0)
    assert (await checker.check(PhasePlan(("unused",), ()), TEXTS)).action is None
    assert (await checker.check(plan("unused"), ["", ""])).action is None
    assert unused.calls == 0


async def test_slow_async_classifier_times_out(executor: ThreadPoolExecutor) -> None:
    checker = Checker({"slow": AsyncFake("slow", delay=30)}, executor, timeout_s=0.05)
    verdict = await checker.check(plan("slow"), TEXTS)
    assert verdict.failure == "classifiers slow took longer than 0.05s"
    assert verdict.failed_classifier == "slow"


async def test_slow_sync_classifier_times_out(executor: ThreadPoolExecutor) -> None:
    release = threading.Event()

    def stuck(texts: Sequence[str]) -> list[Classification]:
        release.wait(10)  # a thread cannot be cancelled: it finishes in the background
        return [Classification(0.0) for _ in texts]

    checker = Checker(
        {"stuck": Fake("stuck", stuck), "fast": AsyncFake("fast")}, executor, timeout_s=0.05
    )
    try:
        verdict = await checker.check(plan("stuck", "fast"), TEXTS)
    finally:
        release.set()
    assert verdict.failure == "classifiers stuck, fast took longer than 0.05s"
    # With several classifiers the culprit is unknown; the metric label says so.
    assert verdict.failed_classifier == "timeout"


# -- fail mode in the exchange (in-process, metrics) -------------------------------------------

EXCHANGE_CONFIG = """\
tenants:
  configs:
    closed-ingress:
      backend_url: "http://127.0.0.1:9/v1"
      classifiers: [faulty]
      policy_path: faulty.yaml
    open-ingress:
      backend_url: "http://127.0.0.1:9/v1"
      classifiers: [faulty]
      policy_path: faulty.yaml
      fail_mode: open
    closed-egress:
      backend_url: "http://127.0.0.1:9/v1"
      pipeline: {midstream: {classifiers: [faulty]}}
      policy_path: faulty.yaml
"""

FAULTY_POLICY = """\
version: "1.0"
name: guarded
policies:
  - name: faulty_guard
    trigger: {classifier: faulty, threshold: 0.5}
    action: block
"""

SHOUT_POLICY = """\
version: "1.0"
name: no-shouting
policies:
  - name: no_shouting
    trigger: {classifier: shout, threshold: 0.8}
    action: block
"""


def _headers(tenant: str, **extra: str) -> HttpHeaders:
    values = {":method": "POST", ":path": "/v1/chat/completions", "x-tenant-id": tenant, **extra}
    return HttpHeaders(
        headers=HeaderMap(
            headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
        )
    )


def _errors(tenant: str) -> float:
    value = REGISTRY.get_sample_value(
        "checkstream_classifier_errors_total", {"tenant": tenant, "classifier": "faulty"}
    )
    return value or 0.0


@pytest.fixture
def faulty_runtime(tmp_path: Path, on_path: Callable[[Path], None]) -> Runtime:
    on_path(
        install(
            tmp_path / "site", "cs_faulty", {"cs_faulty": FAULTY_PLUGIN}, {"faulty": "cs_faulty"}
        )
    )
    (tmp_path / "faulty.yaml").write_text(FAULTY_POLICY)
    (tmp_path / "checkstream.yaml").write_text(EXCHANGE_CONFIG)
    return Runtime.from_config(load_config(tmp_path / "checkstream.yaml"))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


async def test_failed_ingress_check_is_503_and_counted(faulty_runtime: Runtime) -> None:
    before = _errors("closed-ingress")
    exchange = Exchange(faulty_runtime)
    await exchange.on_request_headers(_headers("closed-ingress"))
    response = await exchange.on_request_body(
        HttpBody(body=json.dumps(CHAT).encode(), end_of_stream=True)
    )
    answer = response.immediate_response
    assert answer.status.code == 503
    error = json.loads(answer.body)["error"]
    assert (error["type"], error["code"]) == ("server_error", "guardrail_error")
    assert "10.9.8.7" not in answer.body.decode()  # the classifier's error stays internal
    assert _errors("closed-ingress") == before + 1


async def test_failed_ingress_check_passes_with_fail_mode_open_and_is_counted(
    faulty_runtime: Runtime,
) -> None:
    before = _errors("open-ingress")
    exchange = Exchange(faulty_runtime)
    await exchange.on_request_headers(_headers("open-ingress"))
    response = await exchange.on_request_body(
        HttpBody(body=json.dumps(CHAT).encode(), end_of_stream=True)
    )
    assert response.WhichOneof("response") == "request_body"
    assert not response.request_body.HasField("response")  # passed on unchanged
    assert _errors("open-ingress") == before + 1


async def test_failed_egress_check_withholds_the_answer(faulty_runtime: Runtime) -> None:
    exchange = Exchange(faulty_runtime)
    await exchange.on_request_headers(_headers("closed-egress"))
    await exchange.on_response_headers(_headers("closed-egress", **{":status": "200"}))
    answer = {
        "id": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    }
    response = await exchange.on_response_body(
        HttpBody(body=json.dumps(answer).encode(), end_of_stream=True)
    )
    assert response is not None and not isinstance(response, list)
    body = json.loads(response.response_body.response.body_mutation.streamed_response.body)
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["checkstream"] == {"action": "blocked", "rule": "guardrail_error"}
    assert "hi" not in json.dumps(body["choices"])


# -- end to end: a real gateway with a real third-party plugin ---------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    up = RecordingUpstream("plugins").start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: RecordingUpstream
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("plugins-gw")
    site = root / "site"
    install(site, "cs_shouting", {"cs_shouting": SHOUTING_PLUGIN}, {"shouting": "cs_shouting"})
    install(site, "cs_faulty", {"cs_faulty": FAULTY_PLUGIN}, {"faulty": "cs_faulty"})
    (root / "shout.yaml").write_text(SHOUT_POLICY)
    (root / "faulty.yaml").write_text(FAULTY_POLICY)
    backend = f"http://127.0.0.1:{upstream.port}/v1"
    guarded = {"classifiers": ["faulty"], "policy_path": "faulty.yaml"}
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "classifiers": {"shout": {"type": "shouting", "min_letters": 10}},
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": {
                "acme": {
                    "backend_url": backend,
                    "classifiers": ["shout"],
                    "policy_path": "shout.yaml",
                },
                # "faulty" needs no settings, so it is used by its type name.
                "closed": {"backend_url": backend, **guarded},
                "closed-anthropic": {
                    "backend_url": f"http://127.0.0.1:{upstream.port}",
                    "streaming_format": "anthropic",
                    **guarded,
                },
                "open": {"backend_url": backend, "fail_mode": "open", **guarded},
            },
        },
    }
    gw = start_gateway(write_config(root, config), env={"PYTHONPATH": str(site)})
    yield gw
    assert gw.stop() == 0, gw.log()


def _chat(gateway: Gateway, tenant: str, text: str, path: str = "/v1/chat/completions") -> Any:
    payload = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    return request(f"{gateway.url}{path}", payload, {"X-Tenant-ID": tenant})


def _reached(upstream: RecordingUpstream, text: str) -> bool:
    return any(text.encode() in got.body for got in upstream.received)


def test_e2e_shouting_prompt_is_blocked_before_the_upstream(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    text = "WHY DOES NOTHING EVER WORK HERE"
    reply = _chat(gateway, "acme", text)
    assert reply.status == 400, reply.body
    assert reply.headers["x-checkstream-rule"] == "no_shouting"
    body = reply.json()
    assert body["error"]["code"] == "content_policy_violation"
    assert body["checkstream"] == {"action": "blocked", "rule": "no_shouting"}
    assert not _reached(upstream, text)


def test_e2e_calm_prompt_reaches_the_upstream(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    text = "Why does nothing ever work here? (asked CALMLY)"
    reply = _chat(gateway, "acme", text)
    assert reply.status == 200, reply.body
    assert "x-checkstream-rule" not in reply.headers
    assert reply.json()["upstream"] == "plugins"
    assert _reached(upstream, text)


def test_e2e_failing_classifier_fails_closed_in_the_tenants_format(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    text = "closed tenant, openai format"
    reply = _chat(gateway, "closed", text)
    assert reply.status == 503, reply.body
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "guardrail_error")
    assert "10.9.8.7" not in reply.body.decode()
    assert not _reached(upstream, text)

    text = "closed tenant, anthropic format"
    reply = _chat(gateway, "closed-anthropic", text, path="/v1/messages")
    assert reply.status == 503, reply.body
    body = reply.json()
    assert body["type"] == "error"
    assert (body["error"]["type"], body["error"]["code"]) == ("api_error", "guardrail_error")
    assert not _reached(upstream, text)


def test_e2e_failing_classifier_with_fail_mode_open_passes(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    text = "open tenant, the classifier is down"
    reply = _chat(gateway, "open", text)
    assert reply.status == 200, reply.body
    assert reply.json()["upstream"] == "plugins"
    assert _reached(upstream, text)
    # Passing unchecked is still a failure for the operator: logged with the reason.
    wanted = '"tenant": "open", "phase": "ingress", "error": "classifier \'faulty\': raised'
    deadline = time.monotonic() + 10
    while wanted not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wanted in gateway.log()


def test_e2e_gateway_refuses_to_start_with_a_broken_plugin(tmp_path: Path) -> None:
    site = install(
        tmp_path / "site", "cs_broken", {"cs_broken": BROKEN_PLUGIN}, {"broken": "cs_broken"}
    )
    config = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "tenants": {"configs": {"acme": {"backend_url": "http://127.0.0.1:9/v1"}}},
    }
    with pytest.raises(RuntimeError) as caught:
        start_gateway(write_config(tmp_path, config), env={"PYTHONPATH": str(site)})
    assert "gateway exited with 1" in str(caught.value)
    assert "checkstream: plugin 'broken' (cs_broken) failed to import" in str(caught.value)


def test_misspelt_hook_is_refused_naming_the_plugin() -> None:
    typo = SimpleNamespace(checkstream_classifier_type=hookimpl(lambda: {}))
    with pytest.raises(PluginError) as caught:
        load_registry(extra=[("typo", typo)])
    assert str(caught.value) == (
        "plugin 'typo' implements unknown hook 'checkstream_classifier_type' "
        "(the hooks are listed in the module checkstream.hookspecs)"
    )


def test_a_module_with_no_hook_is_refused_naming_it() -> None:
    # A plugin whose functions lack @hookimpl would otherwise load and offer nothing.
    forgot = SimpleNamespace(checkstream_classifier_types=lambda: {})
    with pytest.raises(PluginError) as caught:
        load_registry(extra=[("forgot", forgot)])
    assert "plugin 'forgot' implements no hook" in str(caught.value)


async def test_shutdown_awaits_every_plugins_hook() -> None:
    closed: list[str] = []

    async def close() -> None:
        closed.append("async")

    sync_plugin = SimpleNamespace(checkstream_shutdown=hookimpl(lambda: closed.append("sync")))
    async_plugin = SimpleNamespace(checkstream_shutdown=hookimpl(lambda: close()))
    registry = load_registry(extra=[("s", sync_plugin), ("a", async_plugin)])
    await registry.shutdown()
    assert sorted(closed) == ["async", "sync"]


@pytest.mark.parametrize(
    ("attributes", "complaint"),
    [
        ({"sources": {"users"}}, "unknown sources ['users']"),
        ({"sources": "user"}, "'sources' must be a set"),
        ({"sources": set()}, "'sources' is empty"),
        ({"inline": "yes"}, "'inline' must be True or False"),
    ],
)
def test_a_classifiers_optional_attributes_are_checked(
    attributes: dict[str, object], complaint: str
) -> None:
    from checkstream.policy.guardrails import contract_problem

    instance = SimpleNamespace(name="c", produces_spans=False, classify=None, **attributes)
    problem = contract_problem(instance)
    assert problem is not None and complaint in problem
    good = SimpleNamespace(name="c", produces_spans=False, inline=True, sources={"user", "tool"})
    assert contract_problem(good) is None


def test_numpy_scores_are_accepted() -> None:
    import numpy as np

    from checkstream.policy.pipeline import ClassifierFailure, validate

    texts = ["a", "b"]
    ok = validate("m", texts, [Classification(np.float32(0.25)), Classification(np.float64(1))])
    assert [c.score for c in ok] == [0.25, 1.0]
    with pytest.raises(ClassifierFailure):
        validate("m", ["a"], [Classification(True)])
