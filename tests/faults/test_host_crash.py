"""A host crash under Redis's AOF everysec: the last second of writes is gone, commits among them. Nothing is
trained twice and nothing stays pending for ever.

    the trainer lives on            its consumer remembers the groups it committed (bus.commit_memory) and, when
                                    one comes back while the done set lacks it, commits it again instead of
                                    training it (80 and 64 of 500 groups were trained twice before)
    the trainer died with the host  its checkpoint names the groups committed in the last bus.durable_after_s;
                                    `--resume` remembers them the same way
    a producer's entry taken over,  the stale "lost" mark is cleared when the entry is handed out again (its new
    then handed back to it          work dropped it as taken over while the keep-alive held it: pending for ever)

The crash is simulated as the issue did it: the AOF cut back to its size of a moment before, then SIGKILL and
a restart on the same files (aof-load-truncated is on by default).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from redis_groups import publish_groups
from waiting import wait_for

from miles_stream.bus import BusConfig, GroupConsumer, Keys, Received, StreamClient, StreamConsumer, publish
from miles_stream.demo.task import write_task
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint

CLI = [sys.executable, "-m", "miles_stream.cli"]
PROMPTS = 100  # the demo task's dataset
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


async def test_a_commit_lost_by_redis_is_committed_again_not_handed_out(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                            dead_stream=keys.dead, config=bus_config)  # fmt: skip
    consumer = GroupConsumer(stream, keys)
    await consumer.start()
    groups = [synthetic_group(np.random.default_rng(i), group_id=f"g{i}", prompt_key=str(i)) for i in range(3)]
    await publish_groups(redis_url, keys.namespace, groups)
    got = []
    while len(got) < 3:
        got += await consumer.read(3)
    await consumer.commit(got)
    # What Redis rolled back: the done set lost g0 and g1, and their entries are back (pending, or re-added)
    await redis.zrem(consumer.done_key, "g0", "g1")
    await publish_groups(redis_url, keys.namespace, groups[:2])
    again = []
    deadline = time.monotonic() + 10
    while consumer.counters.commits_lost < 2 and time.monotonic() < deadline:
        again += await consumer.read(8)
    assert again == []  # trained once: not handed out again
    assert consumer.counters.commits_lost == 2
    assert await consumer.done.contains(["g0", "g1", "g2"]) == [True, True, True]  # committed again
    assert int((await redis.xinfo_groups(keys.trajectories))[0]["pending"]) == 0
    assert sorted(consumer.recent_commits()) == ["g0", "g1", "g2"]


async def test_an_entry_handed_back_after_it_was_marked_lost_is_ours_again(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    a = StreamConsumer(redis, blocking, stream=keys.prompts, group="producers", consumer="a", dead_stream=keys.dead,
                       config=bus_config)  # fmt: skip
    await a.start()
    entry_id = await publish(redis, keys.prompts, b"p", maxlen=100)
    assert [e.id for e in await a.read(1)] == [entry_id]
    await redis.xclaim(keys.prompts, "producers", "b", 0, [entry_id], justid=True)  # b takes it over
    await a.touch_in_hand(force=True)
    assert entry_id in a.lost
    # b's takeover undone (Redis rolled it back; or b died and a reclaimed it): a holds the entry again
    await redis.xclaim(keys.prompts, "producers", "a", 0, [entry_id], justid=True)
    deadline = time.monotonic() + 10
    while entry_id not in a.in_hand and time.monotonic() < deadline:
        await a.read(1)  # reclaims its own idle pending entry
    assert entry_id in a.in_hand and entry_id not in a.lost


async def trainer_consumer(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, name: str
) -> GroupConsumer:
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer=name,
                            dead_stream=keys.dead, config=bus_config)  # fmt: skip
    consumer = GroupConsumer(stream, keys)
    await consumer.start()
    return consumer


async def _held_then_copied(redis_url: str, consumer: GroupConsumer, keys: Keys) -> tuple[Received, str]:
    """g0 read and held (not committed), then a second copy of it published (a producer re-made it)."""
    group = synthetic_group(np.random.default_rng(0), group_id="g0", prompt_key="0")
    await publish_groups(redis_url, keys.namespace, [group])
    got: list[Received] = []
    while not got:
        got = await consumer.read(1)
    await publish_groups(redis_url, keys.namespace, [group])
    deadline = time.monotonic() + 10
    while consumer.counters.duplicates < 1 and time.monotonic() < deadline:
        assert await consumer.read(1) == []  # held already: not handed out twice
    copy = [e for e in consumer.stream.in_hand if e != got[0].entry_id]
    assert len(copy) == 1, "the copy is kept pending, not acked"
    return got[0], copy[0]


async def test_a_held_group_whose_entry_redis_lost_is_trained_from_its_copy(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    consumer = await trainer_consumer(redis, blocking, keys, bus_config, "t")
    held, copy = await _held_then_copied(redis_url, consumer, keys)
    # What a rolled-back Redis shows: the held entry was written after the last fsync, so it is gone, pending
    # to no one; the copy (the producer re-made the group from its rolled-back prompt) is all there is.
    await redis.xack(keys.trajectories, "trainer", held.entry_id)
    await redis.xdel(keys.trajectories, held.entry_id)
    kept = await consumer.still_held([held])
    assert [r.entry_id for r in kept] == [copy] and kept[0].group_id == "g0"
    await consumer.commit(kept)
    assert await consumer.done.contains(["g0"]) == [True]
    assert int((await redis.xinfo_groups(keys.trajectories))[0]["pending"]) == 0


async def test_a_held_group_taken_over_leaves_its_copy_to_the_new_owner(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    consumer = await trainer_consumer(redis, blocking, keys, bus_config, "a")
    held, _copy = await _held_then_copied(redis_url, consumer, keys)
    await redis.xclaim(keys.trajectories, "trainer", "b", 0, [held.entry_id], justid=True)  # b trains it
    assert await consumer.still_held([held]) == []
    pending = await redis.xpending_range(keys.trajectories, "trainer", min="-", max="+", count=10)
    assert [(r["message_id"].decode(), r["consumer"].decode()) for r in pending] == [(held.entry_id, "b")]


def test_a_checkpoint_names_its_recent_commits(tmp_path: Path) -> None:
    state = TrainerState(step=3, version=3, claims=(), run_id="r", recent=("g1", "g2"))
    save_checkpoint(tmp_path, state, lambda d: None)
    assert load_checkpoint(tmp_path, lambda d: None) == state


def aof_file(data_dir: Path) -> Path:
    """The file Redis appends to: appendonlydir/*.incr.aof (7.0+, Valkey) or appendonly.aof (6.2)."""
    incr = sorted((data_dir / "appendonlydir").glob("*.incr.aof"), key=lambda p: int(p.name.split(".")[-3]))
    return incr[-1] if incr else data_dir / "appendonly.aof"


def trained_group_ids(log: Path) -> list[str]:
    return [g for line in log.read_text().splitlines() if '"batch_groups"' in line
            for g in json.loads(line)["group_ids"]]  # fmt: skip


def trained_by_checkpoint(log: Path) -> list[str]:
    """The groups in the final weights of a trainer killed and resumed: the first process's batches up to the
    step its checkpoint holds, then every batch of the resumed one."""
    first: list[tuple[int, list[str]]] = []
    after: list[str] = []
    resumed_at = None
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("event") == "resumed":
            resumed_at = int(event["step"])
        elif event.get("event") == "batch_groups":
            if resumed_at is None:
                first.append((int(event["step"]), event["group_ids"]))
            else:
                after += event["group_ids"]
    assert resumed_at is not None
    return [g for step, ids in first if step <= resumed_at for g in ids] + after


# Opt-in (-m slow): in one of four full-suite runs (Redis 7.0, trainer living on, a busy CPU) the run stalled
# with 99 of 100 groups at the trainer after the restart; the producer had dropped one group as taken over by
# its ownership check just after the restart. Not diagnosed yet (see the README's reliability table).
@pytest.mark.slow
@pytest.mark.parametrize("trainer_dies", [False, True], ids=["trainer-lives", "trainer-dies-too"])
def test_a_host_crash_trains_nothing_twice(tmp_path: Path, redis_binary: str, trainer_dies: bool) -> None:
    config = EmbeddedRedisConfig(binary=redis_binary, port=free_port(), data_dir=str(tmp_path / "data"),
                                 persistence="aof")  # fmt: skip
    server = EmbeddedRedis(config).start()
    ns = f"hc{uuid.uuid4().hex[:8]}"
    model_dir, prompts = write_task(tmp_path)
    env = {**os.environ, "MILES_REDIS_URL": server.url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--log-json", f"bus.namespace={ns}", "bus.claim_idle_ms=2000", "bus.claim_interval_s=0.5",
              "bus.heartbeat_interval_s=0.5", "bus.heartbeat_ttl_s=5", "redis.startup_wait_s=60"]  # fmt: skip
    fed = subprocess.run([*CLI, "feed", *common, f"feeder.path={prompts}", "feeder.num_epochs=1"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert fed.returncode == 0, fed.stderr[-2000:]
    time.sleep(1.5)  # past one fsync: the prompts are on disk (the crash takes only the run's last second)
    metrics = tmp_path / "metrics.jsonl"
    cmds = {
        "produce": [*CLI, "produce", *common, f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4",
                    "rollout.reward=exact_match", "rollout.sampling.max_new_tokens=4", "rollout.torch_threads=1",
                    "rollout.max_inflight_prompts=4"],
        "train": [*CLI, "train", *common, "--log-level", "debug", f"trainer.model={model_dir}",
                  "buffer.rollout_batch_size=4", "buffer.max_staleness=-1", "buffer.filters=[]",
                  f"trainer.checkpoint_dir={tmp_path / 'ckpt'}", "trainer.checkpoint_every=1",
                  f"trainer.metrics_path={metrics}", "trainer.torch_threads=1"],
    }  # fmt: skip
    procs = {}
    for name, cmd in cmds.items():
        with (tmp_path / f"{name}.log").open("wb") as err:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    steps = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    try:
        wait_for(lambda: steps() >= 3, 240, "three trained steps")
        aof = aof_file(Path(config.data_dir))
        size, at = aof.stat().st_size, steps()
        wait_for(lambda: steps() >= at + 2, 120, "two more steps, committed after the mark")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)  # the host goes down ...
        if trainer_dies:  # ... with the trainer on it
            procs["train"].kill()
            procs["train"].wait()
        server.stop()
        with aof.open("r+b") as f:  # ... and its last writes never reached the disk
            f.truncate(size)
        server = EmbeddedRedis(config).start()  # same port, same files
        if trainer_dies:  # restarted from its last checkpoint, which names its recent commits
            with (tmp_path / "train.log").open("ab") as err:
                procs["train"] = subprocess.Popen([*cmds["train"], "--resume"], env=env, stdout=subprocess.DEVNULL,
                                                  stderr=err)  # fmt: skip

        def all_trained() -> bool:
            with redis.Redis.from_url(server.url) as client:
                return client.zcard(f"{ns}:done:trainer") >= PROMPTS  # no sweep in a run this short (30 s)

        wait_for(all_trained, 300, "every prompt trained")
        with redis.Redis.from_url(server.url) as client:
            wait_for(lambda: int(client.xinfo_groups(f"{ns}:prompts")[0]["pending"]) == 0, 60,
                     "no prompt left pending")  # fmt: skip
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.stop()
    log = (tmp_path / "train.log").read_text()
    trained = trained_group_ids(tmp_path / "train.log")
    if trainer_dies:  # what the lost run trained after its checkpoint is trained again, into restored weights
        trained = trained_by_checkpoint(tmp_path / "train.log")
    assert len(trained) == len(set(trained)) == PROMPTS, (len(trained), len(set(trained)))  # each exactly once
    assert "commits_lost_by_redis_recommitted" in log, "the crash took no commit back: the test tested nothing"
