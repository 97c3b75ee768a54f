"""Wire formats of the LLM APIs CheckStream speaks: one module per provider format.

Only these modules know what an OpenAI or Anthropic body looks like; everything else asks
them through the ``WireFormat`` interface.
"""

from __future__ import annotations

from typing import Literal, Protocol

from extproc.formats import anthropic, openai

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


FORMATS: dict[str, WireFormat] = {"openai": openai.FORMAT, "anthropic": anthropic.FORMAT}
