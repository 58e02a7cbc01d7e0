"""The off-policy replay buffer: trajectory stream in, training batches out (staleness, filters, capacity)."""

from miles_stream.buffer.config import BufferConfig
from miles_stream.buffer.filters import FILTERS, DynamicFilter
from miles_stream.buffer.micro import plan_micro_batches
from miles_stream.buffer.replay import Batch, BufferCounters, GroupSource, ReplayBuffer

__all__ = [
    "FILTERS",
    "Batch",
    "BufferConfig",
    "BufferCounters",
    "DynamicFilter",
    "GroupSource",
    "ReplayBuffer",
    "plan_micro_batches",
]
