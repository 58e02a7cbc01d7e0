"""What the engines over HTTP servers (sglang/, vllm/) read the same way: a reply's body, its error message,
the weight version a server reports, and their errors (a call that failed; a weight update that failed on one
server). Each engine's own quirks stay in its package; what they do alike with their servers is in pool.py."""

from __future__ import annotations

from typing import Any

import httpx

from miles_stream.errors import MilesStreamError


class ResponseError(MilesStreamError):
    """A reply that does not say what the server's source says it does (a server bug or another version)."""


class ServerError(MilesStreamError):
    """A call to one server failed: `status` is the HTTP status of an error reply, None if none came."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {message}")
        self.url, self.status = url, status


class WeightUpdateError(MilesStreamError):
    """A weight update failed on one server at `step`; `dirty`: the push had reached it, so its weights may be
    half new whatever version it reports."""

    def __init__(self, url: str, version: int, step: str, cause: BaseException, *, dirty: bool = False) -> None:
        super().__init__(f"{url}: weight update to version {version} failed at {step}: {cause}")
        self.url, self.version, self.step, self.dirty = url, version, step, dirty


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
