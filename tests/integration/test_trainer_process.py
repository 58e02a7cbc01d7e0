"""The trainer process with a real Redis: it trains, publishes weights, commits and exports; a redelivered
group trains once; kill -9 between a step and its ack, then --resume: every group counts exactly once and the
final weights equal an uninterrupted run's, bit for bit; stale groups are dropped or their prompts recycled."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
import torch
from redis_groups import done_total, publish_groups
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from miles_stream.buffer import BufferConfig, ReplayBuffer
from miles_stream.bus import (
    BusConfig,
    GroupConsumer,
    Keys,
    StreamClient,
    StreamConsumer,
)
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.prompts import PromptRecord, decode_prompt, encode_prompt
from miles_stream.schema import TrajectoryGroup
from miles_stream.testing.synthetic import synthetic_group

CLI = [sys.executable, "-m", "miles_stream.cli"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "miles_stream.cli"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig())


def groups(start: int, count: int, version: int = 0) -> list[TrajectoryGroup]:
    """Groups g{start}..: random tokens of the tiny vocabulary, rewards 0/1 so that every group has signal."""
    out = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        g = synthetic_group(rng, n_samples=4, prompt_len=5, response_len=int(rng.integers(3, 10)), vocab=50,
                            version=version, group_id=f"g{i}", prompt_key=str(i))  # fmt: skip
        samples = tuple(replace(s, reward=float(k % 2)) for k, s in enumerate(g.samples))
        out.append(replace(g, samples=samples))
    return out


def train_cmd(ns: str, model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*CLI, "train", "--log-json", "--log-level", "debug", f"bus.namespace={ns}", f"trainer.model={model_dir}",
            "buffer.rollout_batch_size=4", "buffer.max_staleness=-1", "buffer.filters=[]", "trainer.lr=1e-3",
            "trainer.recompute_old_logprobs=false", f"trainer.checkpoint_dir={run_dir / 'ckpt'}",
            "trainer.checkpoint_every=2", f"trainer.metrics_path={run_dir / 'metrics.jsonl'}",
            f"trainer.export_dir={run_dir / 'export'}", *extra]  # fmt: skip


def trained_groups(log: str) -> dict[int, list[str]]:
    """step -> group ids, from the trainer's debug log."""
    out = {}
    for line in log.splitlines():
        if '"batch_groups"' in line:
            event = json.loads(line)
            out[event["step"]] = event["group_ids"]
    return out


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.process_tiers
def test_trainer_trains_publishes_commits_and_exports(redis_url: str, model_dir: Path, tmp_path: Path) -> None:
    ns = f"tr{uuid.uuid4().hex[:8]}"
    items = groups(0, 8)
    foreign = synthetic_group(np.random.default_rng(99), n_samples=4, vocab=10_000, group_id="foreign")  # ids >= 50
    # g0 twice (a retried XADD), and a group whose token ids the model cannot embed
    asyncio.run(publish_groups(redis_url, ns, [*items[:3], items[0], foreign, *items[3:]]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([*train_cmd(ns, model_dir, tmp_path, "trainer.max_steps=2"), "--redis-url", redis_url],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    steps = trained_groups(run.stderr)
    assert sorted(g for ids in steps.values() for g in ids) == sorted(f"g{i}" for i in range(8))  # g0 once
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["version"] == 2
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
    with sync_redis.Redis.from_url(redis_url) as client:
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
        assert done_total(client, f"{ns}:done:trainer") == 8
        announced = [int(f[b"version"]) for _, f in client.xrange(f"{ns}:weights")]
        assert announced[-1] == 2 and announced == sorted(set(announced))  # one may be skipped (background)
        (dead,) = client.xrange(f"{ns}:dead")  # dead-lettered with the reason, not a crash
        assert b"outside the vocabulary of 50" in dead[1][b"reason"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.config.vocab_size == AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size


@pytest.mark.process_tiers
def test_kill_between_step_and_ack_then_resume_trains_each_group_once(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url}
    ns, crashed = f"kr{uuid.uuid4().hex[:8]}", tmp_path / "crashed"
    asyncio.run(publish_groups(redis_url, ns, groups(0, 12)))
    proc = subprocess.Popen(train_cmd(ns, model_dir, crashed), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 90
    while len(metrics(crashed)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert len(metrics(crashed)) == 3, proc.stderr.read() if proc.poll() is not None else "no third step"
    proc.send_signal(signal.SIGKILL)  # step 3 is trained, its groups wait for the step-4 checkpoint to be acked
    _, first_log = proc.communicate(timeout=30)
    with sync_redis.Redis.from_url(redis_url) as client:
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 4
    asyncio.run(publish_groups(redis_url, ns, groups(12, 12)))
    resumed = subprocess.run([*train_cmd(ns, model_dir, crashed, "trainer.max_steps=6"), "--resume"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    before, after = trained_groups(first_log), trained_groups(resumed.stderr)
    assert sorted(after) == [3, 4, 5, 6]
    effective = [g for s in (1, 2) for g in before[s]] + [g for s in sorted(after) for g in after[s]]
    assert sorted(effective) == sorted(f"g{i}" for i in range(24))  # each exactly once in the final weights
    assert after[3] == before[3]  # the killed step's groups came back first

    ns2, straight = f"un{uuid.uuid4().hex[:8]}", tmp_path / "straight"
    asyncio.run(publish_groups(redis_url, ns2, groups(0, 24)))
    clean = subprocess.run(train_cmd(ns2, model_dir, straight, "trainer.max_steps=6"), env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert clean.returncode == 0, clean.stderr[-3000:]
    a = load_file(crashed / "export" / "model.safetensors")
    b = load_file(straight / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit for bit
    logged = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(crashed)]  # steps 1-3, then 3-6 resumed
    reference = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(straight)]
    assert logged == reference[:3] + reference[2:]
    with sync_redis.Redis.from_url(redis_url) as client:
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
        versions = [int(f[b"version"]) for _, f in client.xrange(f"{ns}:weights")]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)  # never backwards


@pytest.mark.process_tiers
def test_kill_in_the_middle_of_a_step_then_resume_commits_each_group_once(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url}
    ns, run_dir = f"km{uuid.uuid4().hex[:8]}", tmp_path / "run"
    asyncio.run(publish_groups(redis_url, ns, groups(0, 24)))
    slow = ["trainer.updates_per_batch=4", "trainer.micro_batch_tokens=8"]  # a step of many small passes
    proc = subprocess.Popen([*train_cmd(ns, model_dir, run_dir), *slow], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:  # the step-3 batch is logged as the step starts: kill it then, inside the step
        seen.append(line)
        if '"batch_groups"' in line and '"step": 3' in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert len(metrics(run_dir)) == 2  # step 3 never finished
    resumed = subprocess.run([*train_cmd(ns, model_dir, run_dir, "trainer.max_steps=6"), *slow, "--resume"],
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, after = trained_groups("".join(seen)), trained_groups(resumed.stderr)
    effective = [g for s in (1, 2) for g in before[s]] + [g for s in sorted(after) for g in after[s]]
    assert sorted(effective) == sorted(f"g{i}" for i in range(24))  # each exactly once in the final weights
    with sync_redis.Redis.from_url(redis_url) as client:
        assert done_total(client, f"{ns}:done:trainer") == 24
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0


@pytest.mark.parametrize("policy", ["drop", "recycle"])
async def test_stale_groups_are_dropped_or_their_prompts_recycled(
    policy: str, redis: aioredis.Redis, blocking: StreamClient, redis_url: str, keys: Keys, bus_config: BusConfig
) -> None:
    fresh, stale = groups(0, 2, version=5), groups(2, 2, version=1)
    for g in stale:  # what a producer keeps when it publishes a group
        record = PromptRecord(key=g.prompt_key, text=f"prompt {g.group_id}", label="1", epoch=0, index=0)
        await redis.hset(keys.prompt_of, g.group_id, encode_prompt(record))
    await publish_groups(redis_url, keys.namespace, [stale[0], fresh[0], stale[1], fresh[1]])
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                            dead_stream=keys.dead, config=bus_config)  # fmt: skip
    config = BufferConfig(rollout_batch_size=2, max_staleness=2, stale=policy)  # type: ignore[arg-type]
    buffer = ReplayBuffer(GroupConsumer(stream, keys, owns_prompts=True), config)
    await buffer.start()
    batch = await asyncio.wait_for(buffer.next_batch(version=6), 10)
    assert batch is not None and [r.group_id for r in batch.items] == ["g0", "g1"]
    assert batch.staleness == [1, 1]
    await buffer.commit([r.claim for r in batch.items])
    assert (await redis.xpending(keys.trajectories, "trainer"))["pending"] == 0
    assert await redis.hlen(keys.prompt_of) == 0
    requeued = [decode_prompt(f[b"d"]).text for _, f in await redis.xrange(keys.prompts)]
    if policy == "drop":
        assert buffer.counters.stale_dropped == 2 and requeued == []
    else:
        assert buffer.counters.recycled == 2 and requeued == ["prompt g2", "prompt g3"]


@pytest.mark.process_tiers
def test_two_data_parallel_trainers_share_the_stream_and_match_one(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """Replicated (dp) and sharded (fsdp: trainer.fsdp, FSDP2) over two ranks against one rank: the same steps;
    the sharded run's checkpoint is every rank's shards, its publication and export gather them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher, extra in (
        ("dp", TORCHRUN_2, []),
        ("fsdp", TORCHRUN_2, ["trainer.fsdp.enabled=true"]),
        ("single", CLI, []),
    ):  # fmt: skip
        ns = f"{name}{uuid.uuid4().hex[:8]}"
        asyncio.run(publish_groups(redis_url, ns, groups(0, 8)))
        share = 4 if name == "single" else 2  # each rank reads exactly its share, so a step's groups are the same
        cmd = train_cmd(ns, model_dir, tmp_path / name, "trainer.max_steps=2", f"buffer.capacity={share}",
                        f"buffer.read_count={share}", *extra)  # fmt: skip
        run = subprocess.run([*launcher, *cmd[len(CLI) :]], env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "export" / "model.safetensors")
        with sync_redis.Redis.from_url(redis_url) as client:
            consumers = {c["name"].decode(): c for c in client.xinfo_consumers(f"{ns}:trajectories", "trainer")}
            assert done_total(client, f"{ns}:done:trainer") == 8
            announced = [int(f[b"version"]) for _, f in client.xrange(f"{ns}:weights")]
        assert announced[-1] == 2
        if name != "single":
            assert sorted(consumers) == ["trainer-0", "trainer-1"]
    saved = tmp_path / "fsdp" / "ckpt" / "step-00000002"
    assert (tmp_path / "fsdp" / "ckpt" / "latest").read_text() == saved.name
    assert sorted(p.name for p in (saved / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for name in ("dp", "fsdp"):
        assert runs[name].keys() == runs["single"].keys()
        for key, value in runs["single"].items():
            assert torch.allclose(runs[name][key], value, atol=1e-5), (name, key)  # summed in another order


@pytest.mark.process_tiers
async def test_weights_published_over_the_file_transport_load_and_equal_the_trained_model(
    redis: aioredis.Redis, redis_url: str, keys: Keys, model_dir: Path, tmp_path: Path
) -> None:
    from miles_stream.weights.transports import FileTransport
    from miles_stream.weights.versions import WeightSubscriber

    await publish_groups(redis_url, keys.namespace, groups(0, 8))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url}
    cmd = train_cmd(keys.namespace, model_dir, tmp_path, "trainer.max_steps=2", "trainer.transport=file",
                    f"trainer.weights_dir={tmp_path / 'weights'}")  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    subscriber = WeightSubscriber(redis, keys, {"file": FileTransport("")})  # a producer's view: path from manifest
    latest = await subscriber.latest()
    assert latest is not None and latest[1].version == 2 and latest[1].transport == "file"
    loaded = await subscriber.load(latest[1])
    exported = load_file(tmp_path / "export" / "model.safetensors")
    for name, tensor in exported.items():
        assert loaded[name].equal(tensor), name  # what producers load is what the trainer ended with


@pytest.mark.process_tiers
async def test_weights_broadcast_over_a_gloo_group_equal_the_trained_model(
    redis: aioredis.Redis, redis_url: str, keys: Keys, model_dir: Path, tmp_path: Path
) -> None:
    """The broadcast transport on CPU (gloo in place of NCCL): the trainer is rank 0, this test a producer's
    receiver (rank 1); every version arrives, and the last equals the exported model."""
    from miles_stream.redis_server import free_port
    from miles_stream.weights.broadcast import BroadcastReceiver
    from miles_stream.weights.group import WeightsGroupConfig
    from miles_stream.weights.versions import WeightSubscriber

    await publish_groups(redis_url, keys.namespace, groups(0, 8))
    group = WeightsGroupConfig(master_port=free_port(), backend="gloo", device="cpu", dtype="float32", timeout_s=60,
                               group_name=f"w-{keys.namespace}")  # one group per name in a process  # fmt: skip
    receiver = BroadcastReceiver(group, 1, AutoModelForCausalLM.from_pretrained(model_dir).state_dict())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url}
    values = {"master_port": group.master_port, "backend": "gloo", "device": "cpu", "dtype": "float32", "timeout_s": 60,
              "group_name": group.group_name}  # fmt: skip
    settings = [f"weights_group.{k}={v}" for k, v in values.items()]
    cmd = train_cmd(
        keys.namespace, model_dir, tmp_path, "trainer.max_steps=2", "trainer.transport=broadcast", *settings
    )
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    subscriber = WeightSubscriber(redis, keys, {"broadcast": receiver})
    latest = await subscriber.latest()
    assert latest is not None and latest[1].version == 2 and latest[1].transport == "broadcast"
    loaded = await subscriber.load(latest[1])
    exported = load_file(tmp_path / "export" / "model.safetensors")
    for name, tensor in exported.items():
        assert loaded[name].equal(tensor), name


def rank_groups(log: str) -> dict[int, list[str]]:
    """step -> group ids over every rank (each rank logs its own share of a step). The ranks write to one
    stderr: a line may hold two events (one's newline written after the other's text), so events are decoded
    where each starts, not line by line."""
    out: dict[int, list[str]] = {}
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r'\{"step": ', log)):
        try:
            event, _ = decoder.raw_decode(log, start)
        except ValueError:  # another event's text cut into this one (a batch_groups lost so fails the caller)
            continue
        if event.get("event") == "batch_groups":
            out.setdefault(event["step"], []).extend(event["group_ids"])
    return out


def children(pid: int) -> list[int]:
    """The processes `pid` started (torchrun's ranks run in sessions of their own: a group kill misses them)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
def test_fsdp_trainer_killed_between_step_and_ack_then_resumed_trains_each_group_once(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of both FSDP ranks (and torchrun) after step 3, whose groups wait for the step-4 checkpoint;
    --resume on two ranks loads the step-2 shards, commits what they name, trains step 3's groups again."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    ns, run_dir = f"kf{uuid.uuid4().hex[:8]}", tmp_path / "run"
    run_dir.mkdir()
    asyncio.run(publish_groups(redis_url, ns, groups(0, 12)))
    fsdp = ["trainer.fsdp.enabled=true", "buffer.capacity=2", "buffer.read_count=2"]  # 4 groups a step, 2 a rank
    first_log = run_dir / "first.log"
    with first_log.open("w") as err:
        proc = subprocess.Popen([*TORCHRUN_2, *train_cmd(ns, model_dir, run_dir, *fsdp)[len(CLI) :]], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip
        deadline = time.monotonic() + 150
        while len(metrics(run_dir)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        ranks = children(proc.pid)
        for pid in [*ranks, proc.pid]:  # the ranks first: torchrun would otherwise stop them itself
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(metrics(run_dir)) == 3 and len(ranks) == 2, first_log.read_text()[-3000:]
    with sync_redis.Redis.from_url(redis_url) as client:
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 4
    assert (run_dir / "ckpt" / "latest").read_text() == "step-00000002"
    asyncio.run(publish_groups(redis_url, ns, groups(12, 12)))
    resumed = subprocess.run([*TORCHRUN_2, *train_cmd(ns, model_dir, run_dir, *fsdp, "trainer.max_steps=6")[len(CLI) :],
                              "--resume"], env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, after = rank_groups(first_log.read_text()), rank_groups(resumed.stderr)
    assert sorted(after) == [3, 4, 5, 6]
    effective = [g for s in (1, 2) for g in before[s]] + [g for s in sorted(after) for g in after[s]]
    assert sorted(effective) == sorted(f"g{i}" for i in range(24))  # each exactly once in the final weights
    assert sorted(after[3]) == sorted(before[3])  # the killed step's groups came back first
    with sync_redis.Redis.from_url(redis_url) as client:
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
        assert done_total(client, f"{ns}:done:trainer") == 24
        versions = [int(f[b"version"]) for _, f in client.xrange(f"{ns}:weights")]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)  # never backwards
