"""The first hour, end to end: ``checkstream run -c FILE --demo`` (real Envoy, real extproc,
the demo upstream in the launcher) says what it does while starting, every endpoint the
gateway checks answers the official OpenAI and Anthropic SDKs through it, errors keep their
API's shape, and the usage report afterwards has no empty-model rows and exact costs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml

from checkstream.demo import DEMO_MODELS, answer_pieces
from tests.support import Gateway, free_port, gateway_ports, start_gateway, write_config

pytestmark = pytest.mark.e2e

PROMPT = "hello there"
ANSWER = "".join(answer_pieces(PROMPT))


@pytest.fixture(scope="module")
def demo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("demo-sdks")
    demo_port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "usage": {"path": "./usage.db"},
        "pricing": {
            "checkstream-demo": {"input": 0.15, "output": 0.60},
            "claude-demo": {"input": 0.80, "output": 4.00},
        },
        "tenants": {
            "default_tenant": "demo",
            "api_key_map": {"sk-demo-openai": "demo", "sk-demo-anthropic": "demo-anthropic"},
            "configs": {
                "demo": {"backend_url": f"http://127.0.0.1:{demo_port}/v1"},
                "demo-anthropic": {
                    "backend_url": f"http://127.0.0.1:{demo_port}",
                    "streaming_format": "anthropic",
                },
            },
        },
    }
    path = write_config(directory, config)
    gateway = start_gateway(
        path,
        env={"CHECKSTREAM_ADMIN_TOKEN": "demo-sdks-admin-token"},  # the console is on
        args=["--demo", "--demo-port", str(demo_port), "--demo-chunk-delay-ms", "0"],
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def oai(demo_gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{demo_gateway.url}/v1", api_key="sk-demo-openai", max_retries=0
    ) as client:
        yield client


@pytest.fixture(scope="module")
def claude(demo_gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=demo_gateway.url, api_key="sk-demo-anthropic", max_retries=0
    ) as client:
        yield client


def test_start_up_says_each_phase_with_timings_and_full_addresses(
    demo_gateway: Gateway,
) -> None:
    server = yaml.safe_load(demo_gateway.config_path.read_text())["server"]
    # One JSON record per start-up step, each with the seconds since `run` began.
    phases = [
        record
        for line in demo_gateway.log().splitlines()
        if line.startswith("{") and (record := json.loads(line)).get("phase")
    ]
    assert [p["event"] for p in phases] == [
        "loading classifiers",
        "demo upstream started",
        "starting extproc workers (each loads the classifiers)",
        "starting Envoy",
        "listening",
    ]
    assert phases[2]["workers"].startswith("1 on 127.0.0.1:")
    assert phases[3]["url"] == f"http://127.0.0.1:{server['port']}"
    stamps = [p["elapsed_s"] for p in phases]
    assert stamps == sorted(stamps)
    ready = phases[-1]
    assert ready["url"] == f"http://127.0.0.1:{server['port']}"
    assert ready["admin"] == f"http://127.0.0.1:{server['admin_port']}"
    assert ready["envoy_admin"] == f"http://127.0.0.1:{server['envoy_admin_port']}"
    # The admin token turns the console on: its address is on the ready line.
    assert ready["console"] == f"http://127.0.0.1:{server['admin_port']}/ui/"
    assert "demo-sdks-admin-token" not in demo_gateway.log()


def test_chat_completions_json_and_sse(oai: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    completion = oai.chat.completions.create(model="checkstream-demo", messages=messages)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    stream = oai.chat.completions.create(model="checkstream-demo", messages=messages, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER


def test_completions_json_and_sse(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="checkstream-demo", prompt=PROMPT)
    assert completion.choices[0].text == ANSWER
    stream = oai.completions.create(model="checkstream-demo", prompt=PROMPT, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == ANSWER


def test_responses_json_and_sse(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="checkstream-demo", input=PROMPT)
    assert response.status == "completed"
    assert response.output_text == ANSWER
    events = list(oai.responses.create(model="checkstream-demo", input=PROMPT, stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == ANSWER
    with oai.responses.stream(model="checkstream-demo", input=PROMPT) as stream:
        final = stream.get_final_response()
    assert final.output_text == ANSWER


def test_embeddings(oai: openai.OpenAI) -> None:
    result = oai.embeddings.create(model="checkstream-demo", input=["alpha", "beta gamma"])
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    assert result.usage.prompt_tokens == 3


def test_models(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    assert [m.id for m in oai.models.list()] == list(DEMO_MODELS)
    assert [m.id for m in claude.models.list().data] == list(DEMO_MODELS)


def test_anthropic_messages_json_sse_and_count_tokens(claude: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    message = claude.messages.create(model="claude-demo", max_tokens=64, messages=messages)
    assert message.content[0].text == ANSWER  # type: ignore[union-attr]
    with claude.messages.stream(model="claude-demo", max_tokens=64, messages=messages) as s:
        assert "".join(s.text_stream) == ANSWER
        assert s.get_final_message().stop_reason == "end_turn"
    counted = claude.messages.count_tokens(model="claude-demo", messages=messages)
    assert counted.input_tokens == message.usage.input_tokens == 2


def test_errors_keep_their_api_shape(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    with pytest.raises(openai.RateLimitError) as openai_err:
        oai.chat.completions.create(
            model="checkstream-demo",
            messages=[{"role": "user", "content": PROMPT}],
            extra_headers={"x-demo-status": "429"},
        )
    assert isinstance(openai_err.value.body, dict)
    assert openai_err.value.body["type"] == "invalid_request_error"
    with pytest.raises(anthropic.InternalServerError) as anthropic_err:
        claude.messages.create(
            model="claude-demo",
            max_tokens=8,
            messages=[{"role": "user", "content": PROMPT}],
            extra_headers={"x-demo-status": "529"},
        )
    assert isinstance(anthropic_err.value.body, dict)
    assert anthropic_err.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.get("/no-such-endpoint", cast_to=object)
    assert isinstance(missing.value.body, dict)
    assert "does not serve" in missing.value.body["message"]


def test_usage_report_after_the_tour(demo_gateway: Gateway) -> None:
    """Runs last in this module: the ledger holds every request made above."""
    period = time.strftime("%Y-%m", time.gmtime())
    reports = {}
    for fmt in ("json", "csv", "table"):
        done = subprocess.run(
            [
                *(sys.executable, "-m", "checkstream", "usage"),
                *("-c", str(demo_gateway.config_path)),
                *("--all-tenants", "--by", "model", "--period", period, "--format", fmt),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        reports[fmt] = done.stdout
    rows = json.loads(reports["json"], parse_float=Decimal)
    models = {(row["tenant"], row["model"]) for row in rows}
    # GET /v1/models went through the gateway twice, and is no model's usage; the GET of an
    # unknown path (404) is an error without a model, named so.
    assert all(model != "" for _tenant, model in models)
    no_model = [row for row in rows if row["model"] == "(no model)"]
    assert [(row["tenant"], row["requests"], row["errors"]) for row in no_model] == [("demo", 1, 1)]
    assert ("demo", "checkstream-demo") in models
    assert ("demo-anthropic", "claude-demo") in models
    costs = [row["cost_usd"] for row in rows]
    assert all(cost == cost.quantize(Decimal("0.000000001")) for cost in costs)
    texts = [f"{cost:.9f}" for cost in costs]
    assert all(text in reports["csv"] and text in reports["table"] for text in texts)
    assert any(cost > 0 for cost in costs)
    assert Path(demo_gateway.config_path.parent / "usage.db").is_file()
