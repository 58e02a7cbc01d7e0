"""`miles-stream record`: a recorder. Writes every trajectory entry to rotating compressed files."""

from __future__ import annotations

import asyncio
import signal
import socket

import structlog

from miles_stream import aio
from miles_stream.bus import Heartbeat, Keys, StreamConsumer, connect, open_stream_client
from miles_stream.record import RecordingWriter
from miles_stream.record.recorder import record
from miles_stream.run_config import RunConfig

log = structlog.get_logger("consumers.recorder")


def main(config: RunConfig, *, out: str, max_file_mb: int, name: str = "") -> int:
    return aio.run(_run(config, out, max_file_mb, name or f"recorder-{socket.gethostname()}"))


async def _run(config: RunConfig, out: str, max_file_mb: int, name: str) -> int:
    keys = Keys(config.bus.namespace)
    redis, blocking = connect(config.redis), open_stream_client(config.redis, block_ms=config.bus.block_ms)
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="recorder", consumer=name,
                            dead_stream=keys.dead, config=config.bus, observer=True)  # fmt: skip
    writer = RecordingWriter(out, namespace=keys.namespace, stream=keys.trajectories,
                             max_file_bytes=max_file_mb << 20)  # fmt: skip
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        async with Heartbeat(redis, keys, role="recorder", member_id=name, config=config.bus,
                             describe=lambda: {"records": writer.records}):  # fmt: skip
            await record(stream, writer, stop)
    finally:
        await blocking.aclose()
        await redis.aclose()
    return 0
