"""The recording format: records come back in order across rotated files; a crash's `.part` file reads up
to its last flushed block; a file that is not a recording is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from miles_stream.errors import SchemaError
from miles_stream.record import RecordingWriter, read_recording, recording_files


def test_records_round_trip_across_rotated_files(tmp_path: Path) -> None:
    records = [os.urandom(n) for n in (0, 1, 100, 5000, 70_000, 3)]
    with RecordingWriter(tmp_path, namespace="ns", stream="ns:trajectories", max_file_bytes=6000) as writer:
        writer.write(records[:3])
        writer.write(records[3:])
    files = recording_files([tmp_path])
    assert len(files) == 2 and all(f.name.endswith(".msrec.zst") for f in files)  # rotated past 6000 bytes
    assert [r for f in files for r in read_recording(f)] == records
    again = RecordingWriter(tmp_path, namespace="ns", stream="ns:trajectories")  # numbering continues
    again.write([b"x"])
    again.close()
    assert recording_files([tmp_path])[-1].name == "ns-000002.msrec.zst"


def test_an_unfinished_file_reads_up_to_its_last_flush(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path, namespace="ns", stream="s")
    writer.write([b"a" * 1000, b"b" * 10])
    writer.write([b"c" * 50])  # flushed and fsynced: durable
    (part,) = list(tmp_path.iterdir())  # not closed: as if the process died here
    assert part.name.endswith(".part")
    assert list(read_recording(part)) == [b"a" * 1000, b"b" * 10, b"c" * 50]
    data = part.read_bytes()
    part.write_bytes(data[:-7])  # a torn last write
    assert list(read_recording(part))[:2] == [b"a" * 1000, b"b" * 10]
    writer.close()


def test_a_file_that_is_not_a_recording_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.msrec.zst"
    bad.write_bytes(b"not zstd at all")
    with pytest.raises(SchemaError):
        list(read_recording(bad))
    import zstandard

    bad.write_bytes(zstandard.ZstdCompressor().compress(b"WRONG!" + b"\0" * 10))
    with pytest.raises(SchemaError, match="bad magic"):
        list(read_recording(bad))
    with pytest.raises(FileNotFoundError):
        recording_files([tmp_path / "missing"])
