"""`miles-stream record`: a recorder. Writes every trajectory entry (of every partition) to rotating compressed
files."""

from __future__ import annotations

import asyncio
import socket

import structlog

from miles_stream import aio
from miles_stream.bus import Heartbeat, Keys, StreamConsumer, connect, open_stream_client, wait_until_reachable
from miles_stream.bus.blobs import blobs_for
from miles_stream.bus.keys import partition_keys
from miles_stream.bus.partitioned import close_partition_clients, partition_clients
from miles_stream.bus.run import check_partitions
from miles_stream.metrics_http import MetricsServer
from miles_stream.record import RecordingWriter
from miles_stream.record.recorder import record_partitions
from miles_stream.run_config import RunConfig
from miles_stream.status.exporter import combine, consumer_metrics, recorder_metrics

log = structlog.get_logger("consumers.recorder")


def main(config: RunConfig, *, out: str, max_file_mb: int, name: str = "") -> int:
    name = name or f"recorder-{socket.gethostname()}"
    return aio.run_process(lambda stop: _run(config, out, max_file_mb, name, stop), what="the recorder")


async def _run(config: RunConfig, out: str, max_file_mb: int, name: str, stop: asyncio.Event) -> int:
    """Record the trajectory stream, or every partition's (each into files of its own, record/recorder.py)."""
    keys = Keys(config.bus.namespace)
    redis = connect(config.redis)
    parts = partition_keys(keys.namespace, config.bus.partitions)
    clients = partition_clients(config.redis, parts, redis)
    # a blocking client for each partition: their reads wait side by side, one connection each
    blocking = [open_stream_client(config.redis, block_ms=config.bus.block_ms) for _ in parts]
    streams = [StreamConsumer(c, b, stream=k.trajectories, group="recorder", consumer=name, dead_stream=k.dead,
                              config=config.bus, observer=True)
               for c, b, k in zip(clients, blocking, parts, strict=True)]  # fmt: skip
    writers = [RecordingWriter(out, namespace=k.namespace, stream=k.trajectories, max_file_bytes=max_file_mb << 20)
               for k in parts]  # fmt: skip

    def records() -> int:
        return sum(w.records for w in writers)

    try:
        await wait_until_reachable(redis, config.redis, stop)
        await check_partitions(redis, keys, config.bus.partitions)
        exported = combine(recorder_metrics(records), consumer_metrics("recorder", streams))
        async with (
            MetricsServer(config.metrics, exported),
            Heartbeat(redis, keys, role="recorder", member_id=name, config=config.bus,
                      describe=lambda: {"records": records()}),
        ):  # fmt: skip
            await record_partitions(streams, writers, stop, blobs=blobs_for(config.bus))
    finally:
        for client in blocking:
            await client.aclose()
        await close_partition_clients(clients, redis)
        await redis.aclose()
    return 0
