"""Wire formats of the LLM APIs CheckStream speaks: one module per provider format.

Only these modules know what an OpenAI or Anthropic body looks like; everything else asks
them through the ``WireFormat`` interface.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal, Protocol

from checkstream.formats import anthropic, openai
from checkstream.formats.sse import SseEvent
from checkstream.formats.texts import Delta, TextSlot, Usage
from checkstream.types import Span

FormatName = Literal["openai", "anthropic"]


class StreamTracker(Protocol):
    """What one streamed answer has shown the client so far, to end it early when needed."""

    def observe(self, event: SseEvent) -> None:
        """Note an event as it is sent on to the client (events never sent must not be)."""
        ...

    def ending(self, rule: str, reason: str) -> bytes:
        """Events that end the stream cleanly now, after a guardrail stopped it.

        The client's SDK sees the answer finish as filtered by the provider (OpenAI
        ``finish_reason: "content_filter"``, Anthropic ``stop_reason: "refusal"``), with the
        text sent so far as its text. A ``checkstream`` object in the final event names
        ``rule`` and ``reason``, since a header cannot be added once streaming has begun;
        the SDKs ignore unknown fields.
        """
        ...


class WireFormat(Protocol):
    @property
    def name(self) -> str:
        """``openai`` or ``anthropic``."""
        ...

    @property
    def repeats_text(self) -> bool:
        """Its streams repeat their text in later events (``rewrite_repeats``)."""
        ...

    @property
    def auth_header(self) -> str:
        """Header that carries the API key the backend expects when CheckStream injects one."""
        ...

    def error_body(self, status: int, message: str, code: str | None = None) -> bytes:
        """An error response body for ``status`` in this format."""
        ...

    def auth_value(self, secret: str) -> str:
        """The value of ``auth_header`` for a managed key."""
        ...

    # The guardrail pipeline's view of bodies. Payloads are parsed JSON of any shape: texts
    # of the wrong type are skipped and nothing here raises on a malformed body. The
    # rewriting methods never modify the payload they are given and return compact UTF-8 JSON.

    def prompt_texts(self, payload: Any) -> list[TextSlot]:
        """Every text of a request body the classifiers must see, in body order."""
        ...

    def request_problem(self, payload: Any) -> str | None:
        """What is wrong with the shape of the request's known fields (a role that is a
        list, content that is a number...), for a 400 ``invalid_request``; None if nothing."""
        ...

    def media_parts(self, payload: Any) -> list[str]:
        """The types of the request's parts no text classifier can read (images, audio,
        files), in body order; a guarded tenant refuses them unless it opts to pass them."""
        ...

    def redact_request(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """``payload`` with the spans ``spans_per_slot[i]`` of each ``slots[i]`` (from
        ``prompt_texts(payload)``) replaced by ``[REDACTED:<LABEL>]``.

        Span offsets are code points of the slot's text. The two sequences must be equally
        long (``ValueError`` otherwise).
        """
        ...

    def answer_texts(self, payload: Any) -> list[TextSlot]:
        """Every assistant text of a non-streamed answer body, in body order."""
        ...

    def redact_answer(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """``redact_request`` for an answer body and slots from ``answer_texts``."""
        ...

    def blocked_answer(self, payload: Any, message: str, rule: str) -> bytes:
        """The 200 answer body that replaces a blocked non-streamed answer: the provider's
        own shape for filtered output, with ``message`` as the text and a top-level
        ``"checkstream": {"action": "blocked", "rule": rule}``."""
        ...

    def policy_error_body(self, message: str, rule: str) -> bytes:
        """The 400 error body for a request blocked by policy ``rule``."""
        ...

    # Streamed answers, one SSE event (from ``sse.SseDecoder``) at a time. These run for
    # every event of every guarded stream: they parse JSON only for events that may hold
    # what they look for, and never raise on a malformed event.

    def stream_delta(self, event: SseEvent) -> Delta | None:
        """The text the event adds (answer text or a tool call's arguments) and the channel
        it adds it to; None for every event without text (role chunks, pings, ``[DONE]``,
        comments...)."""
        ...

    def delta_text(self, event: SseEvent) -> str | None:
        """``stream_delta``'s text alone."""
        ...

    def rewrite_repeats(self, event: SseEvent, rendered: Mapping[Hashable, str]) -> SseEvent | None:
        """``event`` with the text it repeats of the channels in ``rendered`` (whole texts
        of a channel, as released to the client) replaced; None if it repeats none."""
        ...

    def with_delta_text(self, event: SseEvent, text: str) -> SseEvent:
        """``event`` with its ``delta_text`` replaced by ``text``, re-serialised compactly;
        other fields and the event's line endings are kept. ``ValueError`` if it has no
        text."""
        ...

    def usage(self, event: SseEvent) -> Usage | None:
        """The token counts the event reports, if any. Counts are cumulative, and a later
        event's supersede an earlier one's field by field: None means this event does not
        report that count (an Anthropic ``message_delta`` may lack the input count)."""
        ...

    def without_usage(self, event: SseEvent) -> SseEvent | None:
        """``event`` as a client that did not ask for the usage ``ensure_stream_usage`` added
        sees it: unchanged, stripped of that usage, or None when it existed only for it.
        Never drops answer content."""
        ...

    def ends_stream(self, event: SseEvent) -> bool:
        """Whether ``event`` is the one that ends a complete answer (OpenAI ``[DONE]``,
        Anthropic ``message_stop``): a client that received it has read the whole answer."""
        ...

    def answer_usage(self, payload: Any) -> Usage | None:
        """The token counts of a non-streamed answer (its ``usage`` object), if it has one."""
        ...

    def max_answer_tokens(self, payload: Any) -> int | None:
        """The answer length the request allows (``max_tokens`` and kin), if it says."""
        ...

    def ensure_stream_usage(self, payload: Any) -> Any | None:
        """A copy of a streamed request that makes the backend report token counts in the
        stream; None if the request needs no change."""
        ...

    def stream_tracker(self) -> StreamTracker:
        """A new tracker for one streamed answer."""
        ...


FORMATS: dict[str, WireFormat] = {"openai": openai.FORMAT, "anthropic": anthropic.FORMAT}
