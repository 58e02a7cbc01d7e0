"""`miles-stream feed`: publish a prompt dataset to {ns}:prompts, resuming where the last run stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import structlog

from miles_stream import aio
from miles_stream.bus import Heartbeat, Keys, connect
from miles_stream.bus.run import join_run
from miles_stream.feeder import Feeder, Row, load_rows
from miles_stream.run_config import RunConfig

log = structlog.get_logger("producers.feeder")


def main(config: RunConfig) -> int:
    rows = load_rows(config.feeder)
    log.info("dataset_loaded", path=config.feeder.path, rows=len(rows))
    return aio.run(_run(config, rows))


async def _run(config: RunConfig, rows: list[Row]) -> int:
    keys = Keys(config.bus.namespace)
    redis = connect(config.redis)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    feeder = Feeder(redis, keys, config.bus, config.feeder, rows)
    member = f"{socket.gethostname()}-{os.getpid()}"
    try:
        feeder.run_identity = run = await join_run(redis, keys)
        describe = lambda: {"published": feeder.published}  # noqa: E731
        async with Heartbeat(redis, keys, role="feeder", member_id=member, config=config.bus, run=run,
                             on_data_loss=stop.set, describe=describe) as beat:  # fmt: skip
            published = await feeder.run(stop)
        if beat.data_lost is not None:
            raise beat.data_lost
        epoch, position = await feeder.position()
        log.info("feeder_stopped", published=published, epoch=epoch, position=position)
    finally:
        await redis.aclose()
    return 0
