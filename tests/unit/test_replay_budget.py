"""The replay buffer's `read_per_batch`, which producers size their admission budget by: filtered groups
count (a version uses them up), stale ones do not (counting them grew the budget with every overshoot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from miles_stream.buffer import BufferConfig, ReplayBuffer
from miles_stream.bus.groups import Received
from miles_stream.testing.synthetic import synthetic_group


class Groups:
    """A `GroupSource` over a fixed list (the buffer's own protocol; no stream)."""

    keep_alive_interval_s = 3600.0

    def __init__(self, groups: Sequence[Received]) -> None:
        self.todo, self.exhausted = list(groups), False

    async def start(self) -> None: ...

    async def read(self, count: int) -> list[Received]:
        out, self.todo = self.todo[:count], self.todo[count:]
        self.exhausted = not self.todo
        return out

    async def still_held(self, items: Sequence[Received]) -> list[Received]:
        return list(items)

    async def commit(self, items: Sequence[object]) -> None: ...

    async def release(self, items: Sequence[object], reason: str) -> None: ...

    async def requeue_prompts(self, items: Sequence[object]) -> int:
        return 0

    async def keep_alive(self) -> None: ...


def group(i: int, version: int, *, signal: bool = True) -> Received:
    g = synthetic_group(np.random.default_rng(i), n_samples=2, prompt_len=3, response_len=2, vocab=20,
                        version=version, group_id=f"g{i}", prompt_key=str(i))  # fmt: skip
    samples = tuple(replace(s, reward=float(k % 2) if signal else 1.0) for k, s in enumerate(g.samples))
    return Received(f"0-{i}", replace(g, samples=samples), 100)


async def test_a_batch_costs_its_filtered_groups_and_not_its_stale_ones() -> None:
    # version 5, staleness 1: two groups of version 3 are stale, one without signal is filtered
    source = Groups([group(0, 3), group(1, 5), group(2, 3), group(3, 5, signal=False), group(4, 4)])
    buffer = ReplayBuffer(source, BufferConfig(rollout_batch_size=2, max_staleness=1, read_count=8))  # type: ignore[arg-type]
    batch = await buffer.next_batch(5)
    assert batch is not None and [r.group_id for r in batch.items] == ["g1", "g4"]
    assert buffer.counters.stale_dropped == 2 and buffer.counters.received == 5
    assert buffer.counters.read_per_batch == 3.0  # two trained and one filtered
    # the tokens each fate cost: 5 groups of 2 samples of 2 response tokens
    c = buffer.counters
    assert (c.response_tokens, c.stale_tokens, c.filtered_tokens) == (20, 8, 4)
