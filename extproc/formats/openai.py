"""OpenAI's HTTP API: error bodies and auth (chat completions, completions, embeddings)."""

from __future__ import annotations

import json
from dataclasses import dataclass

# OpenAI's `error.type` values for the statuses CheckStream itself answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}


@dataclass(frozen=True)
class OpenAIFormat:
    name: str = "openai"
    auth_header: str = "authorization"

    def error_body(self, status: int, message: str, code: str | None = None) -> bytes:
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        error = {"message": message, "type": kind, "param": None, "code": code}
        return json.dumps({"error": error}).encode()

    def auth_value(self, secret: str) -> str:
        return f"Bearer {secret}"


FORMAT = OpenAIFormat()
