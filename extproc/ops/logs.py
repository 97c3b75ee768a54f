"""Log lines of the gateway's processes (launcher, workers, admin): JSON Lines or text.

``server.log_format: json`` (the default when stdout is not a terminal) writes one JSON object
per line to stdout, with ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``event`` and the
process's ``worker``/``replica`` as fields, so a shipper (Vector, Fluent Bit, Loki,
CloudWatch) reads them as they are. ``text`` renders the same records for a human.

Every module logs through the standard ``logging`` module or ``structlog``; both end in the
same renderer here. Fields are passed as key/values, never formatted into the message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.types import EventDict, Processor

LogFormat = Literal["json", "text"]

#: The launcher passes its resolved format to the workers it starts.
LOG_FORMAT_ENV = "CHECKSTREAM_LOG_FORMAT"
#: The launcher numbers its workers; the number is the ``worker`` field of their lines.
WORKER_ENV = "CHECKSTREAM_WORKER"
#: Set by the operator (a pod name, say) to tell replicas' lines apart; the host name otherwise.
REPLICA_ENV = "CHECKSTREAM_REPLICA"


def default_format(stream: TextIO | None = None) -> LogFormat:
    """``text`` for a person at a terminal, ``json`` for everything else."""
    stream = sys.stdout if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # closed or replaced stream
        return "json"


def resolve_format(configured: LogFormat | None) -> LogFormat:
    """The configured format, else what the launcher chose for its workers, else the default."""
    if configured is not None:
        return configured
    inherited = os.environ.get(LOG_FORMAT_ENV)
    if inherited in ("json", "text"):
        return inherited  # type: ignore[return-value]
    return default_format()


def replica_name() -> str:
    return os.environ.get(REPLICA_ENV) or socket.gethostname()


class _SafeStream:
    """stdout that never raises: a reader that went away (``| tee`` ended by Ctrl-C) must not
    crash the process that logs, so lines are dropped once the pipe is closed."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.closed = False

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._gone()

    def flush(self) -> None:
        if not self.closed:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._gone()

    def _gone(self) -> None:
        self.closed = True
        # The interpreter flushes stdout once more at exit; pointed at /dev/null, that
        # flush cannot fail and turn a clean exit into an error.
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)


_OUT = _SafeStream(sys.stdout)
_FORMAT: LogFormat = "json"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    def handleError(self, record: logging.LogRecord) -> None:
        # A line that cannot be written is dropped, never printed as a traceback to stderr.
        pass


def _static(fields: Mapping[str, Any]) -> Processor:
    def add(logger: Any, method: str, event: EventDict) -> EventDict:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    return add


_FIRST = ("time", "level", "logger", "event")


def _in_order(logger: Any, method: str, event: EventDict) -> EventDict:
    """The fixed fields first, so a person reading the raw lines finds them in one place."""
    event.pop("positional_args", None)  # left by %-style standard-library records
    first = {key: event.pop(key) for key in _FIRST if key in event}
    return {**first, **event}


def configure(
    fmt: LogFormat,
    *,
    worker: int | None = None,
    stream: TextIO | None = None,
    level: int = logging.INFO,
) -> None:
    """Send every log record of this process to ``stream`` (stdout) in ``fmt``."""
    fields: dict[str, Any] = {"replica": replica_name()}
    if worker is not None:
        fields["worker"] = worker
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        _static(fields),
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False, default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, timestamp_key="time")
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.PositionalArgumentsFormatter()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _in_order,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    global _OUT, _FORMAT
    _FORMAT = fmt
    out = _OUT = _SafeStream(stream if stream is not None else sys.stdout)
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # Our own records skip the standard library (a LogRecord, a caller lookup, handler
    # locks and a second pass of processors for every line: most of what one request's log
    # line cost) and are rendered straight to the same stream; other libraries' records
    # still come through the handler above. Same fields, same order, same renderer.
    structlog.configure(
        processors=[
            *shared,
            _in_order,
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=lambda *args: _NamedWriter(out, args[0] if args else ""),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )


class _NamedWriter(structlog.WriteLogger):
    """structlog's line writer with the name ``add_logger_name`` reads (``logger``)."""

    def __init__(self, out: _SafeStream, name: str) -> None:
        super().__init__(out)  # type: ignore[arg-type]
        self.name = name


# Until ``configure`` runs (tests, library use), records go to the standard library's
# loggers as one JSON message each, so its handlers and caplog still see them.
structlog.configure(
    processors=[
        structlog.stdlib.filter_by_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(default=str),
    ],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
)


def get(name: str) -> structlog.stdlib.BoundLogger:
    """A logger named ``name`` (the ``logger`` field)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def is_record(line: str) -> bool:
    """Whether a child's output line is already a record in this process's format: any line
    for text (a person reads them), a JSON object for json."""
    return _FORMAT == "text" or is_json_object(line)


def is_json_object(line: str) -> bool:
    """Whether a child's output line is already one of these JSON records (a worker's or
    Envoy's). Told by its braces, not parsed: the launcher relays every request's line, and
    what else a child may print (a traceback, a library's warning) never is one line in
    braces."""
    return line.startswith("{") and line.endswith("}")


def write_line(line: str) -> None:
    """Write a line that is already a record (relayed from a child) as it is."""
    _OUT.write(line + "\n")
