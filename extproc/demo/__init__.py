"""The built-in demo upstream: a small, faithful OpenAI / Anthropic backend.

It lets people try the CheckStream gateway without an API key, and gives tests and
benchmarks a deterministic backend whose latency is under our control. One module per API:

- ``chat``: ``POST /v1/chat/completions`` (JSON or SSE)
- ``completions``: ``POST /v1/completions`` (JSON or SSE)
- ``responses``: ``POST /v1/responses`` (JSON or SSE with Responses events)
- ``embeddings``: ``POST /v1/embeddings`` (floats or base64)
- ``messages``: Anthropic ``POST /v1/messages`` (JSON or SSE), ``/v1/messages/count_tokens``
- ``models``: ``GET /v1/models`` and ``/v1/models/{id}`` (OpenAI or Anthropic shape)

The answer is complete sentences derived from the last user message (``answer``), so a test
can predict it exactly. Errors are JSON in the endpoint's own shape, unknown paths included.
Per-request behaviour is steered with headers:

- ``x-demo-chunks``: exactly this many one-word text pieces (stream events carrying text),
  cycling through the answer, capped at 2000; without it the whole answer.
- ``x-demo-delay-ms``: delay between stream events, overriding the server default.
- ``x-demo-status``: a 4xx/5xx status to answer with, in the endpoint's error format.

Run standalone with ``python -m checkstream.demo --port 9001 --chunk-delay-ms 20``.
``checkstream.yaml`` here is the config ``checkstream run --demo`` serves.
"""

from checkstream.demo.answer import answer_pieces
from checkstream.demo.models import DEMO_MODELS
from checkstream.demo.server import DemoUpstream, create_app, start_demo_upstream
from checkstream.demo.wire import MAX_CHUNKS

__all__ = [
    "DEMO_MODELS",
    "MAX_CHUNKS",
    "DemoUpstream",
    "answer_pieces",
    "create_app",
    "start_demo_upstream",
]
