"""An observer (the recorder) never stops the run it observes: its backlog does not hold producers back, and a
dead one does not hold the stream either; when it comes back, it says how many entries it missed."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from miles_stream.bus import Backpressure, BusConfig, GroupConsumer, GroupPublisher, Keys, StreamClient, StreamConsumer
from miles_stream.errors import RecordingError
from miles_stream.record import RecordingWriter, read_recording, recording_files
from miles_stream.record.recorder import record
from miles_stream.testing.synthetic import synthetic_group

RNG = np.random.default_rng(0)


async def until(condition: Callable[[], object], timeout_s: float = 30.0, what: str = "") -> None:
    """Poll `condition()` (sync or async) until it holds; fail after `timeout_s` (a bound, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = condition()
        if asyncio.iscoroutine(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


def recorder_stream(redis: aioredis.Redis, blocking: StreamClient, keys: Keys, config: BusConfig) -> StreamConsumer:
    return StreamConsumer(redis, blocking, stream=keys.trajectories, group="recorder", consumer="rec",
                          dead_stream=keys.dead, config=config, observer=True)  # fmt: skip


async def test_a_dead_recorder_neither_blocks_producers_nor_holds_the_stream(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    # claim_idle_ms is what makes an observer dead (no consumer of its group has read for that long): long
    # enough that a live recorder on a busy CPU is never taken for dead, short enough for a test.
    config = dataclasses.replace(bus_config, max_backlog_entries=20, backpressure_poll_s=0.02, claim_idle_ms=1500)
    trainer = GroupConsumer(StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer",
                                           consumer="t", dead_stream=keys.dead, config=config), keys)  # fmt: skip
    await trainer.start()
    publisher = GroupPublisher(blocking, keys.trajectories, config,
                               backpressure=Backpressure(redis, keys.trajectories, config))  # fmt: skip

    # The recorder records the first 5 groups, then its disk fills: it dies with its group left behind.
    writer = RecordingWriter(tmp_path / "a", namespace=keys.namespace, stream=keys.trajectories)
    write, writes = writer.write, []

    def write_until_full(records: object) -> None:
        if sum(writes) >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        records = list(records)  # type: ignore[call-overload]
        write(records)
        writes.append(len(records))

    writer.write = write_until_full  # type: ignore[method-assign]
    recorder = asyncio.create_task(record(recorder_stream(redis, blocking, keys, config), writer, asyncio.Event()))
    for _ in range(5):
        await publisher.publish(synthetic_group(RNG), wait_s=10)
    await until(lambda: sum(writes) >= 5, what="the first 5 groups recorded")
    more = [await publisher.publish(synthetic_group(RNG), wait_s=10) for _ in range(3)]
    await until(recorder.done, what="the recorder dead of a full disk")
    assert isinstance(recorder.exception(), RecordingError)  # names its directory (tests/faults/test_full_disk.py)

    # Training goes on: producers publish 3x the backlog bound while the trainer keeps up; before, the dead
    # recorder's lag reached the bound and every producer blocked (BackpressureTimeout here).
    stop = asyncio.Event()

    async def train() -> None:
        while not stop.is_set():
            await trainer.commit(await trainer.read(100, block_ms=20))

    training = asyncio.create_task(train())
    try:
        for _ in range(3 * config.max_backlog_entries):
            await publisher.publish(synthetic_group(RNG), wait_s=10)
        total = 5 + len(more) + 3 * config.max_backlog_entries
        await until(lambda: trainer.counters.committed == total, what="every group trained")

        # Nor does the dead recorder hold the stream: once it has been silent for claim_idle_ms, what the
        # trainer acknowledged is trimmed (before, the stream kept everything after the recorder's position).
        async def trimmed() -> bool:
            await trainer.stream.maybe_trim()
            return bool(await redis.xlen(keys.trajectories) == 0)

        await until(trimmed, what="the stream trimmed past the dead recorder")

        # Restarted (disk freed), the recorder says how many entries it missed (it counts as dead until its
        # first read), then records what comes next.
        back = recorder_stream(redis, blocking, keys, config)
        writer_b = RecordingWriter(tmp_path / "b", namespace=keys.namespace, stream=keys.trajectories)
        stop_b = asyncio.Event()
        recorder_b = asyncio.create_task(record(back, writer_b, stop_b))
        await until(lambda: back.trimmed_unread >= total - 5, what="the restarted recorder reports its gap")
        for _ in range(3):
            await publisher.publish(synthetic_group(RNG), wait_s=10)
        await until(lambda: writer_b.records == 3, what="the restarted recorder records what comes next")
        stop_b.set()
        await asyncio.wait_for(recorder_b, 10)
        assert back.trimmed_unread == total - 5  # the 3 it had read when its disk filled, and all after
    finally:
        stop.set()
        await training
    recorded = [r for f in recording_files([tmp_path / "b"]) for r in read_recording(f)]
    assert len(recorded) == 3
