"""Anthropic's Messages API: error bodies and auth."""

from __future__ import annotations

import json
from dataclasses import dataclass

# https://docs.anthropic.com/en/api/errors: the error type is named by the status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class AnthropicFormat:
    name: str = "anthropic"
    auth_header: str = "x-api-key"

    def error_body(self, status: int, message: str, code: str | None = None) -> bytes:
        kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        error: dict[str, str] = {"type": kind, "message": message}
        if code is not None:
            error["code"] = code
        return json.dumps({"type": "error", "error": error}).encode()

    def auth_value(self, secret: str) -> str:
        return secret


FORMAT = AnthropicFormat()
