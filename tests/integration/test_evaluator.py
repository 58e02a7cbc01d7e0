"""The evaluator on a real Redis: which versions it scores (every k-th; the newest when it falls behind), and
`miles-stream eval` beside a live feeder, producer and trainer: its results on `{ns}:eval`, in `status --json`,
on its Prometheus endpoint and in the trainer's log; it stops on SIGTERM within seconds, and a wrong dataset
path or Redis URL is one line naming it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
import redis.asyncio as aioredis
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.bus import BusConfig, Heartbeat, Keys
from miles_stream.demo.task import write_task
from miles_stream.engines.base import GenerationRequest, GenerationResult, RolloutEngine, SamplingParams
from miles_stream.evaluation.config import EvalConfig
from miles_stream.evaluation.evaluator import Evaluator
from miles_stream.evaluation.follow import parse_results
from miles_stream.evaluation.sinks import EvalFiles
from miles_stream.feeder import FeederConfig, load_rows
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port
from miles_stream.rewards import RewardRegistry
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.engines import open_engine
from miles_stream.weights.transports import RedisTransport
from miles_stream.weights.versions import WeightPublisher, WeightSubscriber

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics_scrape import scrape, scrape_until, value

CLI = [sys.executable, "-m", "miles_stream.cli"]
pytestmark = pytest.mark.integration


class GatedEngine:
    """The real engine, with `generate` held while `gate` is closed: the test publishes versions meanwhile, so the
    evaluator is behind by a known amount when it reads the announcements again."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine, self.gate, self.held = engine, asyncio.Event(), asyncio.Event()
        self.gate.set()

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not self.gate.is_set():
            self.held.set()
            await asyncio.wait_for(self.gate.wait(), 60)
        return await self.engine.generate(requests)

    async def update_weights(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        await self.engine.update_weights(version, state)

    async def close(self) -> None:
        await self.engine.close()


async def _until(predicate: Any, what: str, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(120)
async def test_the_evaluator_scores_every_kth_version_and_the_newest_when_behind(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    model_dir, prompts = write_task(tmp_path)
    state = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    publisher = WeightPublisher(redis, keys, RedisTransport(redis, keys))
    rollout = RolloutConfig(model=str(model_dir), max_batch=64)
    native, _ = await open_engine(rollout, redis, keys.sglang_servers("eval"))
    engine = GatedEngine(native)
    files = EvalFiles(str(tmp_path / "eval.jsonl"), str(tmp_path / "tb"))
    config = EvalConfig(path=str(prompts), every=2, n_samples=2, limit=20)
    rows = load_rows(FeederConfig(path=str(prompts)))[:20]
    weights = WeightSubscriber(redis, keys, {"redis": RedisTransport(redis, keys)})
    evaluator = Evaluator(config, engine=engine, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                          reward_fn=RewardRegistry().get("exact_match"), rows=rows,
                          sampling=SamplingParams(max_new_tokens=1), weights=weights, redis=redis, keys=keys,
                          evaluator_id="e1", max_batch=64, block_ms=50, sinks=[files])  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(evaluator.run(stop))
    producer = Heartbeat(redis, keys, role="producer", member_id="p", config=BusConfig(namespace=keys.namespace),
                         describe=lambda: {"weight_version": 2})  # keeps versions >= 2 from pruning  # fmt: skip
    try:
        await _until(lambda: evaluator.counters.evaluated == 1, "version 0 (nothing published yet)")
        async with producer:
            engine.gate.clear()
            await publisher.publish(1, state)  # not a multiple of 2: skipped
            await publisher.publish(2, state)
            await _until(engine.held.is_set, "the evaluation of version 2 to start")
            for v in range(3, 8):  # announced while it evaluates version 2: it is behind by five versions
                await publisher.publish(v, state)
            engine.held.clear()
            engine.gate.set()
            await _until(lambda: evaluator.counters.evaluated == 3, "the newest even version after falling behind")
        engine.gate.clear()  # no producer now: the trainer keeps only the newest version
        await publisher.publish(8, state)
        await _until(engine.held.is_set, "the evaluation of version 8 to start")
        for v in range(9, 12):  # 10 is chosen, but pruned when 11 was announced: 11 is scored instead
            await publisher.publish(v, state)
        engine.gate.set()
        await _until(lambda: evaluator.counters.evaluated == 5, "the newest version in place of a pruned one")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await engine.close()
        files.close()
    results = parse_results(await redis.xrange(keys.eval))
    assert [r.version for r in results] == [0, 2, 6, 8, 11]  # 4 passed over for the newer 6; 10 was pruned
    assert [r.skipped for r in results] == [0, 1, 4, 0, 2]  # 1; 3, 4, 5 and 7; 9 and 10
    assert evaluator.counters.skipped == 7 and evaluator.counters.rejected == 1
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [0, 2, 6, 8, 11] and all(r["prompts"] == 20 for r in rows)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/pass_at_1")] == [0, 2, 6, 8, 11]
    assert [e.value for e in events.Scalars("eval/pass_at_k/2")] == pytest.approx([r.pass_at_k[2] for r in results])


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def one_server() -> Iterator[str]:
    """One server (the default, Valkey) for the process tests: four processes are not run again on every tier
    (the bus calls they make are the ones the tiered tests cover)."""
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as server:
        yield server.url


@pytest.mark.timeout(400)
def test_miles_stream_eval_beside_a_live_pipeline_shows_in_the_stream_status_metrics_and_trainer_log(
    one_server: str, tmp_path: Path
) -> None:
    redis_url = one_server
    model_dir, prompts = write_task(tmp_path)
    ns = f"e{uuid.uuid4().hex[:8]}"
    port = free_port()
    common = ["--redis-url", redis_url, "--log-json", f"bus.namespace={ns}", "bus.heartbeat_interval_s=0.5"]
    model = [f"rollout.model={model_dir}", "rollout.reward=exact_match", "rollout.sampling.max_new_tokens=1",
             "rollout.torch_threads=1"]  # fmt: skip
    cmds = {
        "evaluator": [*CLI, "eval", *common, *model, f"eval.path={prompts}", f"eval.out={tmp_path / 'eval.jsonl'}",
                      "eval.n_samples=4", "eval.pass_k=[1,4]", f"metrics.port={port}"],
        "feeder": [*CLI, "feed", *common, f"feeder.path={prompts}", "feeder.num_epochs=0", "feeder.max_queued=16"],
        "producer": [*CLI, "produce", *common, *model, "rollout.n_samples_per_prompt=4"],
        "trainer": [*CLI, "train", *common, f"trainer.model={model_dir}", "buffer.rollout_batch_size=2",
                    "buffer.max_staleness=-1", "buffer.filters=[]", "trainer.torch_threads=1"],
    }  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        with sync_redis.Redis.from_url(redis_url) as client:

            def evaluated() -> list[int]:
                return [r.version for r in parse_results(client.xrange(f"{ns}:eval"))]

            procs["evaluator"] = _start(cmds["evaluator"], tmp_path / "evaluator.log", env)
            deadline = time.monotonic() + 240
            while not evaluated():  # the untrained weights first, before any trainer exists (as the demo starts)
                assert procs["evaluator"].poll() is None, (tmp_path / "evaluator.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no eval of the untrained weights"
                time.sleep(0.2)
            for name, cmd in cmds.items():
                if name != "evaluator":
                    procs[name] = _start(cmd, tmp_path / f"{name}.log", env)
            while not (len(evaluated()) >= 2 and max(evaluated()) >= 1):
                for name, proc in procs.items():
                    assert proc.poll() is None, f"{name} exited: " + (tmp_path / f"{name}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"no eval of a trained version: {evaluated()}"
                time.sleep(0.2)
            assert evaluated()[0] == 0
            assert [g["name"] for g in client.xinfo_groups(f"{ns}:trajectories")] == [b"trainer"]  # no eval group

        status = subprocess.run([*CLI, "status", "--json", "--redis-url", redis_url, f"bus.namespace={ns}"],
                                capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert status.returncode == 0, status.stderr
        snapshot = json.loads(status.stdout)
        members = {m["role"]: m for m in snapshot["members"]}
        assert members["evaluator"]["info"]["waiting"] in ("weights", "")
        assert members["trainer"]["info"]["waiting"] in ("data", "")
        assert members["producer"]["info"]["waiting"] in ("admission", "backpressure", "data", "")
        assert snapshot["evals"][0]["version"] >= 1 and 0.0 <= snapshot["evals"][0]["pass_at_1"] <= 1.0
        assert set(snapshot["evals"][0]["pass_at_k"]) == {"1", "4"}

        scraped = scrape_until(port, lambda s: value(s, "miles_stream_eval_weight_version") >= 1,
                               "the evaluator's gauges", procs)  # fmt: skip
        assert 0.0 <= value(scraped, "miles_stream_eval_pass_at_1") <= 1.0
        assert 0.0 <= value(scraped, "miles_stream_eval_pass_at_k", k="4") <= 1.0
        assert value(scraped, "miles_stream_eval_versions_total", outcome="evaluated") >= 2
        assert value(scraped, "miles_stream_eval_response_tokens_mean") == 1.0

        def trainer_saw_eval() -> bool:
            lines = (tmp_path / "trainer.log").read_text().splitlines()
            return any('"eval_result"' in x and json.loads(x).get("eval_version", 0) >= 1 for x in lines)

        deadline = time.monotonic() + 60
        while not trainer_saw_eval():  # the trainer logs each result beside its own step and version
            assert time.monotonic() < deadline, "the trainer's log shows no eval_result of a trained version"
            time.sleep(0.2)

        stopped_at = time.monotonic()
        procs["evaluator"].send_signal(signal.SIGTERM)
        assert procs["evaluator"].wait(timeout=30) == 0
        assert time.monotonic() - stopped_at < 10, "the evaluator took more than 10 s to stop"
        assert scrape(port) is None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(120)
def test_a_wrong_dataset_path_or_redis_url_is_one_line_naming_it(one_server: str, tmp_path: Path) -> None:
    redis_url = one_server
    model_dir, prompts = write_task(tmp_path)
    base = [*CLI, "eval", f"rollout.model={model_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    missing = subprocess.run([*base, "--redis-url", redis_url, f"eval.path={tmp_path / 'nope.jsonl'}"],
                             capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"miles-stream eval: eval.path: '{tmp_path / 'nope.jsonl'}' is not a file (the held-out .jsonl or .parquet set)"
    ]
    nobody = f"redis://127.0.0.1:{free_port()}"
    unreachable = subprocess.run([*base, "--redis-url", nobody, f"eval.path={prompts}", "redis.startup_wait_s=0.5"],
                                 capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)  # fmt: skip
    assert unreachable.returncode == 2
    last = unreachable.stderr.strip().splitlines()[-1]
    assert last.startswith("miles-stream eval: Redis at redis://127.0.0.1:") and "does not answer" in last
    assert not (tmp_path / "eval.jsonl").exists()  # eval.out's default, in the working directory: no result, no file
