"""An HTTP client for one SGLang server (or SGLang's router): one method per endpoint we use.

Every call has a timeout, so a hung server or a hung collective becomes a `SGLangError`, not a hang. A call
is retried with backoff only when the connection could not be made (the request never reached the server);
anything after that is the caller's to judge, since `/generate` and the weight calls are not idempotent.
Errors: a non-2xx reply, or `success: false` in a weight call's reply, raises `SGLangError` with the server's
message; a 400 to `/generate` is `RequestRefused` (an `InvalidRequest`: the prompt, not the server).

Keys (SGLang 0.5.23, sglang/srt/utils/auth.py:98-151): `/generate`, `/model_info` and `/server_info` are NORMAL
routes: with `--api-key` set they take that key and no other (auth.py:148-149). The control and weight routes
(pause, continue, flush, abort, every weight route) are ADMIN_OPTIONAL (http_server.py:1026-1845): the admin
key when the server has `--admin-api-key` (the api key is then refused), else the api key (auth.py:133-143).
`/health*` needs none (auth.py:101-106).
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from miles_stream.engines.http import ServerError, error_message, reply_body
from miles_stream.errors import InvalidRequest


class SGLangError(ServerError):
    pass


class NotSupported(SGLangError):
    """The server has no such endpoint (404): an older SGLang."""


class Unauthorized(SGLangError):
    """401 / 403: the key we sent is not the one this route takes (a configuration error, not a dead server)."""


class RequestRefused(SGLangError, InvalidRequest):
    """`/generate` answered 400: this request cannot run there (prompt longer than the context, prompt +
    max_new_tokens over it, a sampling value out of range). SGLang raises ValueError for each and answers 400
    (tokenizer_manager.py:1337-1376, sampling_params.py:252-312, http_server.py:986-990 and 2246-2250)."""


class SGLangClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str = "",
        admin_api_key: str = "",
        timeout_s: float = 60.0,
        connect_retries: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._keys = {False: _bearer(api_key), True: _bearer(admin_api_key or api_key)}  # admin route -> header
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, limits=limits, transport=transport)
        self.connect_retries = connect_retries

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, json: Any = None, *, timeout_s: float | None = None,
                      admin: bool = False) -> Any:  # fmt: skip
        """The decoded JSON reply (None for an empty body, the text for a non-JSON one). `admin`: a control or
        weight route (the admin key goes with it)."""
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
                    reply = await self._http.request(method, path, json=json, timeout=timeout,
                                                     headers=self._keys[admin])  # fmt: skip
        except httpx.TimeoutException as exc:
            raise SGLangError(self.url, f"{method} {path} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise SGLangError(self.url, f"{method} {path} failed: {exc!r}") from exc
        body = reply_body(reply)
        if reply.status_code == 404:
            raise NotSupported(self.url, f"{method} {path}: not found (404)", 404)
        if reply.status_code in (401, 403):
            key = "rollout.sglang.admin_api_key (or api_key)" if admin else "rollout.sglang.api_key"
            message = (
                f"{method} {path}: HTTP {reply.status_code} {error_message(body)}: check {key} against the server's"
            )
            raise Unauthorized(self.url, f"{message} --api-key / --admin-api-key", reply.status_code)
        if reply.status_code >= 400:
            raise SGLangError(self.url, f"{method} {path}: HTTP {reply.status_code}: {error_message(body)}",
                              reply.status_code)  # fmt: skip
        return body

    async def call(self, path: str, json: Any = None, *, timeout_s: float | None = None) -> Any:
        """POST to a control or weight endpoint; a reply with `success: false` is an error."""
        body = await self.request("POST", path, {} if json is None else json, timeout_s=timeout_s, admin=True)
        if isinstance(body, dict) and body.get("success") is False:
            raise SGLangError(self.url, f"POST {path}: {body.get('message') or 'success: false'}")
        return body

    # ---- generation ------------------------------------------------------------------------------------
    async def generate(self, payload: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        try:
            return await self.request("POST", "/generate", payload, timeout_s=timeout_s)
        except SGLangError as exc:
            if exc.status == 400:
                raise RequestRefused(exc.url, f"refused the request: {str(exc).split(': HTTP 400: ', 1)[-1]}",
                                     400) from exc  # fmt: skip
            raise

    async def abort(self, rid: str | None = None) -> None:
        await self.request("POST", "/abort_request", {"rid": rid} if rid else {"abort_all": True}, admin=True)

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
        await self.request("POST", "/flush_cache", timeout_s=timeout_s, admin=True)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}
