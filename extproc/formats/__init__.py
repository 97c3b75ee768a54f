"""Wire formats of the LLM APIs CheckStream speaks: one module per provider format.

Only these modules know what an OpenAI or Anthropic body looks like; everything else asks
them through the ``WireFormat`` interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from extproc.formats import anthropic, openai
from extproc.formats.texts import TextSlot
from extproc.hookspecs import Span

FormatName = Literal["openai", "anthropic"]


class WireFormat(Protocol):
    @property
    def name(self) -> str:
        """``openai`` or ``anthropic``."""
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


FORMATS: dict[str, WireFormat] = {"openai": openai.FORMAT, "anthropic": anthropic.FORMAT}
