"""The recording format: rotating, zstd-compressed files of stream entries, byte for byte as they came.

    {dir}/{namespace}-{seq:06d}.msrec.zst          a finished file (renamed into place when closed)
    {dir}/{namespace}-{seq:06d}.msrec.zst.part     the file being written

Decompressed, a file is:

    magic    b"MSREC\\x01"
    u32 LE   header length, then the header: msgpack {format: 1, namespace, stream, created_at}
    records  u32 LE length N, then N bytes: the entry's data field exactly as read (a GroupCodec frame)

The writer flushes a zstd block and fsyncs after each batch, before the recorder acks that batch, so an
acked entry is on disk. A `.part` file left by a crash reads up to its last flushed block; a record cut
short at its end is ignored.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

import msgpack
import zstandard

from miles_stream.errors import SchemaError

MAGIC: Final = b"MSREC\x01"
FORMAT: Final = 1
SUFFIX: Final = ".msrec.zst"
_U32 = struct.Struct("<I")
MAX_RECORD: Final = 1 << 31


class RecordingWriter:
    def __init__(self, directory: str | Path, *, namespace: str, stream: str, max_file_bytes: int = 256 << 20) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.namespace, self.stream, self.max_file_bytes = namespace, stream, max_file_bytes
        self._seq = _next_seq(self.directory, namespace)
        self._file: BinaryIO | None = None
        self._compressor: Any = None
        self._path: Path | None = None
        self._written = 0
        self.records = 0
        self.files: list[Path] = []

    def write(self, records: Iterable[bytes | bytearray | memoryview]) -> None:
        """Append records and make them durable (zstd block flushed, file fsynced)."""
        for data in records:
            if self._file is None or self._written >= self.max_file_bytes:
                self._rotate()
            assert self._file is not None
            chunk = _U32.pack(len(data)) + bytes(data)
            self._file.write(self._compressor.compress(chunk))
            self._written += len(chunk)
            self.records += 1
        if self._file is not None:
            self._file.write(self._compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is None:
            return
        assert self._path is not None
        self._file.write(self._compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._path.with_name(self._path.name.removesuffix(".part"))
        self._path.rename(final)
        self.files.append(final)
        self._file = None

    def _rotate(self) -> None:
        self.close()
        self._path = self.directory / f"{self.namespace}-{self._seq:06d}{SUFFIX}.part"
        self._seq += 1
        self._file = open(self._path, "wb")  # noqa: SIM115 - closed in close()
        self._compressor = zstandard.ZstdCompressor(level=3).compressobj()
        header: bytes = msgpack.packb({"format": FORMAT, "namespace": self.namespace, "stream": self.stream,
                                       "created_at": time.time()})  # fmt: skip
        self._file.write(self._compressor.compress(MAGIC + _U32.pack(len(header)) + header))
        self._written = 0

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recording_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named, and the recording files in directories named, in order (a `.part` file after its peers)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.name.endswith((SUFFIX, SUFFIX + ".part")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no recording at {p}")
    return out


def read_recording(path: str | Path) -> Iterator[bytes]:
    """The records of one file, in order. A wrong magic or header is a `SchemaError`; a truncated tail ends it."""
    with open(path, "rb") as f:
        data = _Decompressed(f, path)
        head = data.take(len(MAGIC) + 4)
        if head is None or head[: len(MAGIC)] != MAGIC:
            raise SchemaError(f"{path} is not a miles-stream recording (bad magic)")
        header = msgpack.unpackb(data.take(_U32.unpack(head[len(MAGIC) :])[0]) or b"\xc0")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise SchemaError(f"{path}: unknown recording format {header!r}")
        while (size := data.take(4)) is not None:
            n = _U32.unpack(size)[0]
            if n > MAX_RECORD:
                raise SchemaError(f"{path}: a record claims {n} bytes")
            record = data.take(n)
            if record is None:
                return  # cut short by a crash
            yield record


class _Decompressed:
    """The decompressed bytes of a file, taken piece by piece; everything flushed to it is readable even when
    its zstd frame was never finished (a `.part` file)."""

    def __init__(self, file: BinaryIO, path: str | Path, chunk: int = 1 << 20) -> None:
        self._file, self.path, self.chunk = file, path, chunk
        self._decoder = zstandard.ZstdDecompressor().decompressobj()
        self._buffer = bytearray()
        self._eof = False

    def take(self, n: int) -> bytes | None:
        while len(self._buffer) < n and not self._eof:
            raw = self._file.read(self.chunk)
            if not raw:
                self._eof = True
                break
            try:
                self._buffer += self._decoder.decompress(raw)
            except zstandard.ZstdError as exc:
                self._eof = True
                if not self._buffer:
                    raise SchemaError(f"{self.path} is not a zstd-compressed recording: {exc}") from exc
        if len(self._buffer) < n:
            return None
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out


def _next_seq(directory: Path, namespace: str) -> int:
    seqs = [int(p.name[len(namespace) + 1 :].split(".")[0]) for p in directory.glob(f"{namespace}-*{SUFFIX}*")]
    return max(seqs, default=-1) + 1
