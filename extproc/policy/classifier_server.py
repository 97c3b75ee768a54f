"""``checkstream classifiers serve``: classifiers over gRPC (``checkstream.v1.ClassifierService``).

Heavy models can then run on their own machines: a gateway's ``type: remote`` classifier
(``plugins/remote.py``) calls this server. The protocol is ``proto/checkstream/v1/
classifier.proto``.

What is served: every instance under ``classifiers:`` in the config, plus every installed
classifier type that works by its own name (``pii_detector``, ``toxicity``, ...), whether or
not a tenant uses it; types that need settings (``keyword``, ``remote``) are served only
through instances. Each call runs through the gateway's own ``Checker``, so sync, async and
``inline`` classifiers behave exactly as in extproc, and results are validated the same way.

Errors: an unknown classifier name is NOT_FOUND, an empty classifier list INVALID_ARGUMENT,
a classifier that fails (raises, or returns malformed results) INTERNAL with a message
naming it. The caller's deadline bounds the call; gRPC cancels it when the deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, NoReturn

import grpc
import pydantic

from checkstream.config.model import LoadedConfig
from checkstream.gateway.runtime import CHECK_TIMEOUT_S, CLASSIFIER_THREADS
from checkstream.policy.guardrails import compile_guardrails
from checkstream.policy.large_inputs import LargeInputs
from checkstream.policy.pipeline import Checker, ClassifierFailure
from checkstream.policy.registry import PluginError, Registry, load_registry
from checkstream.protocol import classifier_pb2 as pb
from checkstream.types import Classification, Classifier

log = logging.getLogger("checkstream.classifiers")

DEFAULT_PORT: Final = 50061
#: Taken from the descriptor rather than spelled out, so the wiring follows the .proto.
SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["ClassifierService"].full_name
CLASSIFY_METHOD: Final = f"/{SERVICE_NAME}/Classify"
LIST_CLASSIFIERS_METHOD: Final = f"/{SERVICE_NAME}/ListClassifiers"
# Batches of long prompts exceed gRPC's 4 MiB default; extproc's server allows the same.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
#: On SIGTERM, calls in flight get this long to finish.
GRACE_S: Final = 5.0


class ClassifierServicer:
    """The two RPCs, over a fixed set of classifier instances."""

    def __init__(self, classifiers: Mapping[str, Classifier], checker: Checker) -> None:
        self.classifiers = classifiers
        self.checker = checker

    async def classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        names = list(request.classifiers)
        if not names:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no classifier requested")
        for name in names:
            if name not in self.classifiers:
                await _abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"unknown classifier '{name}' (served: {', '.join(sorted(self.classifiers))})",
                )
        texts = list(request.texts)
        unique = list(dict.fromkeys(names))
        try:
            results = await asyncio.gather(*(self._classify(name, texts) for name in unique))
        except ClassifierFailure as exc:
            log.warning("%s", exc)
            await _abort(context, grpc.StatusCode.INTERNAL, str(exc))
        by_name = dict(zip(unique, results, strict=True))
        return pb.ClassifyResponse(
            results=[
                pb.ClassifierResult(classifier=name, classifications=map(_message, by_name[name]))
                for name in names
            ]
        )

    async def list_classifiers(
        self, request: pb.ListClassifiersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListClassifiersResponse:
        return pb.ListClassifiersResponse(
            classifiers=[
                pb.ClassifierInfo(name=name, produces_spans=bool(c.produces_spans))
                for name, c in sorted(self.classifiers.items())
            ]
        )

    async def _classify(self, name: str, texts: Sequence[str]) -> list[Classification]:
        if not texts:
            return []  # nothing to score; some models refuse an empty batch
        # The Checker's per-classifier step: thread pool for sync classifiers, awaited for
        # async ones, called directly for inline ones, and the result validated.
        return await self.checker.classify(name, texts)


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    # context.abort raises; grpc is untyped here, so say so for the type checker.
    raise AssertionError("grpc context.abort returned")


def _message(item: Classification) -> pb.Classification:
    return pb.Classification(
        score=item.score,
        spans=[pb.Span(start=s.start, end=s.end, label=s.label) for s in item.spans],
    )


def build_classifier_server(
    classifiers: Mapping[str, Classifier], checker: Checker, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """A server (not started) and the port it bound; port 0 picks a free one."""
    servicer = ClassifierServicer(classifiers, checker)
    handlers: dict[str, Any] = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            servicer.classify,
            request_deserializer=pb.ClassifyRequest.FromString,
            response_serializer=pb.ClassifyResponse.SerializeToString,
        ),
        "ListClassifiers": grpc.unary_unary_rpc_method_handler(
            servicer.list_classifiers,
            request_deserializer=pb.ListClassifiersRequest.FromString,
            response_serializer=pb.ListClassifiersResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0  # grpcio raises where older versions returned 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for classifiers (port in use?)")
    return server, int(bound)


def new_checker(classifiers: Mapping[str, Classifier]) -> Checker:
    """A Checker configured like extproc's (same thread pool size)."""
    executor = ThreadPoolExecutor(CLASSIFIER_THREADS, thread_name_prefix="classifier")
    return Checker(classifiers, executor, CHECK_TIMEOUT_S, LargeInputs())


def servable_classifiers(
    loaded: LoadedConfig, registry: Registry | None = None
) -> dict[str, Classifier]:
    """Every instance under ``classifiers:`` plus every type that works by its own name.

    Raises ConfigError (located, like the gateway's) for a bad instance, and PluginError
    when a type fails to build for a reason other than needing settings: a broken model
    must refuse start-up, not silently leave the server without that classifier.
    """
    registry = registry or load_registry()
    # The gateway's own compilation: the same instances and the same located errors.
    served = dict(compile_guardrails(loaded, registry).classifiers)
    for type_name, kind in sorted(registry.types.items()):
        if type_name in served:
            continue  # an instance of that name, or already built for a tenant
        try:
            served[type_name] = kind.factory(type_name, {})
        except (pydantic.ValidationError, ValueError):
            log.info("type '%s' needs settings: served only through instances", type_name)
        except Exception as exc:
            raise PluginError(
                f"plugin '{kind.plugin}' failed to build classifier '{type_name}': "
                f"{type(exc).__name__}: {exc}"
            ) from None
    return served


async def serve(classifiers: Mapping[str, Classifier], host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then let calls in flight finish (up to ``GRACE_S``)."""
    await load_registry().startup(classifiers)  # models load before the first call
    server, bound = build_classifier_server(classifiers, new_checker(classifiers), host, port)
    await server.start()
    print(
        f"checkstream: classifiers listening on {host}:{bound} "
        f"({', '.join(sorted(classifiers)) or 'none'})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(GRACE_S)
    await load_registry().shutdown()  # plugins release what they hold (remote channels)
