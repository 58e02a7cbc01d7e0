"""The prompt feeder against a real Redis: order, epochs, backpressure, resume, formats, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from miles_stream import admin
from miles_stream.bus import BusConfig, Keys, StreamClient, StreamConsumer
from miles_stream.bus.keys import partition_keys
from miles_stream.bus.run import check_partitions, join_run
from miles_stream.errors import ConfigError, DataLossError, MilesStreamError, SchemaError
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.models import build_tiny_model
from miles_stream.prompts import PromptRecord, decode_prompt, encode_prompt
from miles_stream.run_config import load_run_config


def write_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "label": 2 * i}) + "\n" for i in range(n)))
    return path


async def drain(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus: BusConfig, want: int, stop_after: int = 0,
    stop: asyncio.Event | None = None,
) -> list[PromptRecord]:  # fmt: skip
    """Claim prompts as a producer would, acking each; optionally set `stop` after `stop_after` of them."""
    c = StreamConsumer(redis, blocking, stream=keys.prompts, group="producers", consumer="p0",
                       dead_stream=keys.dead, config=bus)  # fmt: skip
    await c.start()
    got: list[PromptRecord] = []
    for _ in range(400):
        entries = await c.read(3)
        got += [decode_prompt(e.data) for e in entries]
        await c.ack(e.id for e in entries)
        if stop is not None and stop_after and len(got) >= stop_after:
            stop.set()
            break
        if len(got) >= want:
            break
    return got


async def test_each_epoch_is_a_seeded_permutation_and_backpressure_holds(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    config = FeederConfig(path=str(write_jsonl(tmp_path / "d.jsonl", 10)), num_epochs=2, max_queued=3, seed=7)
    feeder = Feeder(redis, keys, replace(bus_config, backpressure_poll_s=0.01), config, load_rows(config))
    task = asyncio.create_task(feeder.run())
    await asyncio.sleep(0.3)
    assert await redis.xlen(keys.prompts) <= 3  # nobody consumes yet: the feeder waits at max_queued
    got = await drain(redis, blocking, keys, bus_config, want=20)
    assert await asyncio.wait_for(task, 5) == 20
    for epoch in (0, 1):
        indices = [p.index for p in got if p.epoch == epoch]
        assert indices == feeder.order(epoch).tolist()
    assert feeder.order(0).tolist() != feeder.order(1).tolist()
    assert got[0].text == f"{got[0].index}+{got[0].index}=" and got[0].label == str(2 * got[0].index)


async def test_a_restarted_feeder_continues_without_gaps_or_repeats(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    config = FeederConfig(path=str(write_jsonl(tmp_path / "d.jsonl", 6)), num_epochs=2, max_queued=2)
    rows = load_rows(config)
    stop = asyncio.Event()
    first = asyncio.create_task(Feeder(redis, keys, bus_config, config, rows).run(stop))
    got = await drain(redis, blocking, keys, bus_config, want=12, stop_after=5, stop=stop)
    await asyncio.wait_for(first, 5)
    resumed = Feeder(redis, keys, bus_config, config, rows)
    task = asyncio.create_task(resumed.run())
    got += await drain(redis, blocking, keys, bus_config, want=12 - len(got))
    await asyncio.wait_for(task, 5)
    seen = [(p.epoch, p.index) for p in got]
    assert len(seen) == 12 and len(set(seen)) == 12


async def test_a_retried_publish_after_it_went_through_does_nothing(
    redis: aioredis.Redis, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    config = FeederConfig(path=str(write_jsonl(tmp_path / "d.jsonl", 3)))
    feeder = Feeder(redis, keys, bus_config, config, load_rows(config))
    assert await feeder._publish(0, 0, 0) == (0, 1)  # lane (partition) 0, epoch 0, position 0
    feeder.counts[0] = 0  # as if the reply had been lost: the retry finds the position moved
    assert await feeder._publish(0, 0, 0) == (0, 1)
    assert await redis.xlen(keys.prompts) == 1
    assert await feeder.position() == (0, 1)
    assert feeder.published == 1  # read back from Redis: the publication whose reply was lost counts


async def test_feeders_side_by_side_publish_each_position_once(
    redis: aioredis.Redis, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    """Two feeders started on one namespace (an operator's slip, or one per host): they share the dataset."""
    config = FeederConfig(path=str(write_jsonl(tmp_path / "d.jsonl", 50)), num_epochs=2, max_queued=1000)
    rows = load_rows(config)
    feeders = [Feeder(redis, keys, bus_config, config, rows) for _ in range(3)]
    counts = await asyncio.wait_for(asyncio.gather(*(f.run() for f in feeders)), 60)
    entries = await redis.xrange(keys.prompts)
    seen = [(p.epoch, p.index) for p in (decode_prompt(e[b"d"]) for _, e in entries)]
    assert sorted(seen) == [(epoch, i) for epoch in (0, 1) for i in range(50)]  # each once, none missing
    assert sum(counts) == 100
    assert await feeders[0].position() == (2, 0)


async def test_resuming_with_another_dataset_is_refused(
    redis: aioredis.Redis, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    config = FeederConfig(path=str(write_jsonl(tmp_path / "d.jsonl", 3)))
    feeder = Feeder(redis, keys, bus_config, config, load_rows(config))
    await feeder._publish(0, 0, 0)
    other = FeederConfig(path=str(write_jsonl(tmp_path / "e.jsonl", 4)))
    with pytest.raises(MilesStreamError, match="written for 3 rows"):
        await Feeder(redis, keys, bus_config, other, load_rows(other)).run()


async def test_a_run_keeps_its_partition_count_and_a_partition_that_lost_its_data_is_not_fed_again(
    redis: aioredis.Redis, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    # a run fed without partitions is refused to a feeder with 3 (it would read positions never written and
    # feed the whole dataset again), and the reverse; found by review, reproduced before the fix
    config = FeederConfig(path=str(write_jsonl(tmp_path / "d.jsonl", 6)), max_queued=100)
    rows = load_rows(config)
    run = await join_run(redis, keys)

    def feeder(ns: str, n: int) -> Feeder:
        lanes = [(redis, k) for k in partition_keys(ns, n)] if n > 1 else []
        f = Feeder(redis, Keys(ns), replace(bus_config, namespace=ns, partitions=n), config, rows, lanes)
        f.run_identity = run if ns == keys.namespace else None
        return f

    one = feeder(keys.namespace, 1)
    assert await one.run() == 6
    with pytest.raises(MilesStreamError, match=r"fed with bus\.partitions=1; this feeder has 3"):
        await feeder(keys.namespace, 3).run()
    three = f"{keys.namespace}.three"
    assert await feeder(three, 3).run() == 6
    with pytest.raises(MilesStreamError, match=r"fed with bus\.partitions=3; this feeder has 1"):
        await feeder(three, 1).run()
    # partition 1 loses its data (its node's keys), the run's own slot keeps the run: a feeder started again
    # stops with the data loss instead of feeding that partition's share a second time
    lost = partition_keys(keys.namespace + ".lost", 3)
    run = await join_run(redis, Keys(keys.namespace + ".lost"))
    first = feeder(keys.namespace + ".lost", 3)
    first.run_identity = run
    assert await first.run() == 6
    await redis.delete(*[key async for key in redis.scan_iter(match=f"{lost[1].namespace}:*")])
    again = feeder(keys.namespace + ".lost", 3)
    again.run_identity = run
    with pytest.raises(DataLossError, match=r"lost this run's data"):
        await again.run()
    assert await redis.xlen(lost[1].prompts) == 0  # nothing fed again


async def test_every_process_and_tool_follows_the_partition_count_the_run_was_fed_with(
    redis: aioredis.Redis,
    redis_url: str,
    keys: Keys,
    bus_config: BusConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A trainer, producer or feeder given another bus.partitions than the run's is refused at start (it would read
    and commit keys the run never wrote), the run's being the count it was fed with or, before that, the first
    process's; reset-run given the wrong count still deletes every partition's keys."""
    config = FeederConfig(path=str(write_jsonl(tmp_path / "d.jsonl", 6)), max_queued=100)
    ns = keys.namespace
    await check_partitions(redis, keys, 3)  # nothing fed yet: the first process's count is the run's
    with pytest.raises(ConfigError, match=r"the first process of run .* came with 3 partition\(s\).* has 1"):
        await check_partitions(redis, keys, 1)  # a trainer left with the default 1 would wait on nothing
    one = Feeder(redis, keys, bus_config, config, load_rows(config))
    with pytest.raises(ConfigError, match=r"came with 3 partition\(s\).* has 1"):
        await one.run()  # the feeder too, before it writes anything
    assert await redis.xlen(keys.prompts) == 0 and await redis.get(f"{ns}:partitions") is None  # nothing fed
    lanes = [(redis, k) for k in partition_keys(ns, 3)]
    assert await Feeder(redis, keys, replace(bus_config, partitions=3), config, load_rows(config), lanes).run() == 6
    await check_partitions(redis, keys, 3)
    for wrong in (1, 2):
        with pytest.raises(
            ConfigError, match=rf"bus\.partitions: run '{ns}' was fed with 3 partition\(s\) .* has {wrong}"
        ):
            await check_partitions(redis, keys, wrong)
    assert [await redis.xlen(k.prompts) for k in partition_keys(ns, 3)] == [2, 2, 2]
    run = load_run_config(None, [f"redis.url={redis_url}", f"bus.namespace={ns}"])  # partitions: 1
    await admin.show_status(run, "", as_json=True, follow=False, interval_s=1.0)  # the run's count, not the config's
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)  # after any log lines
    assert {f"{k.namespace}:prompts" for k in partition_keys(ns, 3)} <= {s["key"] for s in shown["streams"]}
    code, said = await admin.reset_namespace(run, yes=True)
    assert code == 0 and said.startswith(f"namespace '{ns}': ")
    assert [key async for key in redis.scan_iter(match=f"{ns}.p*")] == []  # every partition's keys went too
    assert await redis.get(f"{ns}:partitions") is None  # the new run takes whatever count it is fed with
    await check_partitions(redis, keys, 1)


def test_parquet_and_chat_template(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["1+1=", "2+2="], "answer": ["2", "4"]}), tmp_path / "d.parquet")
    model = build_tiny_model(tmp_path / "model")
    config = FeederConfig(path=str(tmp_path / "d.parquet"), prompt_key="question", label_key="answer",
                          apply_chat_template=True, tokenizer=str(model))  # fmt: skip
    rows = load_rows(config)
    assert [(r.text, r.label) for r in rows] == [("1+1=", "2"), ("2+2=", "4")]  # the tiny template is the text


def test_bad_datasets_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_rows(FeederConfig(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "nokey.jsonl").write_text('{"prompt": "a"}\n\n{"question": "a"}\n')
    with pytest.raises(ConfigError, match=r"nokey\.jsonl:3 has no 'prompt' field"):  # the file's line, blank counted
        load_rows(FeederConfig(path=str(tmp_path / "nokey.jsonl")))
    (tmp_path / "dict.jsonl").write_text('{"prompt": "a"}\n{"prompt": {"a": 1}}\n')
    with pytest.raises(ConfigError, match=r"dict\.jsonl:2: 'prompt' must be a string, not dict"):
        load_rows(FeederConfig(path=str(tmp_path / "dict.jsonl")))
    with pytest.raises(ConfigError, match="is not a file"):
        load_rows(FeederConfig(path=str(tmp_path / "missing.jsonl")))


def test_prompt_records_round_trip_and_bad_ones_are_schema_errors() -> None:
    record = PromptRecord(key="3", text="1+2=", label="3", epoch=1, index=3)
    assert decode_prompt(encode_prompt(record)) == record
    for bad in (b"", b"\x93\x01\x02\x03", encode_prompt(record)[:-2]):
        with pytest.raises(SchemaError):
            decode_prompt(bad)


def test_cli_feed_publishes_the_dataset_and_exits(redis_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", 5)
    env = {**os.environ, "MILES_REDIS_URL": redis_url}
    out = subprocess.run(
        [sys.executable, "-m", "miles_stream.cli", "feed", "bus.namespace=clifeed", f"feeder.path={path}"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "feeder_stopped" in out.stderr
    import redis as sync_redis

    with sync_redis.Redis.from_url(redis_url) as client:
        assert client.xlen("clifeed:prompts") == 5
        assert client.hget("clifeed:feeder", "epoch") == b"1"
