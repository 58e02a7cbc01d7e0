"""Weight handoff without blocking: the background publisher (one version in flight, the newest waiting), the
admission budget's arithmetic, and the cuda_ipc transport's layout and checksum (its device path: GPU tests)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from miles_stream.errors import ConfigError
from miles_stream.rollout.admission import Budget
from miles_stream.trainer.config import TrainerConfig
from miles_stream.weights.background import BackgroundPublisher
from miles_stream.weights.cuda_ipc import _layout, _views, word_sum


class GatedPublisher:
    """Stands in for WeightPublisher: each publish waits until the test lets it finish."""

    def __init__(self) -> None:
        self.started: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.gates: list[asyncio.Event] = []
        self.fail_next = False

    async def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        self.started.append((version, {k: v.clone() for k, v in state.items()}))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail_next:
            raise RuntimeError("transport broke")


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0)


async def test_offer_returns_at_once_and_the_newest_waiting_version_wins() -> None:
    fake = GatedPublisher()
    background = BackgroundPublisher(fake)  # type: ignore[arg-type]
    w = torch.zeros(4)
    background.offer(1, {"w": w})
    await until(lambda: len(fake.started) == 1)
    w += 2
    background.offer(2, {"w": w})  # waits behind version 1
    w += 1
    background.offer(3, {"w": w})  # replaces version 2, which is never published
    w += 100  # the trainer's next step: what was offered is a snapshot, not the live tensor
    assert background.busy and background.stats.skipped == 1
    fake.gates[0].set()
    await until(lambda: len(fake.started) == 2)
    assert [v for v, _ in fake.started] == [1, 3]
    assert torch.equal(fake.started[0][1]["w"], torch.zeros(4))
    assert torch.equal(fake.started[1][1]["w"], torch.full((4,), 3.0))
    fake.gates[1].set()
    await background.flush()
    assert background.stats.published == 2 and not background.busy


async def test_snapshots_are_reused_not_reallocated() -> None:
    fake = GatedPublisher()
    background = BackgroundPublisher(fake)  # type: ignore[arg-type]
    for v in range(1, 4):
        background.offer(v, {"w": torch.full((3,), float(v))})
        await until(lambda v=v: len(fake.started) == v)
        fake.gates[-1].set()
        await background.flush()
    assert len(background._free) == 1  # one snapshot, used three times
    assert [float(s["w"][0]) for _, s in fake.started] == [1.0, 2.0, 3.0]


async def test_a_host_snapshot_is_published_and_reused() -> None:
    """`trainer.publish_snapshot: host`: the snapshots live in host memory (pinned where the model is on CUDA:
    not run here, this machine has no GPU), the values are the ones offered, and the snapshot is reused."""
    fake = GatedPublisher()
    background = BackgroundPublisher(fake, on_host=True)  # type: ignore[arg-type]
    for v in range(1, 3):
        background.offer(v, {"w": torch.full((3,), float(v)), "n": torch.tensor([v])}, dtype=torch.bfloat16)
        await until(lambda v=v: len(fake.started) == v)
        fake.gates[-1].set()
        await background.flush()
    assert [float(s["w"][0]) for _, s in fake.started] == [1.0, 2.0]
    snapshot = fake.started[-1][1]
    assert snapshot["w"].device.type == "cpu" and snapshot["w"].dtype == torch.bfloat16
    assert snapshot["n"].dtype == torch.int64  # only floating tensors are cast
    assert len(background._free) == 1
    with pytest.raises(ConfigError, match=r"trainer\.publish_snapshot: host needs the redis or file transport"):
        TrainerConfig(publish_snapshot="host", transport="cuda_ipc")


async def test_a_failed_publication_is_raised_to_the_trainer() -> None:
    fake = GatedPublisher()
    fake.fail_next = True
    background = BackgroundPublisher(fake)  # type: ignore[arg-type]
    background.offer(1, {"w": torch.zeros(2)})
    await until(lambda: len(fake.started) == 1)
    fake.gates[0].set()
    with pytest.raises(RuntimeError, match="transport broke"):
        await background.flush()
    with pytest.raises(RuntimeError, match="transport broke"):
        background.offer(2, {"w": torch.zeros(2)})


def test_budget_counts_versions_the_trainer_is_ahead() -> None:
    sync = Budget(staleness=0, per_version=8, trainer_version=5, queued=0, others_in_flight=0)
    assert sync.room(0, own_version=5) == 8  # a batch under the current version
    assert sync.room(3, own_version=5) == 5
    assert sync.room(0, own_version=4) == 0  # the trainer has moved on: anything started now is stale
    lagged = Budget(staleness=2, per_version=8, trainer_version=5, queued=6, others_in_flight=2)
    assert lagged.limit(own_version=5) == 24 and lagged.room(1, own_version=5) == 15
    assert lagged.limit(own_version=4) == 16 and lagged.limit(own_version=3) == 8 and lagged.limit(2) == 0
    assert lagged.limit(own_version=7) == 24  # a producer ahead of the heartbeat it read counts as current
    over = Budget(staleness=1, per_version=10, trainer_version=0, queued=0, others_in_flight=0, over_sampling=1.5)
    assert over.limit(own_version=0) == 30
    assert Budget(None, 0.0, 0, 5, 5).room(100, own_version=0) is None  # no trainer sets a bound


def test_ipc_layout_views_round_trip_and_the_word_sum_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).to(torch.bfloat16),
             "c": torch.randint(0, 100, (2, 3), generator=gen)}  # fmt: skip
    tensors, size = _layout(state)
    assert size % 256 == 0 and all(t.offset % 256 == 0 for t in tensors)
    flat = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)  # poisoned: every view written
    views = _views(flat, tensors)
    for name, t in state.items():
        views[name].copy_(t)
    for name, t in _views(flat, tensors).items():
        assert torch.equal(t, state[name])
    odd = torch.randint(0, 256, (4 * 1000 + 3,), dtype=torch.uint8, generator=gen)
    words = [int.from_bytes(bytes(odd[i : i + 4].tolist()), "little", signed=True) for i in range(0, 4000, 4)]
    assert word_sum(odd) == sum(words) + sum(odd[4000:].tolist())
    before = word_sum(flat)
    flat[size // 2] ^= 1
    assert word_sum(flat) != before  # one bit moved: the sum moves
