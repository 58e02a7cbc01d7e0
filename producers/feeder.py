"""`miles-stream feed`: publish a prompt dataset to {ns}:prompts (or its partitions), resuming where the last run
stopped."""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

from miles_stream import aio
from miles_stream.bus import Heartbeat, Keys, connect, wait_until_reachable
from miles_stream.bus.connection import is_transient
from miles_stream.bus.keys import partition_keys
from miles_stream.bus.partitioned import close_partition_clients, partition_clients
from miles_stream.bus.run import join_run
from miles_stream.feeder import Feeder, Row, load_rows
from miles_stream.metrics_http import MetricsServer
from miles_stream.run_config import RunConfig
from miles_stream.status.exporter import feeder_metrics

log = structlog.get_logger("producers.feeder")


def main(config: RunConfig) -> int:
    rows = load_rows(config.feeder)
    log.info("dataset_loaded", path=config.feeder.path, rows=len(rows))
    return aio.run_process(lambda stop: _run(config, rows, stop), what="the feeder")


async def _run(config: RunConfig, rows: list[Row], stop: asyncio.Event) -> int:
    keys = Keys(config.bus.namespace)
    redis = connect(config.redis)
    parts = partition_keys(keys.namespace, config.bus.partitions)
    clients = partition_clients(config.redis, parts, redis)  # each partition's prompts, in its own slot
    feeder = Feeder(redis, keys, config.bus, config.feeder, rows, lanes=list(zip(clients, parts, strict=True)))
    member = f"{socket.gethostname()}-{os.getpid()}"
    try:
        await wait_until_reachable(redis, config.redis, stop)
        feeder.run_identity = run = await join_run(redis, keys)
        describe = lambda: {"published": feeder.published}  # noqa: E731
        async with (
            MetricsServer(config.metrics, feeder_metrics(feeder)),
            Heartbeat(redis, keys, role="feeder", member_id=member, config=config.bus, run=run,
                      on_data_loss=stop.set, describe=describe) as beat,
        ):  # fmt: skip
            published = await feeder.run(stop)
        if beat.data_lost is not None:
            raise beat.data_lost
        try:
            epoch, position = await feeder.position()
        except Exception as exc:  # stopped in an outage: what was published is in Redis, the position too
            if not is_transient(exc):
                raise
            epoch, position = -1, -1
        log.info("feeder_stopped", published=published, epoch=epoch, position=position)
    finally:
        await close_partition_clients(clients, redis)
        await redis.aclose()
    return 0
