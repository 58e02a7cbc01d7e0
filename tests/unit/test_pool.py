"""`engines/pool.PooledEngine` on in-memory servers: what both HTTP engines rely on, without HTTP. A server being
attached is left alone by updates and the health loop and synced to the version current when it joins; requests
go to the server with the fewest in flight; a server that fails a request leaves the rotation, the request is
retried elsewhere, and the health loop brings it back current; a detached server is drained first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from miles_stream.engines.base import GenerationRequest, GenerationResult
from miles_stream.engines.http import ServerError, WeightUpdateError, parse_version
from miles_stream.engines.pool import PooledEngine, Server, StateLoader
from miles_stream.schema import make_spans
from miles_stream.weights.manifest import WeightManifest


class FakeError(ServerError):
    pass


@dataclass
class FakeClient:
    url: str
    version: str = "default"
    healthy: asyncio.Event = field(default_factory=asyncio.Event)
    fail_next: int = 0  # requests that fail with a 503
    hold: asyncio.Event | None = None  # requests wait on it
    served: list[str] = field(default_factory=list)  # request ids, with the version they were served under
    pushed: list[int] = field(default_factory=list)
    closed: bool = False

    async def generate(self, rid: str) -> str:
        if self.fail_next:
            self.fail_next -= 1
            raise FakeError(self.url, "HTTP 503", 503)
        if self.hold is not None:
            await self.hold.wait()
        self.served.append(f"{rid}@{self.version}")
        return self.version

    async def pause(self, mode: str) -> None: ...

    async def resume(self) -> None: ...

    async def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class Config:
    urls: tuple[str, ...] = ()
    max_inflight_per_server: int = 4
    request_timeout_s: float = 5.0
    control_timeout_s: float = 5.0
    health_timeout_s: float = 5.0
    health_interval_s: float = 3600.0  # recover() is called by hand


class FakeEngine(PooledEngine[Server[FakeClient], Config]):
    name, label, error = "fake", "Fake", FakeError

    def __init__(self, clients: dict[str, FakeClient]) -> None:
        super().__init__(Config(urls=tuple(clients)), weight_version=0, pause_mode="keep")
        self.clients = clients

    async def abort(self, request_ids: list[str]) -> None: ...

    def _new_server(self, url: str) -> Server[FakeClient]:
        return Server(self.clients[url])

    async def _probe(self, server: Server[FakeClient]) -> bool:
        await server.client.healthy.wait()
        return True

    async def _wire_version(self, server: Server[FakeClient]) -> Any:
        return server.client.version

    async def _push_update(
        self, servers: list[Server[FakeClient]], manifest: WeightManifest, load: StateLoader
    ) -> list[WeightUpdateError]:
        for s in servers:
            s.client.pushed.append(manifest.version)
            s.client.version = str(manifest.version)
        return []

    async def _abort_server(self, server: Server[FakeClient]) -> None: ...

    async def _send(self, server: Server[FakeClient], request: GenerationRequest, rid: str) -> GenerationResult:
        version = parse_version(await server.client.generate(rid), self._initial)
        return GenerationResult(request_id=request.request_id, response_ids=np.zeros(1, np.int32),
                                logprobs=np.zeros(1, np.float32), finish_reason="stop",
                                version_spans=make_spans([(0, version)]))  # fmt: skip


def manifest(version: int) -> WeightManifest:
    return WeightManifest(version=version, transport="file", location="", tensors=(), chunks=())


async def no_state() -> dict[str, Any]:
    raise AssertionError("not loaded")


def requests(n: int, prefix: str = "r") -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"{prefix}{i}", prompt_ids=[1]) for i in range(n)]


async def until(condition: Callable[[], object], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0)


def clients(*urls: str) -> dict[str, FakeClient]:
    out = {u: FakeClient(u) for u in urls}
    for c in out.values():
        c.healthy.set()
    return out


@pytest.mark.timeout(10)
async def test_a_joining_server_is_left_to_attach_and_synced_to_the_version_current_when_it_joins() -> None:
    fakes = clients("a", "b")
    fakes["b"].healthy.clear()  # b is still starting: attach waits on its probe
    engine = FakeEngine(fakes)
    await engine.attach("a")
    await engine.apply_manifest(manifest(1), no_state)
    joining = asyncio.create_task(engine.attach("b"))
    await until(lambda: "b" in engine.servers, "b to join")
    await engine.apply_manifest(manifest(2), no_state)  # b is not touched while it joins
    await engine.recover()  # nor by the health loop
    assert fakes["b"].pushed == [] and engine.servers == {"a": True, "b": False}
    fakes["b"].healthy.set()
    await joining
    assert fakes["b"].pushed == [2] and engine.servers == {"a": True, "b": True}
    results = await engine.generate(requests(8))
    assert {r.version_spans.tolist()[0][1] for r in results} == {2}
    await engine.close()


@pytest.mark.timeout(10)
async def test_requests_go_to_the_server_with_the_fewest_in_flight_up_to_the_limit() -> None:
    fakes = clients("a", "b")
    hold = asyncio.Event()
    for c in fakes.values():
        c.hold = hold
    engine = FakeEngine(fakes)
    await engine.start()
    batch = asyncio.create_task(engine.generate(requests(10)))  # 2 servers x 4: two wait for room
    await until(lambda: sum(s.in_flight for s in engine._servers.values()) == 8, "both servers full")
    assert [s.in_flight for s in engine._servers.values()] == [4, 4]
    hold.set()
    assert len(await batch) == 10
    assert len(fakes["a"].served) + len(fakes["b"].served) == 10
    await engine.close()


@pytest.mark.timeout(10)
async def test_a_failing_server_leaves_the_rotation_and_comes_back_current() -> None:
    fakes = clients("a", "b")
    engine = FakeEngine(fakes)
    await engine.start()
    await engine.apply_manifest(manifest(1), no_state)
    fakes["a"].fail_next = 1
    results = await engine.generate(requests(4))  # the one that failed on a is retried on b
    assert len(results) == 4 and engine.servers == {"a": False, "b": True}
    fakes["a"].version = "default"  # it restarted on its own weights while out
    await engine.recover()
    assert engine.servers == {"a": True, "b": True} and fakes["a"].pushed == [1, 1]  # synced again first
    results = await engine.generate(requests(8, "s"))
    assert {r.version_spans.tolist()[0][1] for r in results} == {1}
    await engine.close()


@pytest.mark.timeout(10)
async def test_a_detached_server_is_drained_before_it_is_forgotten() -> None:
    fakes = clients("a", "b")
    hold = asyncio.Event()
    fakes["a"].hold = hold
    engine = FakeEngine(fakes)
    await engine.start()
    running = asyncio.create_task(engine.generate(requests(1)))
    await until(lambda: engine._servers["a"].in_flight, "a request on a")
    leaving = asyncio.create_task(engine.detach("a"))
    await until(lambda: not engine.servers["a"], "a out of rotation")
    assert engine.servers == {"a": False, "b": True}  # draining: no new work
    await engine.generate(requests(2, "s"))
    assert not leaving.done()  # a still runs r0
    assert len(fakes["b"].served) == 2
    hold.set()
    await leaving
    assert len(await running) == 1 and engine.servers == {"b": True} and fakes["a"].closed
    await engine.close()


class BatchingEngine(FakeEngine):
    """Sends the requests of one id together (as the vLLM engine sends a group's samples with n), 3 at most."""

    def _batches(self, requests: Any) -> list[list[int]]:
        by_id: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_id.setdefault(r.request_id, []).append(i)
        return [b[k : k + 3] for b in by_id.values() for k in range(0, len(b), 3)]

    async def _send_batch(
        self, server: Server[FakeClient], batch: list[GenerationRequest], rid: str
    ) -> list[GenerationResult]:
        return [await self._send(server, r, f"{rid}:{len(batch)}") for r in batch]


@pytest.mark.timeout(10)
async def test_a_batch_is_one_request_counted_as_its_samples_and_results_keep_the_callers_order() -> None:
    fakes = clients("a")
    hold = asyncio.Event()
    fakes["a"].hold = hold
    engine = BatchingEngine(fakes)
    await engine.start()
    mixed = [GenerationRequest(request_id=i, prompt_ids=[1]) for i in "xyxyx"]
    batch = asyncio.create_task(engine.generate(mixed))  # x: 3, y: 2; at most 4 samples in flight
    await until(lambda: engine._servers["a"].in_flight >= 3, "a first batch in flight")
    for _ in range(20):  # let every batch that could be picked now be picked (no time passes: the loop's turns)
        await asyncio.sleep(0)
    assert engine._servers["a"].in_flight <= 4 and set(engine._rids) <= {"x", "y"}  # y's 2 wait for room
    hold.set()
    results = await batch
    assert [r.request_id for r in results] == list("xyxyx")
    assert sorted(s.split("@")[0].split(":")[1] for s in fakes["a"].served) == ["2", "2", "3", "3", "3"]
    assert engine._servers["a"].in_flight == 0 and not engine._rids
    await engine.close()
