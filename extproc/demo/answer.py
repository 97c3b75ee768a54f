"""What the demo upstream answers: complete sentences derived from the prompt, so a test can
predict every piece. Pure functions; used by the demo upstream's handlers and by tests."""

from __future__ import annotations

from typing import Any, Final

_PROMPT_ECHO_CHARS: Final = 200
_INTRO: Final = "This is the CheckStream demo upstream."
_OUTRO: Final = (
    "It answers one word at a time, so the gateway can be tried and measured without an API key."
)


def answer_words(prompt: str) -> list[str]:
    """The whole answer to ``prompt``, one word (with its punctuation) per item."""
    # rstrip: the cut may land just after a space, which would split the final "." off.
    echo = " ".join(prompt.split())[:_PROMPT_ECHO_CHARS].rstrip()
    said = f"You said: {echo}." if echo else "You said nothing."
    return f"{_INTRO} {said} {_OUTRO}".split()


def answer_pieces(prompt: str, chunks: int | None = None) -> list[str]:
    """The text pieces the demo upstream answers ``prompt`` with, in stream order.

    Without ``chunks`` the answer is complete: every sentence ends. ``chunks`` (the
    ``x-demo-chunks`` header) asks for exactly that many one-word pieces instead, cycling
    through the answer: a knob for tests and benchmarks that need a given stream length.
    """
    words = answer_words(prompt)
    count = len(words) if chunks is None else chunks
    pieces = [words[i % len(words)] + " " for i in range(count)]
    if pieces:
        # No dangling space at the very end of the answer.
        pieces[-1] = pieces[-1][:-1]
    return pieces


def word_count(text: str) -> int:
    # Whitespace-split words stand in for tokens: this is a demo, not a tokenizer.
    return len(text.split())


def content_text(content: Any) -> str:
    """Text of a message's content: a string, or a list of text parts (OpenAI chat ``text``,
    Responses ``input_text`` / ``output_text``, Anthropic ``text``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") in ("text", "input_text", "output_text")
            and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""
