"""`SGLangEngine`: a `RolloutEngine` that drives SGLang servers over HTTP (SGLang 0.5.23, read in its wheel's
source; docs/sglang.md). Not run against a real SGLang on our machines: tested against a stand-in server that
plays what that source does (tests/sglang_standin.py).

    generate(requests) ──► one /generate per sample (unique rid), on the server with the fewest in flight
                           (or through the router), at most max_inflight_per_server each ──► parse_generate
    apply_manifest(v)  ──► updates.update_servers: pause ─ flush ─ [begin] ─ push ─ [end ─ version] ─ check
                           ─ continue
    attach(url)        ──► wait /health_generate (resuming a paused server) ─ check /server_info ─ sync to the
                           current version ─ check /model_info ─ register with the router ─ in rotation
    detach(url)        ──► out of rotation ─ drain (abort after a grace period) ─ unregister

A server that fails (a connection that cannot be made, a 5xx, a failed update) leaves the rotation; its
requests are retried on another server, and a health loop brings it back once it answers and holds the
current version (syncing it first if it does not, or if an update failed on it part-way). A 400 to /generate
is the request's fault (`RequestRefused`, an `InvalidRequest`: the producer dead-letters that prompt).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import structlog
import torch

from miles_stream.aio import stop_task
from miles_stream.engines.base import GenerationRequest, GenerationResult
from miles_stream.engines.http import parse_version
from miles_stream.engines.sglang.client import SGLangClient, SGLangError
from miles_stream.engines.sglang.config import SGLangConfig
from miles_stream.engines.sglang.payload import MoeLayout, generate_payload, parse_generate
from miles_stream.engines.sglang.pushes import DiskPush, DistributedPush, TensorPush
from miles_stream.engines.sglang.server_info import check_server
from miles_stream.engines.sglang.updates import WeightPush, WeightUpdateError, end_sessions, update_servers
from miles_stream.errors import MilesStreamError
from miles_stream.models.moe import moe_layer_indices
from miles_stream.weights.manifest import WeightManifest

log = structlog.get_logger(__name__)
StateLoader = Callable[[], Awaitable[Mapping[str, torch.Tensor]]]


class NoServer(MilesStreamError):
    """No SGLang server is healthy and current."""


@dataclass(eq=False)
class _Server:
    client: SGLangClient
    in_flight: int = 0
    healthy: bool = True
    draining: bool = False
    joining: bool = False  # attach() is bringing it in: the health loop leaves it alone
    paused: bool = False  # left paused by a failed update: /health_generate cannot pass until it is resumed
    dirty: bool = False  # an update failed on it after the push began: its weights may be half new
    unrouted: bool = True  # not registered with the router (or no router)
    rids: set[str] = field(default_factory=set)


class SGLangEngine:
    def __init__(
        self,
        config: SGLangConfig,
        *,
        layout: MoeLayout | None = None,
        weight_version: int = 0,
        push: WeightPush | None = None,
        client: Callable[[str], SGLangClient] | None = None,
    ) -> None:
        self.config, self.layout = config, layout
        self._version = self._initial = weight_version  # "default" on the wire: a server never updated
        self._push = push or make_push(config)
        self._client = client or (lambda url: SGLangClient(url, api_key=config.api_key,
                                                            admin_api_key=config.admin_api_key,
                                                            timeout_s=config.control_timeout_s,
                                                            connect_retries=config.connect_retries))  # fmt: skip
        self._routing = layout is not None and config.require_routed_experts  # ask for traces, need servers to send
        self._servers: dict[str, _Server] = {}
        self._router = self._client(config.router_url) if config.router_url else None
        self._ids = itertools.count()
        self._rids: dict[str, set[tuple[_Server | None, str]]] = {}  # request id -> (server, rid) in flight
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
        self._health = asyncio.create_task(self._health_loop(), name="sglang-health")

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Every sample ends (none is left running unawaited) before the first failure, if any, is raised."""
        results = await asyncio.gather(*(self._generate_one(r) for r in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, GenerationResult)]

    async def update_weights(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        raise MilesStreamError("the SGLang engine updates from a published manifest (apply_manifest)")

    async def apply_manifest(self, manifest: WeightManifest, load: StateLoader) -> None:
        """Bring every server to `manifest`'s version. Servers that fail leave the rotation (paused on their
        old or half-written weights, never resumed so); if none succeeds this raises."""
        async with self._update_lock:
            self._latest = (manifest, load)
            servers = [s for s in self._servers.values() if not (s.draining or s.joining)]  # joining: synced
            failed = await self._update(servers, manifest, load)  # by attach() right after, under this lock
            if servers and len(failed) == len(servers):
                raise failed[0]
            self._version = manifest.version

    async def abort(self, request_ids: Sequence[str]) -> None:
        targets = [(server, rid) for request_id in request_ids for server, rid in self._rids.get(request_id, ())]
        await asyncio.gather(*(self._abort(server, rid) for server, rid in targets), return_exceptions=True)

    async def pause(self) -> None:
        await asyncio.gather(*(s.client.pause(self.config.pause_mode) for s in self._in_rotation()))

    async def resume(self) -> None:
        await asyncio.gather(*(s.client.resume() for s in self._in_rotation()))

    async def close(self) -> None:
        if self._health is not None:
            await stop_task(self._health)
        await self._push.release()  # a weight group, destroyed on the servers and here
        for s in self._servers.values():
            await s.client.close()
        if self._router is not None:
            await self._router.close()

    # ---- attach / detach -------------------------------------------------------------------------------
    async def attach(self, url: str) -> None:
        """Wait until `url` answers /health_generate (resuming it if it is paused), check that its
        /server_info suits the run, sync it to the current version, check it reports that version, register it
        with the router, then send it work."""
        if url in self._servers:
            return
        client = self._client(url)
        server = _Server(client, healthy=False, joining=True)
        self._servers[url] = server
        try:
            deadline = asyncio.get_running_loop().time() + self.config.health_timeout_s
            while not await self._revive(server):
                if asyncio.get_running_loop().time() > deadline:
                    raise SGLangError(url, f"not healthy within {self.config.health_timeout_s:g} s")
                await asyncio.sleep(1.0)
            check_server(url, await client.server_info(), routing=self._routing, weight_sync=self.config.weight_sync,
                         tensor_ranks=len(self.config.tensor_devices) or 1)  # fmt: skip
            async with self._update_lock:  # not while an update is going to the others
                await self._make_current(server)
            await self._register(url)
        except BaseException as exc:
            if isinstance(exc, Exception):  # a weight group it may have joined goes before its client does
                async with self._update_lock:
                    await self._push.release()
            del self._servers[url]
            await client.close()
            raise
        server.joining = False
        await self._set_healthy(server, True)
        log.info("sglang_attached", url=url, version=self._version, servers=len(self._servers))

    async def detach(self, url: str, *, grace_s: float = 60.0) -> None:
        """Send `url` no new work, let what it has finish (aborted after `grace_s`: the aborts come back as
        partials to resume elsewhere), unregister it from the router, forget it."""
        server = self._servers.get(url)
        if server is None:
            return
        server.draining = True
        if self._router is not None:
            await self._unregister(url)
        try:  # through the router our count of its requests is approximate (the router chose): waiting on
            await asyncio.wait_for(self._drained(server), grace_s)  # it only bounds how long we wait
        except TimeoutError:
            with contextlib.suppress(SGLangError):  # what it still runs comes back as partials, resumed elsewhere
                await server.client.abort(None)
            if self._router is None:
                await self._drained(server)
        async with self._update_lock:  # a weight group has a fixed membership: destroyed while it can still be
            await self._push.release()  # destroyed on this server too; the next update makes a new one
        del self._servers[url]
        await server.client.close()
        log.info("sglang_detached", url=url, servers=len(self._servers))

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
        """The server in rotation with the fewest requests in flight and room for one more, counted as taken
        (through the router, the router chooses: this only bounds the total), waiting while every one is
        busy; `NoServer` when none has been in rotation for health_timeout_s."""
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
                    raise NoServer("no SGLang server is in rotation (all failed, detached or not yet attached)")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)

    async def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        rid = f"{request.request_id}/{next(self._ids)}"
        payload = generate_payload(request, rid, routing=self._routing)
        attempts = max(1, len(self._servers))
        for attempt in range(attempts):
            server = await self._pick()
            entry = (None if self._router is not None else server, rid)
            self._rids.setdefault(request.request_id, set()).add(entry)
            server.rids.add(rid)
            try:
                client = self._router or server.client
                body = await client.generate(payload, timeout_s=self.config.request_timeout_s)
                return parse_generate(body, request, default_version=self._initial, layout=self.layout)
            except SGLangError as exc:
                if (exc.status is not None and exc.status < 500) or attempt == attempts - 1:
                    raise  # refused (RequestRefused on a 400): another server would refuse it too
                log.warning("sglang_request_failed", url=exc.url, rid=rid, error=str(exc))
                if self._router is None:
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

    async def _abort(self, server: _Server | None, rid: str) -> None:
        """Abort one rid; through the router it is unknown which server has it, so every one is told."""
        targets = [server] if server is not None else list(self._servers.values())
        await asyncio.gather(*(s.client.abort(rid) for s in targets), return_exceptions=True)

    async def _update(
        self, servers: list[_Server], manifest: WeightManifest, load: StateLoader
    ) -> list[WeightUpdateError]:
        reported = await asyncio.gather(*(s.client.model_info() for s in servers), return_exceptions=True)
        servers = [s for s, info in zip(servers, reported, strict=True)  # those on it already are skipped, unless
                   if s.dirty or not (isinstance(info, dict)  # an update failed on them part-way
                                      and info.get("weight_version") == str(manifest.version))]  # fmt: skip
        if not servers:
            return []
        state = await load() if self._push.needs_state() else None
        failed = await update_servers([s.client for s in servers], manifest.version, manifest, state, self._push,
                                      pause_mode=self.config.pause_mode,
                                      step_timeout_s=self.config.update_timeout_s)  # fmt: skip
        by_url = {e.url: e for e in failed}
        for server in servers:
            if (error := by_url.get(server.client.url)) is None:
                server.paused = server.dirty = False
                continue
            log.error("sglang_update_failed", url=error.url, version=manifest.version, step=error.step,
                      dirty=error.dirty, error=str(error))  # fmt: skip
            server.paused, server.dirty = True, server.dirty or error.dirty
            await self._set_healthy(server, False)
            if self._router is not None and not server.unrouted:  # it waits paused: no work from the router
                await self._unregister(server.client.url)
        return failed

    async def _make_current(self, server: _Server) -> None:
        """Sync `server` to the current version unless it reports it already (and no update failed on it
        part-way: SGLang loads each bucket as it comes, so such a server's weights may be half new); then check
        what it reports."""
        info = await server.client.model_info()
        if server.dirty or parse_version(info.get("weight_version"), self._initial) != self._version:
            latest = self._latest
            if latest is None or latest[0].version != self._version:
                if server.dirty:  # every server failed that version: no whole version to give it yet
                    raise SGLangError(server.client.url, "an update failed on it part-way and no server holds a "
                                                         "newer whole version yet")  # fmt: skip
                log.info("sglang_version_adopted", url=server.client.url, reported=info.get("weight_version"))
                return  # before the first version is applied: the producer applies it to all next
            manifest, load = latest
            failed: list[WeightUpdateError] = await self._update([server], manifest, load)
            if failed:
                raise failed[0]
            info = await server.client.model_info()
        reported = parse_version(info.get("weight_version"), self._initial)
        if reported != self._version:
            raise SGLangError(server.client.url, f"reports weight_version {reported} after sync, not {self._version}")

    async def _revive(self, server: _Server) -> bool:
        """True once `server` can be made current. /health_generate is a one-token generate, which waits on
        the pause lock (sglang/srt/entrypoints/http_server.py:721-799, managers/tokenizer_manager.py:938-939):
        a paused server answers 503 after 20 s, every time. So a server we left paused, or one that fails that
        probe while answering /model_info (which does not wait on the pause), first has any weight-update
        session ended; one whose weights may be half new stays paused (`_make_current` syncs it whole and
        resumes it), any other is told to continue and probed again. It gets no work until it is current."""
        client = server.client
        if not server.paused and await client.health_generate(timeout_s=self.config.health_probe_s):
            return True
        try:
            await client.model_info()
            await end_sessions([client], self.config.control_timeout_s)
            if server.dirty:
                return True
            await client.resume()
        except SGLangError:
            return False
        if server.paused:
            log.info("sglang_resumed_for_resync", url=client.url, dirty=server.dirty)
        server.paused = False
        return await client.health_generate(timeout_s=self.config.health_probe_s)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.recover()

    async def recover(self) -> None:
        """One pass of the health loop: each server out of rotation (not leaving, not joining) that answers
        again is made current and put back."""
        for server in [s for s in self._servers.values() if not (s.healthy or s.draining or s.joining)]:
            try:
                if not await self._revive(server):
                    continue
                async with self._update_lock:
                    await self._make_current(server)
                if server.unrouted:
                    await self._register(server.client.url)
                await self._set_healthy(server, True)
                log.info("sglang_back_in_rotation", url=server.client.url, version=self._version)
            except (SGLangError, WeightUpdateError) as exc:
                log.warning("sglang_still_out", url=server.client.url, error=str(exc))

    async def _register(self, url: str) -> None:
        if self._router is not None:
            await self._router.request("POST", "/workers", {"url": url, "worker_type": "regular"})
            self._servers[url].unrouted = False

    async def _unregister(self, url: str) -> None:
        assert self._router is not None
        if (server := self._servers.get(url)) is not None:
            server.unrouted = True
        try:
            listed = await self._router.request("GET", "/workers")
            ids = [w.get("id") for w in (listed or {}).get("workers", []) if w.get("url") == url]
            for worker_id in ids or [quote(url, safe="")]:  # older routers take the escaped url as the id
                await self._router.request("DELETE", f"/workers/{worker_id}")
        except SGLangError as exc:
            log.warning("router_unregister_failed", url=url, error=str(exc))


def make_push(config: SGLangConfig) -> WeightPush:
    if config.weight_sync == "disk":
        return DiskPush(verify=config.verify_disk_weights, timeout_s=config.update_timeout_s)
    if config.weight_sync == "distributed":
        return DistributedPush(master_address=config.sync_master_address, master_port=config.sync_master_port,
                               port_range=config.sync_port_range, backend=config.sync_backend,
                               device=config.sync_device, bucket_bytes=config.bucket_mb << 20,
                               timeout_s=config.update_timeout_s)  # fmt: skip
    return TensorPush(devices=config.tensor_devices or (config.sync_device,), bucket_bytes=config.bucket_mb << 20,
                      timeout_s=config.update_timeout_s)  # fmt: skip


def moe_layout(model_dir: str) -> MoeLayout | None:
    """The routing layout of the model in `model_dir` (None for a dense model): which layers have a router,
    found by building the model's skeleton on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
    if not experts:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    layers = moe_layer_indices(model)
    return MoeLayout(num_layers=int(config.num_hidden_layers), top_k=int(config.num_experts_per_tok),
                     num_experts=experts, moe_layers=tuple(layers))  # fmt: skip
