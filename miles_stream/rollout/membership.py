"""Which servers a producer's engine drives (SGLang: `engines/base.ServerPool`), kept in Redis so they can
change while it runs.

`{ns}:sglang:{producer_id}` is a set of URLs (`miles-stream sglang --attach | --detach URL`). The producer adds its
configured servers at start, then every `health_interval_s` attaches what is new (waiting for health and
syncing weights, in the background) and detaches what was removed (draining first).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import structlog

from miles_stream.bus.connection import is_transient
from miles_stream.engines.base import ServerPool

log = structlog.get_logger(__name__)


async def follow_membership(redis: aioredis.Redis, key: str, engine: ServerPool, interval_s: float) -> None:
    attaching: dict[str, asyncio.Task[None]] = {}
    while True:
        try:
            members: Any = await redis.smembers(key)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("sglang_membership_read_failed", error=str(exc))
            members = None
        if members is not None:
            wanted = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
            for url in sorted(wanted - set(engine.servers) - set(attaching)):
                attaching[url] = asyncio.create_task(engine.attach(url), name=f"attach {url}")
            for url in sorted(set(engine.servers) - wanted):
                await engine.detach(url)
        for url, task in list(attaching.items()):
            if task.done():
                del attaching[url]
                if not task.cancelled() and (error := task.exception()) is not None:
                    log.error("sglang_attach_failed", url=url, error=str(error))  # tried again next round
        await asyncio.sleep(interval_s)
