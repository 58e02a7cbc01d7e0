"""Weight publication off the training loop: the trainer hands a version over and goes on with its next step.

    trainer step ──offer(v, state)──► copy into a free snapshot (on the model's device, or in pinned host memory)
                                        │  none in flight: start publishing it
                                        │  one in flight: it waits as `pending`; a newer offer replaces it
                                        ▼
    background task: WeightPublisher.publish(v) ─► then the pending snapshot, if any ─► idle

At most one version is in flight and one waits, so the trainer holds at most two snapshots of its weights
besides the model. When publication is slower than training, intermediate versions are skipped (counted):
producers follow the newest version anyway, and versions only ever increase. The never-partial rule and the
checksums are the transport's, unchanged: a snapshot is never written to while it is published. The time the
trainer spends in `offer` (the copy) is what publication blocks it; `flush` waits until the newest version
offered is announced (before the trainer exits, and where a caller needs it out).

`on_host` (`trainer.publish_snapshot: host`) keeps the snapshots in pinned host memory instead of on the GPU:
the copy is queued device-to-host behind the step and the publication waits for it (a CUDA event), so the
trainer blocks no longer than for a device copy, and its GPU never holds the model a second time. The price is
host memory (2 B a parameter per snapshot in bf16) and PCIe bandwidth, which the redis and file transports
spend anyway: they read the snapshot through host memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog
import torch

from miles_stream.weights.versions import WeightPublisher

log = structlog.get_logger(__name__)
Snapshot = dict[str, torch.Tensor]


@dataclass(slots=True)
class PublishStats:
    published: int = 0
    skipped: int = 0  # versions replaced by a newer one before their turn
    last_publish_s: float = 0.0  # how long the last publication took, in the background
    blocked_s: float = 0.0  # total time `offer` held the trainer


@dataclass(slots=True)
class BackgroundPublisher:
    publisher: WeightPublisher
    on_host: bool = False  # snapshots in (pinned) host memory rather than on the model's device
    stats: PublishStats = field(default_factory=PublishStats)
    _free: list[Snapshot] = field(default_factory=list)
    _pending: tuple[int, Snapshot] | None = None
    _copied: torch.cuda.Event | None = None  # with on_host on CUDA: when the pending snapshot's copies are done
    _task: asyncio.Task[None] | None = None
    _failure: BaseException | None = None

    def offer(self, version: int, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> float:
        """Snapshot `state` as `version` (floating tensors cast to `dtype` if given: float32 main params
        published as bf16) and have it published; returns the seconds this took (the trainer's blocked time).
        Raises the error of an earlier publication that failed."""
        if self._failure is not None:
            raise self._failure
        started = time.perf_counter()
        if self._pending is not None:  # the waiting one is superseded: reuse its snapshot
            self.stats.skipped += 1
            log.info("weights_version_skipped", version=self._pending[0], newer=version)
            snapshot = self._pending[1]
        else:
            snapshot = self._free.pop() if self._free else {}
        _copy_into(snapshot, state, dtype, torch.device("cpu") if self.on_host else None)
        self._copied = _event_after_copies(snapshot) if self.on_host else None
        self._pending = (version, snapshot)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="weights-publisher")
        blocked = time.perf_counter() - started
        self.stats.blocked_s += blocked
        return blocked

    async def flush(self) -> None:
        """Wait until every offered version is published (or skipped); raise a publication's failure."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._failure is not None:
            raise self._failure

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        try:
            while self._pending is not None:
                version, snapshot = self._pending
                copied, self._pending, self._copied = self._copied, None, None
                if copied is not None:  # device-to-host copies still queued behind the step: wait off the loop
                    await asyncio.to_thread(copied.synchronize)
                started = time.perf_counter()
                await self.publisher.publish(version, snapshot)
                self.stats.last_publish_s = time.perf_counter() - started
                self.stats.published += 1
                self._free.append(snapshot)
        except Exception as exc:  # reported to the trainer at its next offer or flush (not raised here: a
            self._failure = exc  # trainer that stops without either would leave it "never retrieved")
            log.error("weights_publish_failed", error=repr(exc))


def _copy_into(
    snapshot: Snapshot, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | None
) -> None:
    """Copy every tensor of `state` into `snapshot` (on `device`, else each tensor's own), allocating on first
    use: host tensors pinned when the source is on CUDA. On CUDA the copies are queued on the current stream,
    behind the optimizer step that produced them; the transports' reads follow on it (a device snapshot) or wait
    for `_event_after_copies` (a host one)."""
    with torch.no_grad():
        for name, tensor in state.items():
            t = tensor.detach()
            want = dtype if dtype is not None and t.is_floating_point() else t.dtype
            where = device or t.device
            held = snapshot.get(name)
            if held is None or held.shape != t.shape or held.dtype != want or held.device != where:
                pin = where.type == "cpu" and t.is_cuda
                held = snapshot[name] = torch.empty(t.shape, dtype=want, device=where, pin_memory=pin)
            held.copy_(t, non_blocking=held.is_pinned())


def _event_after_copies(snapshot: Snapshot) -> torch.cuda.Event | None:
    """A CUDA event recorded behind the copies just queued, where any went device-to-host; None on CPU."""
    if not torch.cuda.is_available() or not any(t.is_pinned() for t in snapshot.values()):
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record()
    return event
