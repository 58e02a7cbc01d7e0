"""Large groups travel through a blob store, the stream entry naming the blob (`bus/blobs.py`): read back intact,
a missing or altered blob dead-lettered with its reason, blobs deleted once their entries are trimmed (and
those a dead publisher left), on a directory and on an S3 API (moto's, in process)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from miles_stream.bus import BusConfig, GroupConsumer, GroupPublisher, Keys, StreamClient, StreamConsumer
from miles_stream.bus.blobs import BLOB, Blobs, FileBlobStore, S3BlobStore, blob_name, put_ms
from miles_stream.bus.done import server_ms
from miles_stream.testing.synthetic import synthetic_group

pytestmark = pytest.mark.integration


def blob_bus(bus_config: BusConfig, store: str, **extra: object) -> BusConfig:
    return dataclasses.replace(bus_config, blob_store=store, blob_threshold_bytes=4096, **extra)  # type: ignore[arg-type]


def trainer(redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus: BusConfig) -> GroupConsumer:
    return GroupConsumer(StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                                        dead_stream=keys.dead, config=bus), keys)  # fmt: skip


async def read_all(consumer: GroupConsumer, want: int) -> list:
    got: list = []
    for _ in range(200):
        got += await consumer.read(want)
        if len(got) + consumer.counters.dead_lettered >= want:
            break
    return got


async def test_a_large_group_travels_as_a_blob_and_a_small_one_inline(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    bus = blob_bus(bus_config, str(tmp_path))
    big = synthetic_group(np.random.default_rng(0), group_id="big", routing_layers=4)
    small = synthetic_group(np.random.default_rng(1), group_id="small", n_samples=1, response_len=4, prompt_len=4)
    publisher = GroupPublisher(blocking, keys.trajectories, bus)
    consumer = trainer(redis, blocking, keys, bus)
    await consumer.start()
    _, nbytes = await publisher.publish(big)  # type: ignore[misc]
    await publisher.publish(small)
    entries = await redis.xrange(keys.trajectories)
    assert entries[0][1][BLOB] and entries[0][1][b"d"] == b""  # the big one names its blob ...
    assert BLOB not in entries[1][1] and len(entries[1][1][b"d"]) < 4096  # ... the small one carries itself
    assert [len(await FileBlobStore(tmp_path).get(n)) for n in await FileBlobStore(tmp_path).names()] == [nbytes]
    got = await read_all(consumer, 2)
    assert [r.group_id for r in got] == ["big", "small"] and got[0].nbytes == nbytes
    for a, b in zip(got[0].group.samples, big.samples, strict=True):
        assert np.array_equal(a.response_ids, b.response_ids) and np.array_equal(a.routing, b.routing)


@pytest.mark.parametrize("damage", ["missing", "altered", "no store here"])
async def test_a_blob_missing_or_altered_is_dead_lettered_with_its_reason(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path, damage: str
) -> None:
    bus = blob_bus(bus_config, str(tmp_path))
    await GroupPublisher(blocking, keys.trajectories, bus).publish(synthetic_group(np.random.default_rng(0)))
    (name,) = await FileBlobStore(tmp_path).names()
    if damage == "missing":
        await FileBlobStore(tmp_path).delete([name])
    elif damage == "altered":
        data = await FileBlobStore(tmp_path).get(name)
        await FileBlobStore(tmp_path).put(name, [data[:-1], b"x"])
    consumer = trainer(redis, blocking, keys, bus if damage != "no store here" else bus_config)
    await consumer.start()
    assert await read_all(consumer, 1) == []
    reason = (await redis.xrange(keys.dead))[0][1][b"reason"].decode()
    expected = {"missing": "is missing from", "altered": "does not match its checksum",
                "no store here": "this process has no bus.blob_store"}[damage]  # fmt: skip
    assert reason.startswith("schema: blob") or reason.startswith("schema: the entry names blob")
    assert expected in reason


async def test_blobs_are_deleted_once_trimmed_and_left_ones_too_but_not_while_an_entry_needs_them(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    bus = blob_bus(bus_config, str(tmp_path), blob_grace_s=0.2)
    store = FileBlobStore(tmp_path)
    publisher = GroupPublisher(blocking, keys.trajectories, bus)
    consumer = trainer(redis, blocking, keys, bus)
    await consumer.start()
    orphan = blob_name([b"never published"])  # a publisher that died between its put and its XADD
    await store.put(orphan, [b"never published"])
    await publisher.publish(synthetic_group(np.random.default_rng(0), group_id="g0"))
    deadline = time.monotonic() + 30
    while await server_ms(redis, f"{keys.namespace}:clock") <= max(map(put_ms, await store.names())) + 200:  # type: ignore[type-var]
        assert time.monotonic() < deadline, "Redis's clock did not pass the margin"
        await asyncio.sleep(0.02)
    await publisher.publish(synthetic_group(np.random.default_rng(1), group_id="g1"))  # a margin later
    first, second = await read_all(consumer, 2)
    blobs = Blobs(store, threshold_bytes=4096, grace_s=0.2)
    assert await blobs.sweep(redis, keys.trajectories) == 0  # g0 not acked yet: everything is needed
    await consumer.commit([first])  # the second stays pending: its entry, and its blob, are needed
    await consumer.stream.maybe_trim()
    assert await blobs.sweep(redis, keys.trajectories) == 2  # g0's blob and the orphan
    (kept,) = await store.names()
    assert await blobs.get(kept)  # g1's, still readable
    await consumer.commit([second])


@pytest.fixture
def s3() -> Iterator[S3BlobStore]:
    moto = pytest.importorskip("moto", reason="moto is a dev dependency (pyproject [dev])")
    with moto.mock_aws():
        store = S3BlobStore("runs", "ns1/blobs")
        store.client.create_bucket(Bucket="runs")
        yield store


async def test_the_s3_store_puts_gets_lists_and_deletes(s3: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    name = blob_name([b"abc", b"def"])
    await s3.put(name, [b"abc", b"def"])
    assert await s3.names() == [name]
    assert await Blobs(s3, threshold_bytes=1, grace_s=1).get(name) == b"abcdef"
    await s3.delete([name])
    assert await s3.names() == []
    with pytest.raises(Exception, match="missing from s3://runs/ns1/blobs/"):
        await s3.get(name)
