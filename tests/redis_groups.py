"""Publishing prepared trajectory groups to a namespace, as a producer would (for process-level tests).
Importable from any test: the conftest beside it puts tests/ on sys.path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from miles_stream.bus import BusConfig, GroupPublisher, Keys, RedisConfig, open_stream_client
from miles_stream.schema import TrajectoryGroup


async def publish_groups(url: str, ns: str, items: Sequence[TrajectoryGroup]) -> None:
    data = open_stream_client(RedisConfig(url=url))
    try:
        publisher = GroupPublisher(data, Keys(ns).trajectories, BusConfig(namespace=ns))
        for g in items:
            await publisher.publish(g)
    finally:
        await data.aclose()


def done_total(client: Any, key: str) -> int:
    """Groups ever committed into done set `key`, with a synchronous redis client (`bus.done.done_count`)."""
    return int(client.zcard(key)) + int(client.hget(f"{key}:sweep", "forgotten") or 0)
