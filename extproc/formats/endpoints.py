"""The APIs CheckStream checks, one entry per endpoint: where its texts are, how its stream
is framed and ended (its ``WireFormat``), and whether its answer holds text to check.

Dispatch is by the path's last segments, so a backend mounted under a prefix
(``/openai/v1/chat/completions``) is recognised too. Anything else is no endpoint: a guarded
tenant refuses such a request if it has a body, unless the tenant lists the path in
``passthrough_paths`` (worker process).
"""

from __future__ import annotations

from dataclasses import dataclass

from checkstream.formats import WireFormat, anthropic, openai, responses


@dataclass(frozen=True)
class Endpoint:
    name: str
    #: The path's last segments, e.g. ``/chat/completions``.
    suffix: str
    fmt: WireFormat
    #: The answer holds model text to check (not vectors or a token count).
    checks_answer: bool = True


ENDPOINTS: tuple[Endpoint, ...] = (
    # Longer suffixes first: /chat/completions also ends in /completions.
    Endpoint("chat_completions", "/chat/completions", openai.FORMAT),
    Endpoint("completions", "/completions", openai.FORMAT),
    Endpoint("responses", "/responses", responses.FORMAT),
    Endpoint("embeddings", "/embeddings", openai.FORMAT, checks_answer=False),
    Endpoint("messages_count_tokens", "/messages/count_tokens", anthropic.FORMAT, False),
    Endpoint("messages", "/messages", anthropic.FORMAT),
)


def find_endpoint(path: str) -> Endpoint | None:
    """The endpoint a request path (query string allowed) is for, or None."""
    bare = path.partition("?")[0].rstrip("/")
    for endpoint in ENDPOINTS:
        if bare.endswith(endpoint.suffix):
            return endpoint
    return None
