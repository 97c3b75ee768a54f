"""Remote classifiers: ``checkstream classifiers serve`` and the ``type: remote`` plugin.

Everything here is real: gRPC servers on 127.0.0.1, the generated protocol modules, the
gateway (Envoy + extproc) as a child process, ``checkstream classifiers serve`` as a child
process. The only fake is a server that answers too slowly, to test deadlines.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pydantic
import pytest

import checkstream.plugins.remote
from checkstream import protogen
from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.plugins.keyword import build_keyword
from checkstream.plugins.remote import (
    RemoteClassifier,
    RemoteClassifierError,
    build_remote,
    close_channels,
)
from checkstream.policy.classifier_server import (
    CLASSIFY_METHOD,
    LIST_CLASSIFIERS_METHOD,
    SERVICE_NAME,
    build_classifier_server,
    servable_classifiers,
)
from checkstream.policy.guardrails import PhasePlan, Rule, compile_guardrails
from checkstream.policy.pipeline import Checker
from checkstream.policy.registry import Registry, load_registry
from checkstream.protocol import classifier_pb2 as pb
from checkstream.types import Classification, Classifier
from tests.support import (
    Gateway,
    RecordingUpstream,
    free_port,
    gateway_ports,
    request,
    start_gateway,
    write_config,
    write_policy,
)

# Runs the real `checkstream` program (or its process pools) as a user would: the e2e tier.
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]

# Code points beyond the BMP, combining marks and CRLF: offsets must count code points on
# both sides (UTF-16 or byte offsets would move every span after the emoji).
TEXTS = (
    "Please write to jane.doe@example.com before Friday.",
    "caf\u00e9 \u2603 \U0001f600 mail bob@example.org or call +1 (415) 555-0134",
    "card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, ssn 123-45-6789",
    "Status of PROJECT   falcon?\r\nIt is internal only. \U0001f680 project falcon!",
    "nothing to see here",
    "",
    "e\u0301milie@example.fr and falconry are fine; 10.0.0.7 is an address",
)


def registry_with_remote() -> Registry:
    """The installed plugins, plus ``plugins.remote`` if its entry point is not installed."""
    registry = load_registry()
    if "remote" in registry.types:
        return registry
    return load_registry(extra=[("remote", checkstream.plugins.remote)])


def local_classifiers() -> dict[str, Classifier]:
    pii = load_registry().types["pii_detector"]
    return {
        "pii_detector": pii.factory("pii_detector", {}),
        "banned": build_keyword("banned", {"terms": ["project falcon", "internal only"]}),
    }


class Boom:
    name = "boom"
    produces_spans = False
    inline = True

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        raise RuntimeError("model file is corrupt")


class OutOfRange:
    name = "out_of_range"
    produces_spans = False

    async def classify(self, texts: Sequence[str]) -> list[Classification]:
        return [Classification(2.0) for _ in texts]


class ThreadRecorder:
    """A plain sync classifier: the Checker must run it in its thread pool."""

    name = "thread_recorder"
    produces_spans = False

    def __init__(self) -> None:
        self.threads: list[str] = []

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        self.threads.append(threading.current_thread().name)
        return [Classification(0.25) for _ in texts]


@dataclass
class Served:
    target: str
    classifiers: dict[str, Classifier]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    classifiers: dict[str, Classifier] = {
        **local_classifiers(),
        "boom": Boom(),
        "out_of_range": OutOfRange(),
        "thread_recorder": ThreadRecorder(),
    }
    executor = ThreadPoolExecutor(2, thread_name_prefix="classifier")
    server, port = build_classifier_server(
        classifiers, Checker(classifiers, executor, 3.0), "127.0.0.1", 0
    )
    await server.start()
    yield Served(f"127.0.0.1:{port}", classifiers)
    await close_channels()
    await server.stop(0)
    executor.shutdown()


def remote(target: str, classifier: str, **settings: Any) -> RemoteClassifier:
    built = build_remote(
        f"remote_{classifier}", {"target": target, "classifier": classifier, **settings}
    )
    assert isinstance(built, RemoteClassifier)
    return built


async def call(target: str, method: str, request: Any, response_type: Any) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        rpc = channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return await rpc(request, timeout=5)


# -- the protocol -------------------------------------------------------------------------


async def test_remote_gives_exactly_the_local_scores_and_spans(served: Served) -> None:
    for name in ("pii_detector", "banned"):
        local = served.classifiers[name].classify(TEXTS)
        assert isinstance(local, list)
        got = await remote(served.target, name).classify(TEXTS)
        assert got == list(local), name
    # The texts really exercise spans past non-BMP characters.
    spans = (await remote(served.target, "banned").classify(TEXTS))[3].spans
    assert [TEXTS[3][s.start : s.end] for s in spans] == [
        "PROJECT   falcon",
        "internal only",
        "project falcon",
    ]


async def test_one_call_runs_several_classifiers_in_request_order(served: Served) -> None:
    response = await call(
        served.target,
        CLASSIFY_METHOD,
        pb.ClassifyRequest(texts=TEXTS[:2], classifiers=["banned", "pii_detector", "banned"]),
        pb.ClassifyResponse,
    )
    assert [r.classifier for r in response.results] == ["banned", "pii_detector", "banned"]
    assert [len(r.classifications) for r in response.results] == [2, 2, 2]
    assert response.results[1].classifications[0].spans[0].label == "EMAIL"


async def test_list_classifiers_names_them_with_spans_flag(served: Served) -> None:
    response = await call(
        served.target,
        LIST_CLASSIFIERS_METHOD,
        pb.ListClassifiersRequest(),
        pb.ListClassifiersResponse,
    )
    assert [(c.name, c.produces_spans) for c in response.classifiers] == [
        ("banned", True),
        ("boom", False),
        ("out_of_range", False),
        ("pii_detector", True),
        ("thread_recorder", False),
    ]


async def test_served_classifiers_run_through_the_checker(served: Served) -> None:
    got = await remote(served.target, "thread_recorder").classify(["a", "b"])
    assert got == [Classification(0.25), Classification(0.25)]
    recorder = served.classifiers["thread_recorder"]
    assert isinstance(recorder, ThreadRecorder)
    # Sync classifiers leave the event loop, exactly as in extproc.
    assert recorder.threads and recorder.threads[0].startswith("classifier")
    assert await remote(served.target, "thread_recorder").classify([]) == []


async def test_unknown_classifier_is_not_found(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(
            served.target,
            CLASSIFY_METHOD,
            pb.ClassifyRequest(texts=["x"], classifiers=["banned", "toxicity_v9"]),
            pb.ClassifyResponse,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown classifier 'toxicity_v9'" in str(caught.value.details())

    with pytest.raises(RemoteClassifierError) as raised:
        await remote(served.target, "toxicity_v9").classify(["x"])
    assert str(raised.value).startswith(
        f"remote classifier 'toxicity_v9' at {served.target}: NOT_FOUND: unknown classifier"
    )


async def test_no_classifier_requested_is_invalid_argument(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(
            served.target, CLASSIFY_METHOD, pb.ClassifyRequest(texts=["x"]), pb.ClassifyResponse
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("boom", "classifier 'boom': raised RuntimeError: model file is corrupt"),
        ("out_of_range", "classifier 'out_of_range': returned score 2.0 outside [0, 1]"),
    ],
)
async def test_failing_classifier_is_internal_naming_it(
    served: Served, name: str, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(
            served.target,
            CLASSIFY_METHOD,
            pb.ClassifyRequest(texts=["x"], classifiers=[name]),
            pb.ClassifyResponse,
        )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == reason


# -- failures become failed verdicts (the tenant's fail mode decides) -----------------------

PLAN = PhasePlan(("remote_pii",), (Rule("no_pii", "remote_pii", 0.5, "block", None, None),))


def checker_for(classifier: RemoteClassifier) -> Checker:
    return Checker({"remote_pii": classifier}, ThreadPoolExecutor(1), 3.0)


async def test_remote_verdict_blocks_like_the_local_one(served: Served) -> None:
    checker = checker_for(remote(served.target, "pii_detector"))
    verdict = await checker.check(PLAN, ["mail jane.doe@example.com"])
    assert verdict.failure is None
    assert verdict.action == "block"
    clean = await checker.check(PLAN, ["nothing personal"])
    assert (clean.failure, clean.action) == (None, None)


async def test_down_target_fails_the_verdict() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    verdict = await checker_for(remote(target, "pii_detector")).check(PLAN, ["a@b.example"])
    await close_channels()
    assert verdict.failed_classifier == "remote_pii"
    assert verdict.failure is not None
    assert verdict.failure.startswith(
        f"classifier 'remote_pii': raised RemoteClassifierError: remote classifier "
        f"'pii_detector' at {target}: "
    )
    assert "UNAVAILABLE" in verdict.failure or "DEADLINE_EXCEEDED" in verdict.failure
    assert time.monotonic() - started < 2


async def test_slow_target_fails_the_verdict_at_its_deadline() -> None:
    async def too_slow(request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        await asyncio.sleep(5)
        return pb.ClassifyResponse()

    handler = grpc.unary_unary_rpc_method_handler(
        too_slow,
        request_deserializer=pb.ClassifyRequest.FromString,
        response_serializer=pb.ClassifyResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Classify": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        classifier = remote(f"127.0.0.1:{port}", "pii_detector", timeout_ms=150)
        started = time.monotonic()
        verdict = await checker_for(classifier).check(PLAN, ["a@b.example"])
        elapsed = time.monotonic() - started
    finally:
        await close_channels()
        await server.stop(0)
    assert verdict.failed_classifier == "remote_pii"
    assert verdict.failure is not None and "DEADLINE_EXCEEDED" in verdict.failure
    assert 0.1 < elapsed < 1.5


# -- settings -------------------------------------------------------------------------------


def test_settings_defaults_and_spans() -> None:
    classifier = build_remote("remote_tox", {"target": "10.0.0.7:50061", "classifier": "toxicity"})
    assert isinstance(classifier, RemoteClassifier)
    assert (classifier.target, classifier.remote_name, classifier.timeout_s) == (
        "10.0.0.7:50061",
        "toxicity",
        0.2,
    )
    # Unknown until the server answers, so redact rules are accepted (see plugins/remote.py).
    assert classifier.produces_spans is True


@pytest.mark.parametrize(
    "settings",
    [
        {"target": "10.0.0.7:50061", "classifier": "toxicity", "timeout": 200},
        {"target": "10.0.0.7", "classifier": "toxicity"},
        {"target": "10.0.0.7:http", "classifier": "toxicity"},
        {"target": "10.0.0.7:50061"},
        {"target": "10.0.0.7:50061", "classifier": "toxicity", "timeout_ms": 0},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        build_remote("remote_tox", settings)


def test_unknown_key_is_reported_at_its_line(tmp_path: Path) -> None:
    config = tmp_path / "checkstream.yaml"
    config.write_text(
        "classifiers:\n"
        "  remote_tox:\n"
        "    type: remote\n"
        '    target: "10.0.0.7:50061"\n'
        "    classifier: toxicity\n"
        "    timeout: 200\n"
    )
    with pytest.raises(ConfigError) as caught:
        compile_guardrails(load_config(config), registry_with_remote())
    assert "checkstream.yaml:6: classifiers.remote_tox.timeout: unknown key" in str(caught.value)


# -- what `classifiers serve` serves --------------------------------------------------------


def test_serve_offers_instances_and_types_that_work_by_name(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "classifiers": {
                "banned": {"type": "keyword", "terms": ["project falcon"]},
                "emails": {"type": "pii_detector", "entities": ["EMAIL"]},
            }
        },
    )
    served = servable_classifiers(load_config(config), registry_with_remote())
    assert {"banned", "emails", "pii_detector"} <= set(served)
    # Types that need settings are served only through instances.
    assert "keyword" not in served
    assert "remote" not in served


# -- `checkstream classifiers serve` as a process -------------------------------------------


SERVE = (sys.executable, "-m", "checkstream", "classifiers", "serve")


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)


def start_serve(config: Path, port: int = 0, timeout: float = 60) -> ServeProcess:
    log_path = config.with_name(f"serve-{time.monotonic_ns()}.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*SERVE, "-c", str(config), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = re.search(r"checkstream: classifiers listening on 127\.0\.0\.1:(\d+)", text)
        if found:
            return ServeProcess(process, log_path, int(found.group(1)))
        if process.poll() is not None:
            raise RuntimeError(f"classifiers serve exited with {process.returncode}:\n{text}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"classifiers serve did not start:\n{log_path.read_text()}")


def test_cli_serve_answers_list_and_classify_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"classifiers": {"banned": {"type": "keyword", "terms": ["project falcon"]}}}
    )
    serve = start_serve(config)
    try:
        with grpc.insecure_channel(serve.target) as channel:
            listed = channel.unary_unary(
                LIST_CLASSIFIERS_METHOD,
                request_serializer=pb.ListClassifiersRequest.SerializeToString,
                response_deserializer=pb.ListClassifiersResponse.FromString,
            )(pb.ListClassifiersRequest(), timeout=5)
            classified = channel.unary_unary(
                CLASSIFY_METHOD,
                request_serializer=pb.ClassifyRequest.SerializeToString,
                response_deserializer=pb.ClassifyResponse.FromString,
            )(pb.ClassifyRequest(texts=["Project Falcon?"], classifiers=["banned"]), timeout=5)
    finally:
        code = serve.stop()
    names = {c.name: c.produces_spans for c in listed.classifiers}
    assert names["banned"] is True
    assert names["pii_detector"] is True
    result = classified.results[0].classifications[0]
    assert (result.score, [(s.start, s.end, s.label) for s in result.spans]) == (
        1.0,
        [(0, 14, "KEYWORD")],
    )
    assert code == 0, serve.log_path.read_text()


def test_cli_serve_refuses_a_bad_config_and_a_taken_port(tmp_path: Path) -> None:
    bad = write_config(tmp_path, {"classifiers": {"banned": {"type": "keyword"}}}, "bad.yaml")
    result = subprocess.run(
        [*SERVE, "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "bad.yaml:2: classifiers.banned.terms: required key is missing" in result.stderr

    good = write_config(tmp_path, {}, "good.yaml")
    serve = start_serve(good)
    try:
        taken = subprocess.run(
            [*SERVE, "-c", str(good), "--port", str(serve.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        assert serve.stop() == 0
    assert taken.returncode == 1
    assert f"cannot listen on 127.0.0.1:{serve.port} for classifiers" in taken.stderr


# -- end to end: a gateway whose tenants use a remote classifier ----------------------------


def remote_plugin_site(tmp_path: Path) -> dict[str, str]:
    """Environment for a gateway that can load ``type: remote``.

    Until the ``remote = "checkstream.plugins.remote"`` entry point is in pyproject.toml,
    install it the
    way pip would, as a dist-info directory on PYTHONPATH (the registry ignores the same
    entry point seen twice, so this stays harmless once the real one exists).
    """
    if "remote" in load_registry().types:
        return {}
    site = tmp_path / "site"
    info = site / "checkstream_remote_entry_point-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: checkstream-remote-entry-point\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text("[checkstream]\nremote = plugins.remote\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@dataclass
class RemoteGateway:
    gateway: Gateway
    upstream: RecordingUpstream
    serve_config: Path
    serve_port: int


@pytest.fixture(scope="module")
def remote_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteGateway]:
    directory = tmp_path_factory.mktemp("remote-gw")
    serve_config = write_config(directory, {}, "classifiers.yaml")
    serve_port = free_port()
    upstream = RecordingUpstream("remote-e2e").start()
    policy = write_policy(directory, "no-pii.yaml", [("no_pii", "remote_pii", "block")])
    tenant = {
        "backend_url": f"http://127.0.0.1:{upstream.port}/v1",
        "classifiers": ["remote_pii"],
        "policy_path": str(policy),
    }
    config = {
        "classifiers": {
            "remote_pii": {
                "type": "remote",
                "target": f"127.0.0.1:{serve_port}",
                "classifier": "pii_detector",
            }
        },
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "tenants": {
            "configs": {
                "closed": tenant,
                "open": {**tenant, "fail_mode": "open"},
            }
        },
    }
    gateway = start_gateway(write_config(directory, config), env=remote_plugin_site(directory))
    yield RemoteGateway(gateway, upstream, serve_config, serve_port)
    assert gateway.stop() == 0, gateway.log()
    upstream.stop()


def chat(gateway: Gateway, tenant: str, text: str) -> Any:
    payload = {"model": "m", "messages": [{"role": "user", "content": text}]}
    return request(f"{gateway.url}/v1/chat/completions", payload, {"X-Tenant-ID": tenant})


def reached(upstream: RecordingUpstream, text: str) -> bool:
    return any(text.encode() in got.body for got in upstream.received)


def test_e2e_remote_classifier_blocks_fails_closed_and_recovers(
    remote_gateway: RemoteGateway,
) -> None:
    gateway, upstream = remote_gateway.gateway, remote_gateway.upstream
    serve = start_serve(remote_gateway.serve_config, remote_gateway.serve_port)
    try:
        text = "Contact me at jane.doe@example.com about the invoice"
        reply = chat(gateway, "closed", text)
        assert reply.status == 400, reply.body
        assert reply.headers["x-checkstream-rule"] == "no_pii"
        assert reply.json()["error"]["code"] == "content_policy_violation"
        assert not reached(upstream, text)

        calm = "What is the capital of France?"
        reply = chat(gateway, "closed", calm)
        assert reply.status == 200, reply.body
        assert reached(upstream, calm)
    finally:
        assert serve.stop() == 0, serve.log_path.read_text()

    # The remote is down: the closed tenant fails closed, the open one passes unchecked.
    text = "Down: mail jane.doe@example.com"
    reply = chat(gateway, "closed", text)
    assert reply.status == 503, reply.body
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "guardrail_error")
    assert not reached(upstream, text)

    reply = chat(gateway, "open", text)
    assert reply.status == 200, reply.body
    assert reached(upstream, text)
    assert "'remote_pii': raised RemoteClassifierError" in gateway.log()

    # Back on the same port: the gateway reconnects within its ~1 s backoff cap.
    serve = start_serve(remote_gateway.serve_config, remote_gateway.serve_port)
    try:
        deadline = time.monotonic() + 10
        while True:
            reply = chat(gateway, "closed", "Back: mail jane.doe@example.com")
            if reply.status == 400 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert reply.status == 400, reply.body
        assert reply.headers["x-checkstream-rule"] == "no_pii"
    finally:
        assert serve.stop() == 0


# -- generated modules and the .proto itself ---------------------------------------------------


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    stamp = (protogen.PACKAGE_DIR / protogen.STAMP).read_text().strip()
    assert stamp == protogen.source_digest(ROOT / "proto")
    written = protogen.generate(ROOT / "proto", tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {
        "checkstream/__init__.py",
        "checkstream/v1/__init__.py",
        "checkstream/v1/classifier_pb2.py",
        "checkstream/v1/classifier_pb2.pyi",
        protogen.STAMP,
    } == names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".generating-")]


def find_buf() -> str | None:
    return os.environ.get("BUF") or shutil.which("buf")


@pytest.mark.skipif(
    find_buf() is None,
    reason="buf not found: install it (npm install @bufbuild/buf, or a release binary) and "
    "put it on PATH or set BUF=/path/to/buf",
)
def test_buf_lint_passes() -> None:
    buf = find_buf()
    assert buf is not None
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
