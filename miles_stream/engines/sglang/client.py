"""An HTTP client for one SGLang server (or SGLang's router): one method per endpoint we use.

Every call has a timeout, so a hung server or a hung collective becomes a `SGLangError`, not a hang. A call
is retried with backoff only when the connection could not be made (the request never reached the server);
anything after that is the caller's to judge, since `/generate` and the weight calls are not idempotent.
Errors: a non-2xx reply, or `success: false` in a weight call's reply, raises `SGLangError` with the server's
message. Endpoints and fields: `../shared/reference/sglang_api.md` (SGLang 0.5.2x).
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from miles_stream.errors import MilesStreamError


class SGLangError(MilesStreamError):
    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {message}")
        self.url, self.status = url, status


class NotSupported(SGLangError):
    """The server has no such endpoint (404): an older SGLang."""


class SGLangClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str = "",
        timeout_s: float = 60.0,
        connect_retries: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s, limits=limits,
                                       transport=transport)  # fmt: skip
        self.connect_retries = connect_retries

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, json: Any = None, *, timeout_s: float | None = None) -> Any:
        """The decoded JSON reply (None for an empty body, the text for a non-JSON one)."""
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((httpx.ConnectError, httpx.ConnectTimeout)),
            stop=stop_after_attempt(self.connect_retries + 1),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    reply = await self._http.request(method, path, json=json, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise SGLangError(self.url, f"{method} {path} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise SGLangError(self.url, f"{method} {path} failed: {exc!r}") from exc
        body = _body(reply)
        if reply.status_code == 404:
            raise NotSupported(self.url, f"{method} {path}: not found (404)", 404)
        if reply.status_code >= 400:
            raise SGLangError(self.url, f"{method} {path}: HTTP {reply.status_code}: {_message(body)}",
                              reply.status_code)  # fmt: skip
        return body

    async def call(self, path: str, json: Any = None, *, timeout_s: float | None = None) -> Any:
        """POST to a control or weight endpoint; a reply with `success: false` is an error."""
        body = await self.request("POST", path, {} if json is None else json, timeout_s=timeout_s)
        if isinstance(body, dict) and body.get("success") is False:
            raise SGLangError(self.url, f"POST {path}: {body.get('message') or 'success: false'}")
        return body

    # ---- generation ------------------------------------------------------------------------------------
    async def generate(self, payload: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        return await self.request("POST", "/generate", payload, timeout_s=timeout_s)

    async def abort(self, rid: str | None = None) -> None:
        await self.request("POST", "/abort_request", {"rid": rid} if rid else {"abort_all": True})

    # ---- state -----------------------------------------------------------------------------------------
    async def health_generate(self, *, timeout_s: float = 30.0) -> bool:
        try:
            await self.request("GET", "/health_generate", timeout_s=timeout_s)
        except SGLangError:
            return False
        return True

    async def model_info(self) -> dict[str, Any]:
        body = await self.request("GET", "/model_info")
        return body if isinstance(body, dict) else {}

    async def server_info(self) -> dict[str, Any]:
        body = await self.request("GET", "/server_info")
        return body if isinstance(body, dict) else {}

    async def pause(self, mode: str) -> None:
        await self.call("/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self.call("/continue_generation", {})

    async def flush_cache(self, *, timeout_s: float | None = None) -> None:
        await self.request("POST", "/flush_cache", timeout_s=timeout_s)


def _body(reply: httpx.Response) -> Any:
    if not reply.content:
        return None
    try:
        return reply.json()
    except ValueError:
        return reply.text


def _message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error or body.get("message") or body)
    return str(body)[:500]
