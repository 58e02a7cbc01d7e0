"""The stream bus: Redis Streams with consumer groups, dead letters, backpressure and heartbeats."""

from miles_stream.bus.backpressure import Backlog, Backpressure, stream_backlog
from miles_stream.bus.connection import RedisConfig, RetryPolicy, connect, redact, wait_until_reachable
from miles_stream.bus.dataplane import StreamClient, open_stream_client
from miles_stream.bus.groups import Claim, GroupConsumer, GroupPublisher, Received, Ticket
from miles_stream.bus.heartbeat import Heartbeat, Member, alive_members
from miles_stream.bus.keys import Keys
from miles_stream.bus.streams import BusConfig, Entry, StreamConsumer, ensure_group, publish, trim_acknowledged

__all__ = [
    "Backlog",
    "Backpressure",
    "BusConfig",
    "Claim",
    "Entry",
    "GroupConsumer",
    "GroupPublisher",
    "Heartbeat",
    "Keys",
    "Member",
    "Received",
    "RedisConfig",
    "RetryPolicy",
    "StreamClient",
    "StreamConsumer",
    "Ticket",
    "alive_members",
    "connect",
    "ensure_group",
    "open_stream_client",
    "publish",
    "redact",
    "stream_backlog",
    "trim_acknowledged",
    "wait_until_reachable",
]
