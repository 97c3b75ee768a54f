"""Requests that can never fit tokens_per_minute: which part to lower (request_size.py)."""

from __future__ import annotations

from checkstream.intake.request_size import request_too_large


def test_what_fits_or_has_no_limit_is_not_refused() -> None:
    assert request_too_large(500, 500, 500, 1000) is None
    assert request_too_large(10**6, 10**6, None, None) is None


def test_the_dominant_part_is_named() -> None:
    prompt = request_too_large(250_000, 1024, None, 1000)
    assert prompt is not None and prompt.endswith("shorten the prompt")
    assert "max_tokens" not in prompt
    asked = request_too_large(10, 5000, 5000, 1000)
    assert asked is not None and asked.endswith("lower max_tokens")
    assert "5010 tokens (10 for the prompt, 5000 for the answer)" in asked
    # No max_tokens was sent: the tenant's default is what to override.
    default = request_too_large(10, 4096, None, 1000)
    assert default is not None
    assert "send a smaller max_tokens (the tenant's default_max_tokens, 4096, was applied)" in (
        default
    )
