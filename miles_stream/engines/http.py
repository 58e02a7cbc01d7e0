"""What the engines over HTTP servers (sglang/, vllm/) read the same way: a reply's body, its error message,
and the weight version a server reports. Each engine's own quirks stay in its package."""

from __future__ import annotations

from typing import Any

import httpx

from miles_stream.errors import MilesStreamError


class ResponseError(MilesStreamError):
    """A reply that does not say what the server's source says it does (a server bug or another version)."""


def reply_body(reply: httpx.Response) -> Any:
    """The reply's JSON, its text if it is not JSON, None if empty."""
    if not reply.content:
        return None
    try:
        return reply.json()
    except ValueError:
        return reply.text


def error_message(body: Any) -> str:
    """The reason an error reply gives: OpenAI-style {"error": {"message"}}, FastAPI's "detail", or "message"."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error or body.get("detail") or body.get("message") or body)
    return str(body)[:500]


def parse_version(raw: Any, default_version: int) -> int:
    """A wire version: "default" (never set) is the engine's starting version; others are ours."""
    if raw in (None, "default"):
        return default_version
    try:
        return int(raw)
    except (TypeError, ValueError) as exc:
        raise ResponseError(f"weight version {raw!r} is not one of ours (integers)") from exc
