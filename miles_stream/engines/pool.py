"""`PooledEngine`: what the engines over HTTP servers (sglang/, vllm/) do alike with the servers they drive.
Each engine subclasses it and says how its servers differ: how to reach one, probe its health, read and set
its weight version, what it must be to join, and what its weight push holds.

    attach(url)    ──► in the pool, joining ─ probe until healthy (health_timeout_s) ─ _admit (the engine's
                       checks) ─ sync to the current version ─ _route ─ in rotation
    detach(url)    ──► out of rotation ─ _unroute ─ drain (its requests aborted after a grace period: they
                       come back as partials) ─ _left ─ forgotten
    recover()      ──► each server out of rotation (not joining or leaving) that probes healthy is made current
                       and put back: the health loop does this every health_interval_s
    generate(...)  ──► one request per sample (or per batch of identical samples, where the engine batches) on
                       the server in rotation with the fewest samples in flight, at most max_inflight_per_server
                       each (through a router, if the engine has one: it chooses)
    apply_manifest ──► every server not joining or leaving to the version; raised only if every one failed

A server that fails a request (a connection that cannot be made, a 5xx) or an update leaves the rotation, and
its requests are retried on another; one that reports the current version is not updated again unless an
update failed on it part-way (`dirty`). What waits on what: `_pick` waits on `_changed` (a server back in
rotation or a request done), bounded by health_timeout_s; updates, attaches and recoveries take turns under
`_update_lock`, so a server is never synced by two at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import structlog
import torch

from miles_stream.aio import stop_task
from miles_stream.engines.base import GenerationRequest, GenerationResult
from miles_stream.engines.http import ServerError, WeightUpdateError, parse_version
from miles_stream.errors import MilesStreamError
from miles_stream.weights.manifest import WeightManifest

log = structlog.get_logger(__name__)
StateLoader = Callable[[], Awaitable[Mapping[str, torch.Tensor]]]


class NoServer(MilesStreamError):
    """No server is healthy and current."""


class PoolConfig(Protocol):
    """What the pool reads of an engine's config section (`rollout.vllm`, `rollout.sglang`)."""

    @property
    def urls(self) -> tuple[str, ...]: ...
    @property
    def max_inflight_per_server(self) -> int: ...
    @property
    def request_timeout_s(self) -> float: ...
    @property
    def control_timeout_s(self) -> float: ...
    @property
    def health_timeout_s(self) -> float: ...
    @property
    def health_interval_s(self) -> float: ...


T = TypeVar("T")  # the engine's client for one server


@dataclass(eq=False)
class Server(Generic[T]):
    client: T
    in_flight: int = 0
    healthy: bool = False
    draining: bool = False  # detach() is taking it out
    joining: bool = True  # attach() is bringing it in: updates and the health loop leave it alone
    paused: bool = False  # left paused by an update that failed on it (never resumed on half an update)
    dirty: bool = False  # an update failed on it after the push began: synced whole whatever it reports
    rids: set[str] = field(default_factory=set)


S = TypeVar("S", bound=Server[Any])
C = TypeVar("C", bound=PoolConfig)


class PooledEngine(ABC, Generic[S, C]):
    name: ClassVar[str]  # in log events and the health task's name: "vllm"
    label: ClassVar[str]  # in messages: "vLLM"
    error: ClassVar[type[ServerError]]  # what the engine's client raises
    extra_attempts: ClassVar[int] = 0  # a request is tried on max(1, servers + this) servers in turn

    def __init__(self, config: C, *, weight_version: int, pause_mode: str) -> None:
        """`pause_mode`: what `pause()` asks of each server."""
        self.config, self._pause_mode = config, pause_mode
        self._version = self._initial = weight_version  # "default" on the wire: a server never updated
        self._servers: dict[str, S] = {}
        self._router: Any = None  # a client for a router in front of the servers, if the engine has one
        self._ids = itertools.count()
        self._rids: dict[str, set[tuple[S | None, str]]] = {}  # request id -> (server, rid) in flight
        self._changed = asyncio.Condition()
        self._latest: tuple[WeightManifest, StateLoader] | None = None
        self._update_lock = asyncio.Lock()
        self._health: asyncio.Task[None] | None = None

    # ---- what each engine says of its servers -------------------------------------------------------------
    @abstractmethod
    def _new_server(self, url: str) -> S:
        """A record for `url`, with its client."""

    @abstractmethod
    async def _probe(self, server: S) -> bool:
        """Whether `server` answers and can be made current."""

    async def _admit(self, server: S) -> None:
        """Raise if `server` (healthy, at attach) does not suit the run."""

    @abstractmethod
    async def _wire_version(self, server: S) -> Any:
        """The weight version `server` reports, as on the wire."""

    @abstractmethod
    async def _push_update(
        self, servers: list[S], manifest: WeightManifest, load: StateLoader
    ) -> list[WeightUpdateError]:
        """Take `servers` through the update to `manifest`; those that failed."""

    async def _ready(self, server: S) -> None:
        """The last step before `server`, synced to the current version, gets work."""

    async def _route(self, server: S) -> None:
        """`server` is current: the router may send it work."""

    async def _unroute(self, server: S) -> None:
        """`server` leaves the rotation (detached, or an update failed on it): the router sends it no more."""

    @abstractmethod
    async def _abort_server(self, server: S) -> None:
        """End what `server` still runs (the samples return as partials)."""

    async def _left(self) -> None:
        """A server left or failed to join (what the weight push holds for the old membership goes)."""

    async def _close_push(self) -> None:
        """The engine closes: its weight push lets go of the servers."""

    @abstractmethod
    async def _send(self, server: S, request: GenerationRequest, rid: str) -> GenerationResult:
        """Generate `request` under the id `rid` on `server` (or the router)."""

    def _batches(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Which requests go to a server as one (indices into `requests`, each exactly once): each alone here;
        an engine whose server samples n at once groups identical ones and overrides `_send_batch`."""
        return [[i] for i in range(len(requests))]

    async def _send_batch(self, server: S, batch: list[GenerationRequest], rid: str) -> list[GenerationResult]:
        """Generate `batch` (one of `_batches`) under the id `rid`: one result per request, in order."""
        assert len(batch) == 1, "an engine that batches requests overrides _send_batch"
        return [await self._send(server, batch[0], rid)]

    # ---- RolloutEngine ----------------------------------------------------------------------------------
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
        self._health = asyncio.create_task(self._health_loop(), name=f"{self.name}-health")

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Every sample ends (none is left running unawaited) before the first failure, if any, is raised.
        The engine may send several samples as one server request (`_batches`); the results come back one per
        request, in order."""
        batches = self._batches(requests)
        results = await asyncio.gather(*(self._generate_batch([requests[i] for i in b]) for b in batches),
                                       return_exceptions=True)  # fmt: skip
        for result in results:
            if isinstance(result, BaseException):
                raise result
        out: list[GenerationResult | None] = [None] * len(requests)
        for batch, got in zip(batches, results, strict=True):
            assert isinstance(got, list) and len(got) == len(batch)
            for i, sample in zip(batch, got, strict=True):
                out[i] = sample
        return [r for r in out if r is not None]

    async def update_weights(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        raise MilesStreamError(f"the {self.label} engine updates from a published manifest (apply_manifest)")

    async def apply_manifest(self, manifest: WeightManifest, load: StateLoader) -> None:
        """Bring every server to `manifest`'s version. Servers that fail leave the rotation (left paused, never
        resumed on half an update); if none succeeds this raises."""
        async with self._update_lock:
            self._latest = (manifest, load)
            servers = [s for s in self._servers.values() if not (s.draining or s.joining)]  # joining: synced
            failed = await self._update(servers, manifest, load)  # by attach() right after, under this lock
            if servers and len(failed) == len(servers):
                raise failed[0]
            self._version = manifest.version

    async def pause(self) -> None:
        await asyncio.gather(*(s.client.pause(self._pause_mode) for s in self._in_rotation()))

    async def resume(self) -> None:
        await asyncio.gather(*(s.client.resume() for s in self._in_rotation()))

    async def close(self) -> None:
        if self._health is not None:
            await stop_task(self._health)
        await self._close_push()
        for s in self._servers.values():
            await s.client.close()
        if self._router is not None:
            await self._router.close()

    # ---- attach / detach / recover ----------------------------------------------------------------------
    async def attach(self, url: str) -> None:
        """Wait until `url` probes healthy, check that it suits the run, sync it to the current version and
        check it reports that version, let the router route to it, then send it work."""
        if url in self._servers:
            return
        server = self._servers[url] = self._new_server(url)
        try:
            deadline = asyncio.get_running_loop().time() + self.config.health_timeout_s
            while not await self._probe(server):
                if asyncio.get_running_loop().time() > deadline:
                    raise self.error(url, f"not healthy within {self.config.health_timeout_s:g} s")
                await asyncio.sleep(1.0)
            await self._admit(server)
            async with self._update_lock:  # not while an update is going to the others
                await self._make_current(server)
            await self._route(server)
        except BaseException as exc:
            if isinstance(exc, Exception):  # a weight group it may have joined goes before its client does
                await self._left()
            del self._servers[url]
            await server.client.close()
            raise
        server.joining = False
        await self._set_healthy(server, True)
        log.info(f"{self.name}_attached", url=url, version=self._version, servers=len(self._servers))

    async def detach(self, url: str, *, grace_s: float = 60.0) -> None:
        """Send `url` no new work, let what it has finish (aborted after `grace_s`: the aborts come back as
        partials to resume elsewhere), forget it."""
        server = self._servers.get(url)
        if server is None:
            return
        server.draining = True
        await self._unroute(server)
        try:  # through a router our count of its requests is approximate (the router chose): waiting on it
            await asyncio.wait_for(self._drained(server), grace_s)  # only bounds how long we wait
        except TimeoutError:
            with contextlib.suppress(self.error):
                await self._abort_server(server)
            if self._router is None:
                await asyncio.wait_for(self._drained(server), self.config.control_timeout_s)
        await self._left()
        del self._servers[url]
        await server.client.close()
        log.info(f"{self.name}_detached", url=url, servers=len(self._servers))

    async def recover(self) -> None:
        """One pass of the health loop: each server out of rotation (not leaving, not joining) that answers
        again is made current and put back."""
        for server in [s for s in self._servers.values() if not (s.healthy or s.draining or s.joining)]:
            try:
                if not await self._probe(server):
                    continue
                async with self._update_lock:
                    await self._make_current(server)
                await self._route(server)
                await self._set_healthy(server, True)
                log.info(f"{self.name}_back_in_rotation", url=server.client.url, version=self._version)
            except (ServerError, WeightUpdateError) as exc:
                log.warning(f"{self.name}_still_out", url=server.client.url, error=str(exc))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.recover()

    # ---- rotation ---------------------------------------------------------------------------------------
    def _in_rotation(self) -> list[S]:
        return [s for s in self._servers.values() if s.healthy and not s.draining]

    async def _set_healthy(self, server: S, healthy: bool) -> None:
        async with self._changed:
            server.healthy = healthy
            self._changed.notify_all()

    async def _drained(self, server: S) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: server.in_flight == 0)

    async def _pick(self, samples: int = 1) -> S:
        """The server in rotation with the fewest samples in flight and room for `samples` more (at most
        max_inflight_per_server: `_batches` keeps a batch within it), counted as taken (through a router, the
        router chooses: this only bounds the total), waiting while every one is busy; `NoServer` when none has
        been in rotation for health_timeout_s."""
        limit = self.config.max_inflight_per_server - samples + 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.health_timeout_s
        async with self._changed:
            while True:
                ready = self._in_rotation()
                if ready and (best := min(ready, key=lambda s: s.in_flight)).in_flight < limit:
                    best.in_flight += samples
                    return best
                if ready:
                    deadline = loop.time() + self.config.health_timeout_s
                elif loop.time() > deadline:
                    raise NoServer(f"no {self.label} server is in rotation (all failed, detached or not yet "
                                   "attached)")  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)

    async def _generate_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """`batch` as one server request (one id for all: an abort of any of their request ids ends it)."""
        rid = f"{batch[0].request_id}/{next(self._ids)}"
        request_ids = {r.request_id for r in batch}
        attempts = max(1, len(self._servers) + self.extra_attempts)
        for attempt in range(attempts):
            server = await self._pick(len(batch))
            entry = (None if self._router is not None else server, rid)
            for request_id in request_ids:
                self._rids.setdefault(request_id, set()).add(entry)
            server.rids.add(rid)
            try:
                return await self._send_batch(server, batch, rid)
            except ServerError as exc:
                if (exc.status is not None and exc.status < 500) or attempt == attempts - 1:
                    raise  # refused: another server would refuse it too
                log.warning(f"{self.name}_request_failed", url=exc.url, rid=rid, error=str(exc))
                if self._router is None:
                    await self._set_healthy(server, False)
            finally:
                server.rids.discard(rid)
                for request_id in request_ids:
                    in_flight = self._rids.get(request_id)
                    if in_flight is not None:
                        in_flight.discard(entry)
                        if not in_flight:
                            del self._rids[request_id]
                async with self._changed:
                    server.in_flight -= len(batch)
                    self._changed.notify_all()
        raise AssertionError("unreachable")

    # ---- weights ----------------------------------------------------------------------------------------
    async def _update(self, servers: list[S], manifest: WeightManifest, load: StateLoader) -> list[WeightUpdateError]:
        reported = await asyncio.gather(*(self._wire_version(s) for s in servers), return_exceptions=True)
        servers = [s for s, v in zip(servers, reported, strict=True)  # those on it already are skipped, unless
                   if s.dirty or v != str(manifest.version)]  # an update failed on them part-way  # fmt: skip
        if not servers:
            return []
        failed = await self._push_update(servers, manifest, load)
        by_url = {e.url: e for e in failed}
        for server in servers:
            if (error := by_url.get(server.client.url)) is None:
                server.paused = server.dirty = False
                continue
            log.error(f"{self.name}_update_failed", url=error.url, version=manifest.version, step=error.step,
                      dirty=error.dirty, error=str(error))  # fmt: skip
            server.paused, server.dirty = True, server.dirty or error.dirty
            await self._set_healthy(server, False)
            await self._unroute(server)  # it waits paused: no work from the router
        return failed

    async def _make_current(self, server: S) -> None:
        """Sync `server` to the current version unless it reports it already (and no update failed on it
        part-way: its weights may be half new); then check what it reports."""
        raw = await self._wire_version(server)
        if server.dirty or parse_version(raw, self._initial) != self._version:
            latest = self._latest
            if latest is None or latest[0].version != self._version:
                if server.dirty:  # every server failed that version: no whole version to give it yet
                    raise self.error(server.client.url, "an update failed on it part-way and no server holds a "
                                                        "newer whole version yet")  # fmt: skip
                log.info(f"{self.name}_version_adopted", url=server.client.url, reported=raw)
                return  # before the first version is applied: the producer applies it to all next
            manifest, load = latest
            failed = await self._update([server], manifest, load)
            if failed:
                raise failed[0]
            raw = await self._wire_version(server)
        reported = parse_version(raw, self._initial)
        if reported != self._version:
            raise self.error(server.client.url, f"reports weight_version {reported} after sync, not {self._version}")
        await self._ready(server)
