"""The faults operators meet, under the whole pipeline as real processes (miles-stream feed, produce and train on
a real server), each ending with the accounting: every prompt trained exactly once, nothing pending, no dead
letter, every process still running until its work is done and exiting 0.

    out of memory     maxmemory below what Redis holds (noeviction) for 12 s mid-run: every write is refused
    connection cuts   CLIENT KILL TYPE normal every 0.3-0.6 s, from two steps in until the run is nearly done

The same faults against one component at a time: tests/integration/test_out_of_memory.py (what redis-py raises
is classified as transient) and tests/faults/test_connection_cuts.py (the feeder's and the group consumer's hot
paths, cut every 50 ms).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis_groups import done_total

from miles_stream.demo.task import write_task

CLI = [sys.executable, "-m", "miles_stream.cli"]
BATCH = 4
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def out_of_memory(client: redis.Redis, seconds: float) -> int:
    """Hold maxmemory below what the server uses for `seconds`; returns the writes it refused meanwhile (probed)."""
    before = client.config_get("maxmemory")["maxmemory"]
    refused = 0
    client.config_set("maxmemory", "1")  # one byte: every write that may grow memory is refused (noeviction)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                client.set("oom-probe", "x")
            except redis.ResponseError:
                refused += 1
            time.sleep(0.5)
    finally:
        client.config_set("maxmemory", before)
    return refused


def cut_connections(client: redis.Redis, until: Callable[[], bool], max_s: float) -> int:
    """CLIENT KILL every normal connection but this one every 0.3-0.6 s until `until()`; returns the rounds
    that cut at least one."""
    rounds, deadline = 0, time.monotonic() + max_s
    rng = random.Random(0)
    while not until() and time.monotonic() < deadline:
        rounds += int(client.client_kill_filter(_type="normal", skipme=True) > 0)
        time.sleep(rng.uniform(0.3, 0.6))
    return rounds


@pytest.mark.parametrize("fault", ["out of memory", "connection cuts"])
@pytest.mark.process_tiers
def test_the_pipeline_rides_out_the_fault_and_trains_every_prompt_once(
    redis_url: str, tmp_path: Path, fault: str
) -> None:
    ns = f"pf{uuid.uuid4().hex[:8]}"
    model_dir, demo_prompts = write_task(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(demo_prompts.read_text() * 2)  # 200 rows: each is its own prompt (key = row index)
    total = len(prompts.read_text().splitlines())
    env = {**os.environ, "MILES_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--log-json", f"bus.namespace={ns}", "bus.heartbeat_interval_s=0.5", "bus.block_ms=500"]
    cmds = {
        "feed": [*CLI, "feed", *common, f"feeder.path={prompts}", "feeder.num_epochs=1", "feeder.max_queued=16"],
        "produce": [*CLI, "produce", *common, f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4",
                    "rollout.reward=exact_match", "rollout.sampling.max_new_tokens=24",
                    "rollout.sampling.ignore_eos=true", "rollout.max_inflight_prompts=8", "rollout.torch_threads=1"],
        "train": [*CLI, "train", *common, "--log-level", "debug", f"trainer.model={model_dir}",
                  f"buffer.rollout_batch_size={BATCH}", "buffer.max_staleness=-1", "buffer.filters=[]",
                  f"trainer.max_steps={total // BATCH}", "trainer.torch_threads=1"],
    }  # fmt: skip
    logs = {name: tmp_path / f"{name}.log" for name in cmds}
    files = {name: logs[name].open("wb") for name in cmds}
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=files[name])
             for name, cmd in cmds.items()}  # fmt: skip
    done_key = f"{ns}:done:trainer"
    try:
        with redis.Redis.from_url(redis_url) as client:
            wait_for(lambda: done_total(client, done_key) >= 2 * BATCH, 240, "two trained steps")
            if fault == "out of memory":
                assert out_of_memory(client, 12.0) >= 10  # the server really refused writes the whole time
            else:
                rounds = cut_connections(client, lambda: done_total(client, done_key) >= total - 4 * BATCH, 120)
                assert rounds >= 5, rounds
            procs["train"].wait(timeout=240)  # it stops by itself after its last step
            procs["feed"].wait(timeout=30)  # the dataset is published: it ended long before
            procs["produce"].terminate()
            procs["produce"].wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in files.values():
            f.close()
    for name, proc in procs.items():
        log = logs[name].read_text()
        assert proc.returncode == 0, f"{name}: {proc.returncode}\n{log[-3000:]}"
        assert "Traceback" not in log, f"{name}: {log[-3000:]}"
    trained = [g for line in logs["train"].read_text().splitlines() if '"batch_groups"' in line
               for g in json.loads(line)["group_ids"]]  # fmt: skip
    assert len(trained) == total and len(set(trained)) == total  # every group once
    with redis.Redis.from_url(redis_url) as client:
        assert done_total(client, done_key) == total
        for stream in (f"{ns}:prompts", f"{ns}:trajectories"):  # producers' and trainer's groups
            assert sum(int(g["pending"]) for g in client.xinfo_groups(stream)) == 0, stream
        assert not client.exists(f"{ns}:dead")
        prompt_keys = client.hkeys(f"{ns}:prompt_of")
    assert prompt_keys == []  # every published group's prompt record was released by its commit
