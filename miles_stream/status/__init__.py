"""A namespace at a glance: its streams, consumer groups, members and weight versions (`miles-stream status`).

It reads what the bus and the weights keep, so it sits above both (docs/architecture.md)."""

from miles_stream.status.snapshot import GroupStatus, NamespaceStatus, StreamStatus, namespace_status
from miles_stream.status.view import render_json, render_tables, watch

__all__ = [
    "GroupStatus",
    "NamespaceStatus",
    "StreamStatus",
    "namespace_status",
    "render_json",
    "render_tables",
    "watch",
]
