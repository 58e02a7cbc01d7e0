"""The recorder: its own consumer group ("recorder") on the trajectory stream, every entry to files.

    {ns}:trajectories ──XREADGROUP "recorder"──► RecordingWriter.write (block flushed, fsynced) ──► XACK

An entry is acked only once it is on disk, so a recorder restarted under the same name soon after it was
killed loses nothing: it re-reads what it had not acked (which may then be in two files; a replay drops the
second copy by group id).

The recorder is an observer (`StreamConsumer(observer=True)`): it must never stop the run it records. Its
backlog does not hold producers back, and once no consumer of its group has read for `bus.claim_idle_ms` (it
died: its disk filled) the stream is trimmed past it as soon as the trainer has acked. What it missed is then
lost to the recording; restarted, it logs `entries_trimmed_unread` with how many, and records from there on.
A live recorder that lags keeps its entries up to the XADD cap, `bus.maxlen_cap` entries behind the newest
(beyond that the oldest go, uncounted). A recorder that stops for good can have its group deleted (XGROUP
DESTROY); left behind, it costs nothing but a line in `status`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from miles_stream.bus import Backpressure, RetryPolicy, StreamClient, StreamConsumer
from miles_stream.bus.blobs import Blobs, payload
from miles_stream.bus.streams import publish
from miles_stream.codec import GroupCodec
from miles_stream.errors import RecordingError, SchemaError
from miles_stream.record.format import RecordingWriter, read_recording, recording_files

log = structlog.get_logger(__name__)


async def record(
    stream: StreamConsumer, writer: RecordingWriter, stop: asyncio.Event, *, batch: int = 64, blobs: Blobs | None = None
) -> int:
    """Record until `stop` is set; returns how many entries were written. An entry that names a blob is
    recorded with the blob's bytes (the blob itself is deleted once the run has trimmed it)."""
    await stream.start()
    retry = RetryPolicy(attempts=0, max_delay_s=2.0, stop=stop)  # ride out a Redis restart, unless told to stop
    failed: RecordingError | None = None
    try:
        while not stop.is_set():
            entries = await retry.run(lambda: stream.read(batch))
            if not entries:
                continue
            payloads = []
            for entry in entries:
                try:
                    payloads.append(await retry.run(functools.partial(payload, entry.fields, blobs)))
                except SchemaError as exc:  # a blob missing or altered: set aside with its reason
                    await retry.run(functools.partial(stream.dead_letter, entry, f"schema: {exc}"))
            try:
                await asyncio.to_thread(writer.write, payloads)
            except OSError as exc:  # a full or read-only disk: these entries stay pending, unacked
                failed = RecordingError(f"cannot write the recording in {writer.directory}: {exc}; the entries "
                                        f"not written stay pending for this recorder's next start")  # fmt: skip
                raise failed from exc
            await retry.run(functools.partial(stream.ack, [e.id for e in entries]))
    finally:
        try:
            writer.close()
        except OSError as exc:
            if failed is None:
                raise RecordingError(f"cannot close the recording in {writer.directory}: {exc}") from exc
            # already failing: the .part file reads up to its last flushed block; say so, do not raise again
            log.error("recording_left_open", directory=str(writer.directory), error=str(exc))
    log.info("recording_closed", records=writer.records, files=[str(f) for f in writer.files])
    return writer.records


async def replay(
    paths: Sequence[str | Path],
    client: StreamClient,
    stream: str,
    *,
    maxlen: int,
    rate: float = 0.0,
    backpressure: Backpressure | None = None,
) -> tuple[int, int]:
    """Publish every valid record of `paths` to `stream`, byte for byte, at most `rate` per second (0 = no
    limit), waiting for room when `backpressure` is given. Returns (published, skipped as invalid)."""
    codec = GroupCodec()
    published = skipped = 0
    started = time.monotonic()
    for path in recording_files(paths):
        for data in read_recording(path):
            try:
                codec.decode(data)
            except SchemaError as exc:
                skipped += 1
                log.warning("record_skipped", file=str(path), reason=str(exc))
                continue
            if rate > 0:
                await asyncio.sleep(max(0.0, started + published / rate - time.monotonic()))
            if backpressure is not None:
                await backpressure.wait_for_room(None)
            await publish(client, stream, data, maxlen=maxlen)
            if backpressure is not None:
                backpressure.record_sent(len(data))
            published += 1
    return published, skipped
