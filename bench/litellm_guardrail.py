"""The LiteLLM proxy's side of ``peers.py``: a custom guardrail equivalent to CheckStream's.

Runs inside the LiteLLM proxy process (its own venv, see ``peers.py``), never in
CheckStream's. ``peers.py`` copies this file next to the LiteLLM config it writes and names
it there as ``litellm_guardrail.BenchGuardrail`` (``mode: pre_call``, ``default_on: true``).

What it checks matches the CheckStream tenant ``guarded`` in ``peers.py``: the text of every
message of the prompt, against a few PII regexes (the common shapes ``pii_detector`` finds:
e-mail, phone, card number, US SSN, IBAN, API keys) and the same 20-term keyword list,
case-insensitive on word boundaries; a match refuses the request with HTTP 400 before the
backend is called. It is deliberately simple: ``pii_detector`` does more (checksums,
context), so this side is, if anything, cheaper.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import HTTPException
from litellm.integrations.custom_guardrail import CustomGuardrail

BANNED_TERMS = [
    "project falcon",
    "internal only",
    "confidential roadmap",
    "acquisition target",
    "layoff list",
    "salary bands",
    "source code leak",
    "exploit kit",
    "credential dump",
    "zero-day",
    "insider trading",
    "wire the funds",
    "bypass the audit",
    "disable logging",
    "password spray",
    "ransomware builder",
    "pirated license",
    "unreleased earnings",
    "merger talks",
    "board minutes",
]
_PII = [
    re.compile(r"[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,63}\b"),  # e-mail
    re.compile(r"(?:\+\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"),  # phone
    re.compile(r"\b\d(?:[ -]?\d){12,18}\b"),  # card number
    re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),  # US SSN
    re.compile(r"\b[A-Z]{2}\d\d(?:[ ]?[A-Z0-9]){11,30}\b"),  # IBAN
    re.compile(r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,})"),
]
_BANNED = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in BANNED_TERMS) + r")\b", re.I)


def _texts(data: dict[str, Any]) -> list[str]:
    texts = []
    for message in data.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return texts


def violation(data: dict[str, Any]) -> str | None:
    """What in the prompt is refused, or None."""
    for text in _texts(data):
        if _BANNED.search(text):
            return "banned term"
        if any(p.search(text) for p in _PII):
            return "personal data"
    return None


class BenchGuardrail(CustomGuardrail):  # type: ignore[misc]
    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: str
    ) -> dict[str, Any]:
        found = violation(data)
        if found:
            raise HTTPException(status_code=400, detail={"error": f"blocked: {found}"})
        return data
