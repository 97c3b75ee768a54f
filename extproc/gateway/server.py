"""The ext_proc gRPC service: one ``Process`` stream per HTTP request, mapped to an Exchange
(and, on the same port, the access log service that closes deferred requests).

This module holds the protocol loop and the worker's life (start, reload, stop); decisions
live in ``exchange.py``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    ProcessingRequest,
    ProcessingResponse,
)

from checkstream.accounting.journal import Journal, journal_path
from checkstream.accounting.killed_requests import bill_killed_requests
from checkstream.accounting.suspensions import SuspensionStoreUnavailable
from checkstream.config.model import LoadedConfig, load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.gateway.access_log import add_to_server as add_access_log
from checkstream.gateway.exchange import Answer, Exchange
from checkstream.gateway.runtime import Runtime
from checkstream.intake.request_ids import stamp, with_request_id
from checkstream.ops import logs
from checkstream.ops.admin import admin_token_from_env, start_admin
from checkstream.ops.reloading import (
    CONTROL_FILE,
    Ack,
    RestartNeeded,
    ack_path,
    read_control,
    restart_needed,
    write_ack,
)
from checkstream.ops.watching import watch_config
from checkstream.policy.registry import PluginError, load_registry

log = logs.get("checkstream.extproc")

# Audit files past retention are removed at start and then this often.
_PRUNE_EVERY_S = 3600.0


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ProcessingResponse]:
        exchange = Exchange(self.runtime)
        # However the RPC ends (client gone, Envoy reset, deadline, server stop), the request
        # is still accounted: the callback runs even when this generator is never resumed.
        context.add_done_callback(lambda _: _abandon(exchange))
        try:
            async for answer in self._answers(exchange, request_iterator, context):
                yield answer
        finally:
            _abandon(exchange)

    async def _answers(
        self,
        exchange: Exchange,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ProcessingResponse]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            answer: Answer
            if kind == "request_headers":
                replaced = stamp(request.request_headers)
                answer = await exchange.on_request_headers(
                    request.request_headers, request.attributes
                )
                if replaced is not None:
                    answer = with_request_id(answer, replaced)
            elif kind == "response_body":
                answer = await exchange.on_response_body(request.response_body)
            elif kind == "request_body":
                answer = await exchange.on_request_body(request.request_body)
            elif kind == "response_headers":
                answer = await exchange.on_response_headers(
                    request.response_headers, request.attributes
                )
            elif kind == "response_trailers":
                answer = await exchange.on_response_trailers(request.response_trailers)
            elif kind == "request_trailers":
                answer = exchange.on_request_trailers(request.request_trailers)
            else:
                # A message this version does not know: answering nothing would stall the
                # request until message_timeout, so fail it now and say why.
                log.error("unsupported_message", kind=kind)
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unsupported message {kind}")
                return
            if answer is None:
                continue
            if isinstance(answer, list):
                for item in answer:
                    yield item
            else:
                yield answer


_BACKGROUND: set[asyncio.Task[None]] = set()


def _abandon(exchange: Exchange) -> None:
    """Account for a request whose stream ended before its response did, once."""
    tally = exchange.tally
    if tally is not None and not tally.done:
        # In a task: a cancelled generator cannot await, and a done callback is not async.
        _in_background(exchange.abandon())


def _in_background(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def build_server(processor: ExternalProcessor, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    # Deferred requests end here (access_log.py): Envoy's access log to the same port.
    add_access_log(server, lambda: processor.runtime)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0  # grpcio raises where older versions returned 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for extproc (port in use?)")
    return server, bound


class Worker:
    """Swaps in a new runtime on SIGHUP (see ``reloading.py``), one reload at a time."""

    def __init__(
        self, processor: ExternalProcessor, config_path: Path, control_dir: Path | None, port: int
    ) -> None:
        self.processor = processor
        self.config_path = config_path
        self.control_dir = control_dir
        self.port = port
        self.lock = asyncio.Lock()

    def on_drain(self) -> None:
        self.processor.runtime.draining = True

    def on_hangup(self) -> None:
        _in_background(self.hangup())

    async def hangup(self) -> None:
        async with self.lock:
            control = read_control(self.control_dir / CONTROL_FILE) if self.control_dir else None
            if control is None:
                await self.reload()
                return
            accounts = self.processor.runtime.accounts
            version, error = self.processor.runtime.version, None
            if accounts.shared is None:
                accounts.suspensions.clear()
                accounts.suspensions.update(control.suspensions)
            elif control.action == "suspensions":
                # At once on the replica that took the order; the follower would within 0.5 s.
                try:
                    await accounts.shared.refresh(accounts.suspensions)
                except SuspensionStoreUnavailable as exc:
                    error = f"suspensions cannot be read from Redis: {exc}"
            if control.action == "reload":
                version, error = await self.reload()
            assert self.control_dir is not None
            write_ack(
                ack_path(self.control_dir, self.port), Ack(control.generation, version, error)
            )

    async def reload(self) -> tuple[str, str | None]:
        """Load, validate and swap in the config; the version in force and any error."""
        old = self.processor.runtime
        try:
            loaded = await asyncio.to_thread(load_config, self.config_path)
            why = restart_needed(old.config, loaded)
            if why is not None:
                raise RestartNeeded(f"{self.config_path}: {why}")
            # In the loop's thread: classifiers may open clients bound to this loop.
            runtime = Runtime.from_config(
                loaded,
                accounts=old.accounts,
                executor=old.checker.executor,
                large=old.checker.large,
            )
            # The new classifiers' models load before the swap: no request waits for them.
            await load_registry().startup(runtime.guardrails.classifiers)
        except (ConfigError, PluginError, RestartNeeded) as exc:
            log.error("reload_refused", error=str(exc))
            return old.version, str(exc)
        old.accounts.retarget(loaded)
        runtime.draining = old.draining
        self.processor.runtime = runtime
        log.info("reloaded", version=runtime.version)
        return runtime.version, None


async def serve(
    loaded: LoadedConfig,
    host: str,
    port: int,
    control_dir: Path | None = None,
    admin: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight streams (up to drain_timeout_s).

    ``admin``: also serve the admin API on ``server.admin_port`` (no launcher: a sidecar,
    ``worker_admin.py``).

    Raises ConfigError or PluginError if the config does not compile, OSError if the port
    is taken.
    """
    runtime = Runtime.from_config(loaded)
    try:
        # Models load once per worker, here, before it says it is listening.
        await load_registry().startup(runtime.guardrails.classifiers)
    except PluginError:
        await runtime.accounts.aclose()
        raise
    processor = ExternalProcessor(runtime)
    try:
        server, bound = build_server(processor, host, port)
    except OSError:
        await runtime.accounts.aclose()
        raise
    if control_dir is not None:  # under a launcher, which restarts a killed worker here
        journal = journal_path(control_dir, bound)
        await bill_killed_requests(runtime.accounts, runtime.pricing, journal)
        runtime.accounts.journal = Journal(journal)
    await server.start()
    large = runtime.checker.large
    if large is not None and any(
        getattr(c, "inline", False) for c in runtime.guardrails.classifiers.values()
    ):
        large.warm()
    worker = Worker(processor, loaded.path, control_dir, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Before the line the launcher waits for: SIGHUP's default action would kill us.
    loop.add_signal_handler(signal.SIGHUP, worker.on_hangup)
    reload: Callable[[], Awaitable[object]] = worker.hangup
    stop_admin: Callable[[], Awaitable[None]] | None = None
    if admin:
        from checkstream.gateway.worker_admin import WorkerAdmin

        backend = WorkerAdmin(worker)
        reload = backend.reload
        settings = loaded.model.server
        try:
            stop_admin = await start_admin(
                backend, settings.host, settings.admin_port, admin_token_from_env()
            )
        except OSError as exc:
            await server.stop(0)
            await runtime.accounts.aclose()
            raise OSError(
                f"the admin server cannot listen on {settings.admin_port}: {exc}"
            ) from None
    # The launcher's first step of a drain: the listener's /healthz answers 503 from now.
    loop.add_signal_handler(signal.SIGUSR1, worker.on_drain)
    # The launcher waits for this line (any log format) before it starts Envoy.
    log.info("extproc listening", address=f"{host}:{bound}")
    background = [loop.create_task(_prune_audit(processor))]
    if control_dir is None:  # on its own (a sidecar): nobody else watches the files
        background.append(loop.create_task(watch_config(lambda: processor.runtime.config, reload)))
    shared = runtime.accounts.shared
    if shared is not None:
        background.append(loop.create_task(shared.follow(runtime.accounts.suspensions)))
    await stop.wait()
    processor.runtime.draining = True
    await server.stop(loaded.model.server.drain_timeout_s)
    for task in background:
        task.cancel()
    # Streams cut by the stop are abandoned from callbacks: let those run, then wait for
    # every request to be accounted before the stores close.
    await asyncio.sleep(0)
    if _BACKGROUND:
        await asyncio.wait(set(_BACKGROUND), timeout=5)
    if stop_admin is not None:
        await stop_admin()
    await processor.runtime.accounts.aclose()
    if processor.runtime.checker.large is not None:
        processor.runtime.checker.large.close()
    await load_registry().shutdown()  # plugins release what they hold (remote channels)


async def _prune_audit(processor: ExternalProcessor) -> None:
    while True:
        runtime = processor.runtime
        try:
            removed = await asyncio.to_thread(runtime.accounts.audit.prune, runtime.audit_retention)
        except OSError as exc:
            log.error("audit_prune_failed", error=str(exc))
        else:
            for path in removed:
                log.info("audit_pruned", file=str(path))
        await asyncio.sleep(_PRUNE_EVERY_S)
