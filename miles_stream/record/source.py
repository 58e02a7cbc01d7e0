"""`RecordingSource`: a `GroupSource` that reads recorded files instead of a consumer group, for
`miles-stream train --replay FILE...`: no Redis, no producer, the same groups in the same order every time.

Undecodable records are counted and skipped (there is no dead-letter stream offline); a group id seen
again is dropped, as the trainer's consumer group would drop it. Commit, release and keep-alive have
nothing to do; a stale group cannot be recycled (there are no producers) and is counted as dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from miles_stream.bus import Received, Ticket
from miles_stream.bus.groups import ConsumeCounters
from miles_stream.codec import GroupCodec
from miles_stream.errors import SchemaError
from miles_stream.record.format import read_recording, recording_files

log = structlog.get_logger(__name__)


class RecordingSource:
    keep_alive_interval_s = 3600.0

    def __init__(self, paths: Sequence[str | Path], codec: GroupCodec | None = None) -> None:
        self.files = recording_files(paths)
        if not self.files:
            raise FileNotFoundError(f"no recording files in {[str(p) for p in paths]}")
        self.codec = codec or GroupCodec()
        self.counters = ConsumeCounters()
        self.exhausted = False
        self._records = self._iterate()
        self._seen: set[str] = set()

    def _iterate(self) -> Iterator[tuple[str, bytes]]:
        for i, path in enumerate(self.files):
            for j, data in enumerate(read_recording(path)):
                yield f"{i}-{j}", data

    async def start(self) -> None:
        log.info("replaying", files=[str(f) for f in self.files])

    async def read(self, count: int) -> list[Received]:
        out: list[Received] = []
        while len(out) < count:
            item = next(self._records, None)
            if item is None:
                self.exhausted = True
                break
            entry_id, data = item
            try:
                group = self.codec.decode(data)
            except SchemaError as exc:
                self.counters.dead_lettered += 1
                log.warning("record_skipped", id=entry_id, reason=str(exc))
                continue
            if group.group_id in self._seen:
                self.counters.duplicates += 1
                continue
            self._seen.add(group.group_id)
            out.append(Received(entry_id, group, len(data)))
        self.counters.received += len(out)
        return out

    async def still_held(self, items: Sequence[Received]) -> list[Received]:
        return list(items)

    async def commit(self, items: Sequence[Ticket]) -> None:
        self.counters.committed += len(items)

    async def release(self, items: Sequence[Ticket], reason: str) -> None:
        return None

    async def requeue_prompts(self, items: Sequence[Ticket]) -> int:
        return 0

    async def keep_alive(self) -> None:
        return None

    def remember(self, group_ids: Sequence[str]) -> None:
        """A recording has no commits to lose: nothing to remember."""

    def recent_commits(self) -> list[str]:
        return []
