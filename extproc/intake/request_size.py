"""Requests that can never fit the tenant's tokens_per_minute (worker).

Such a request is not rate limited: waiting would not help, so it is refused with 400
``request_too_large`` and no ``Retry-After`` (SDKs retry 429s for minutes), and the message
names the part to lower.
"""

from __future__ import annotations


def request_too_large(
    prompt_tokens: int,
    answer_tokens: int,
    asked_max_tokens: int | None,
    tokens_per_minute: int | None,
) -> str | None:
    """Why the request cannot fit ``tokens_per_minute`` (None or 0: no such limit), or None.

    ``answer_tokens`` is the answer's allowance: the request's ``max_tokens`` when it sent
    one (``asked_max_tokens``), else the tenant's ``default_max_tokens``.
    """
    total = prompt_tokens + answer_tokens
    if not tokens_per_minute or total <= tokens_per_minute:
        return None
    head = (
        f"this request may use about {total} tokens ({prompt_tokens} for the prompt, "
        f"{answer_tokens} for the answer), more than the tenant's tokens_per_minute "
        f"({tokens_per_minute}), so it can never be served"
    )
    if prompt_tokens >= answer_tokens:
        return f"{head}: shorten the prompt"
    if asked_max_tokens is None:
        return (
            f"{head}: send a smaller max_tokens (the tenant's default_max_tokens, "
            f"{answer_tokens}, was applied)"
        )
    return f"{head}: lower max_tokens"
