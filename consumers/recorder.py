"""`miles-stream record`: a recorder. Writes every trajectory entry to rotating compressed files."""

from __future__ import annotations

import asyncio
import socket

import structlog

from miles_stream import aio
from miles_stream.bus import Heartbeat, Keys, StreamConsumer, connect, open_stream_client, wait_until_reachable
from miles_stream.bus.blobs import blobs_for
from miles_stream.errors import ConfigError
from miles_stream.metrics_http import MetricsServer
from miles_stream.record import RecordingWriter
from miles_stream.record.recorder import record
from miles_stream.run_config import RunConfig
from miles_stream.status.exporter import combine, consumer_metrics, recorder_metrics

log = structlog.get_logger("consumers.recorder")


def main(config: RunConfig, *, out: str, max_file_mb: int, name: str = "") -> int:
    if config.bus.partitions > 1:
        raise ConfigError(f"the recorder reads one trajectory stream: not built for bus.partitions="
                          f"{config.bus.partitions}")  # fmt: skip
    name = name or f"recorder-{socket.gethostname()}"
    return aio.run_process(lambda stop: _run(config, out, max_file_mb, name, stop), what="the recorder")


async def _run(config: RunConfig, out: str, max_file_mb: int, name: str, stop: asyncio.Event) -> int:
    keys = Keys(config.bus.namespace)
    redis, blocking = connect(config.redis), open_stream_client(config.redis, block_ms=config.bus.block_ms)
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="recorder", consumer=name,
                            dead_stream=keys.dead, config=config.bus, observer=True)  # fmt: skip
    writer = RecordingWriter(out, namespace=keys.namespace, stream=keys.trajectories,
                             max_file_bytes=max_file_mb << 20)  # fmt: skip
    try:
        await wait_until_reachable(redis, config.redis, stop)
        exported = combine(recorder_metrics(lambda: writer.records), consumer_metrics("recorder", [stream]))
        async with (
            MetricsServer(config.metrics, exported),
            Heartbeat(redis, keys, role="recorder", member_id=name, config=config.bus,
                      describe=lambda: {"records": writer.records}),
        ):  # fmt: skip
            await record(stream, writer, stop, blobs=blobs_for(config.bus))
    finally:
        await blocking.aclose()
        await redis.aclose()
    return 0
