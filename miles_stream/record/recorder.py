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

Partitions (`bus.partitions` > 1): one recorder process records every partition's trajectory stream, each into
files of its own (`{run1.p0}-000000.msrec.zst`, ...) beside the others (`record_partitions`). A replay routes
each group to a partition by a hash of its group id, so a group recorded twice lands twice in one partition and
its second copy is dropped there, as in one stream.
"""

from __future__ import annotations

import asyncio
import functools
import time
import zlib
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


async def record_partitions(
    streams: Sequence[StreamConsumer], writers: Sequence[RecordingWriter], stop: asyncio.Event, *,
    blobs: Blobs | None = None,
) -> int:  # fmt: skip
    """`record` each partition's stream into its writer, side by side, until `stop` is set or one of them fails
    (then the others finish their batch and close their files, and its error is raised). Returns the records."""
    halt = asyncio.Event()

    async def one(stream: StreamConsumer, writer: RecordingWriter) -> int:
        try:
            return await record(stream, writer, halt, blobs=blobs)
        finally:
            halt.set()

    async def relay() -> None:
        await stop.wait()
        halt.set()

    relaying = asyncio.create_task(relay())
    try:
        done = await asyncio.gather(*(one(s, w) for s, w in zip(streams, writers, strict=True)),
                                    return_exceptions=True)  # fmt: skip
    finally:
        relaying.cancel()
    for result in done:
        if isinstance(result, BaseException):
            raise result
    return sum(int(r) for r in done if not isinstance(r, BaseException))


async def replay(
    paths: Sequence[str | Path],
    client: StreamClient,
    lanes: Sequence[tuple[str, Backpressure | None]],
    *,
    maxlen: int,
    rate: float = 0.0,
) -> tuple[int, int]:
    """Publish every valid record of `paths`, byte for byte, at most `rate` per second (0 = no limit), to the
    stream of one of `lanes` (a stream and its backpressure, whose room is waited for: one lane, or each
    partition's; a group goes to the lane its group id hashes to). Returns (published, skipped as invalid)."""
    codec = GroupCodec()
    published = skipped = 0
    started = time.monotonic()
    for path in recording_files(paths):
        for data in read_recording(path):
            try:
                group = codec.decode(data)
            except SchemaError as exc:
                skipped += 1
                log.warning("record_skipped", file=str(path), reason=str(exc))
                continue
            if rate > 0:
                await asyncio.sleep(max(0.0, started + published / rate - time.monotonic()))
            stream, backpressure = lanes[zlib.crc32(group.group_id.encode()) % len(lanes)]
            if backpressure is not None:
                await backpressure.wait_for_room(None)
            await publish(client, stream, data, maxlen=maxlen)
            if backpressure is not None:
                backpressure.record_sent(len(data))
            published += 1
    return published, skipped
