"""``type: remote``: a classifier that runs in another process, usually on another machine.

    classifiers:
      remote_tox: {type: remote, target: "10.0.0.7:50061", classifier: toxicity, timeout_ms: 200}

``target`` is the ``host:port`` of a ``checkstream classifiers serve`` process (protocol:
``proto/checkstream/v1/classifier.proto``), ``classifier`` the name it serves the classifier
under (an instance under its ``classifiers:`` or a built-in type such as ``pii_detector``),
``timeout_ms`` the deadline of each call (default 200).

Failures are the tenant's fail mode's business: a target that is down, a call past its
deadline, a name the server does not serve or a failing classifier there all raise, and the
gateway's Checker turns that into a failed verdict naming this classifier, so a
``fail_mode: closed`` tenant gets a 5xx and a ``fail_mode: open`` one passes.

Spans: whether the served classifier reports spans is only known from the server, and the
gateway's config must compile without it (the server may start later). So a remote
classifier declares ``produces_spans = True`` and ``redact`` rules are accepted; it returns
exactly the spans the server sends, none if the served classifier reports none, in which
case a ``redact`` rule on it triggers but has nothing to replace. ``ListClassifiers`` (or
the serving config) tells which classifiers report spans.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Mapping, Sequence
from typing import Annotated, Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from checkstream import Classification, Classifier, ClassifierFactory, Span, hookimpl
from checkstream.protocol import classifier_pb2 as pb

# From the descriptor, as the server (extproc/policy/classifier_server.py) does, so both
# follow the .proto.
_SERVICE = pb.DESCRIPTOR.services_by_name["ClassifierService"]
CLASSIFY_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Classify'].name}"
# Batches of long prompts exceed gRPC's 4 MiB default (the server allows as much).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_CHANNEL_OPTIONS = [
    # gRPC backs off up to 120 s between reconnection attempts by default: a classifier
    # server that restarts would keep failing every request (or letting every fail-open
    # request through unchecked) long after it is back. Retry at least once a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# One channel per target and event loop, shared by every remote classifier using that
# target: a channel multiplexes concurrent calls over one HTTP/2 connection. A grpc.aio
# channel belongs to the loop it was created in, so channels are created lazily inside the
# running loop (never at config load, which happens outside it) and forgotten with the loop.
_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def _channel(target: str) -> Any:
    loop = asyncio.get_running_loop()
    per_loop = _channels.setdefault(loop, {})
    channel = per_loop.get(target)
    if channel is None:
        channel = per_loop[target] = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    return channel


@hookimpl
def checkstream_shutdown() -> Awaitable[None]:
    """The process stops: close every channel to a classifier server."""
    return close_channels()


async def close_channels() -> None:
    """Close this loop's channels (tests, and shutdown of a process that used them)."""
    per_loop = _channels.pop(asyncio.get_running_loop(), {})
    for channel in per_loop.values():
        await channel.close()


class RemoteClassifierError(Exception):
    """A remote call failed; the message names the target, the remote name and why."""


class RemoteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target: Annotated[str, Field(min_length=1)]
    classifier: Annotated[str, Field(min_length=1)]
    timeout_ms: Annotated[int, Field(gt=0)] = 200

    @field_validator("target")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"expected host:port, got {value!r}")
        return value


class RemoteClassifier:
    #: See the module docstring: unknown until the server answers, so redact is allowed.
    produces_spans = True

    def __init__(self, name: str, settings: RemoteSettings) -> None:
        self.name = name
        self.target = settings.target
        self.remote_name = settings.classifier
        self.timeout_s = settings.timeout_ms / 1000

    async def classify(self, texts: Sequence[str]) -> list[Classification]:
        call = _channel(self.target).unary_unary(
            CLASSIFY_METHOD,
            request_serializer=pb.ClassifyRequest.SerializeToString,
            response_deserializer=pb.ClassifyResponse.FromString,
        )
        request = pb.ClassifyRequest(texts=texts, classifiers=[self.remote_name])
        try:
            response: pb.ClassifyResponse = await call(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RemoteClassifierError(
                f"{self._where()}: {exc.code().name}: {exc.details()}"
            ) from None
        results = list(response.results)
        if len(results) != 1 or results[0].classifier != self.remote_name:
            raise RemoteClassifierError(
                f"{self._where()}: answered for {[r.classifier for r in results]}"
            )
        # Scores and spans as sent: the Checker validates them like any classifier's.
        return [
            Classification(item.score, tuple(Span(s.start, s.end, s.label) for s in item.spans))
            for item in results[0].classifications
        ]

    def _where(self) -> str:
        return f"remote classifier '{self.remote_name}' at {self.target}"


def build_remote(name: str, settings: Mapping[str, Any]) -> Classifier:
    return RemoteClassifier(name, RemoteSettings.model_validate(dict(settings)))


@hookimpl
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:
    return {"remote": build_remote}
