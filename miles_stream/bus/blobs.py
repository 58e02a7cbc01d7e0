"""Large entries out of Redis: a group over `bus.blob_threshold_bytes` travels as a reference to a blob.

A 32K-token sample of a 48-layer top-8 MoE carries a 12.6 MB routing trace; a group of 16 is 200 MB, too
much for one stream entry in Redis's memory. Such a group's encoded frame goes to a blob store (a shared
directory, or an S3-compatible bucket) and the entry carries its name:

    name = "{put time: unix ms, 13 digits}-{sha256 of the bytes}"   content-addressed, checked when read
    entry fields: d = b"" (no payload), b = name

    publish:  wait for room -> ownership -> put blob -> XADD        (a publisher re-puts a blob older than half
                                                                    the margin before each XADD try)
    sweep:    after a trim, at most every margin/4: delete the blobs put more than `bus.blob_grace_s` before
              the stream's oldest entry

A crash never leaves a reference without its blob: the blob is written first (atomically: a temporary name,
then a rename; an S3 PUT is atomic) and deleted only once every entry put around its time is trimmed, that is
acknowledged by every consumer group. A blob whose publisher died before its XADD is deleted by the same
sweep. The margin covers the delay between a put and its XADD, and the clock difference between the
publisher's host and Redis's (names carry the publisher's clock; the stream's ids carry Redis's).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from miles_stream.bus.streams import DATA, BusConfig, as_str, no_such_key, parse_id
from miles_stream.errors import ConfigError, SchemaError

try:  # optional: only an s3:// store needs it (pip install boto3)
    import boto3
except ImportError:  # pragma: no cover - depends on the environment
    boto3 = None

log = structlog.get_logger(__name__)

BLOB = b"b"  # the entry field naming the blob


class BlobStore(Protocol):
    async def put(self, name: str, parts: Sequence[Any]) -> None: ...

    async def get(self, name: str) -> bytes: ...

    async def delete(self, names: Sequence[str]) -> None: ...

    async def names(self) -> list[str]: ...


class FileBlobStore:
    """Blobs as files in one directory (a shared filesystem for processes on several hosts)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"bus.blob_store: {self.root} is not a directory")

    async def put(self, name: str, parts: Sequence[Any]) -> None:
        await asyncio.to_thread(self._put, name, parts)

    def _put(self, name: str, parts: Sequence[Any]) -> None:
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        with tmp.open("wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.root / name)

    async def get(self, name: str) -> bytes:
        try:
            return await asyncio.to_thread((self.root / name).read_bytes)
        except FileNotFoundError as exc:
            raise SchemaError(f"blob {name} is missing from {self.root}") from exc

    async def delete(self, names: Sequence[str]) -> None:
        def rm() -> None:
            for name in names:
                (self.root / name).unlink(missing_ok=True)

        await asyncio.to_thread(rm)

    async def names(self) -> list[str]:
        return await asyncio.to_thread(lambda: [p.name for p in self.root.iterdir()])


class S3BlobStore:
    """Blobs as objects under `prefix` in an S3-compatible bucket (boto3; credentials as boto3 finds them).
    `s3://bucket/prefix?endpoint=http://host:9000` for MinIO and other S3-compatible servers."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None = None) -> None:
        if boto3 is None:
            raise ConfigError("bus.blob_store: an s3:// store needs boto3 (pip install boto3)")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = boto3.client("s3", endpoint_url=endpoint)

    async def put(self, name: str, parts: Sequence[Any]) -> None:  # a PUT is atomic: no partial object is seen
        body = b"".join(parts)
        await asyncio.to_thread(self.client.put_object, Bucket=self.bucket, Key=self.prefix + name, Body=body)

    async def get(self, name: str) -> bytes:
        try:
            reply = await asyncio.to_thread(self.client.get_object, Bucket=self.bucket, Key=self.prefix + name)
        except self.client.exceptions.NoSuchKey as exc:
            raise SchemaError(f"blob {name} is missing from s3://{self.bucket}/{self.prefix}") from exc
        body: bytes = await asyncio.to_thread(reply["Body"].read)
        return body

    async def delete(self, names: Sequence[str]) -> None:
        for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = [{"Key": self.prefix + n} for n in names[i : i + 1000]]
            await asyncio.to_thread(self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": chunk})

    async def names(self) -> list[str]:
        def listing() -> list[str]:
            out: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
            return out

        return await asyncio.to_thread(listing)


def blobs_for(config: BusConfig) -> Blobs | None:
    """The run's blob store (`bus.blob_store`), or None where it has none."""
    if not config.blob_store:
        return None
    store = open_blob_store(config.blob_store)
    return Blobs(store, threshold_bytes=config.blob_threshold_bytes, grace_s=config.blob_grace_s)


async def payload(fields: Any, blobs: Blobs | None) -> bytes | bytearray:
    """An entry's payload: its `d` field, or the blob its `b` field names."""
    ref = fields.get(BLOB)
    if ref is None:
        data: bytes | bytearray = fields.get(DATA, b"")
        return data
    if blobs is None:
        raise SchemaError(f"the entry names blob {as_str(ref)} and this process has no bus.blob_store")
    return await blobs.get(as_str(ref))


def open_blob_store(url: str) -> BlobStore:
    """`file:///shared/dir` (or a plain path) or `s3://bucket/prefix[?endpoint=URL]`."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return FileBlobStore(parsed.path if parsed.scheme else url)
    if parsed.scheme == "s3":
        endpoint = parse_qs(parsed.query).get("endpoint", [None])[0]
        return S3BlobStore(parsed.netloc, parsed.path, endpoint)
    raise ConfigError(f"bus.blob_store: {url!r} is neither file:// nor s3://")


def blob_name(parts: Sequence[Any], now_ms: int | None = None) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return f"{now_ms if now_ms is not None else int(time.time() * 1000):013d}-{digest.hexdigest()}"


def put_ms(name: str) -> int | None:
    """The put time a blob's name carries; None for a name that is not a blob's (a temporary file)."""
    ms, _, digest = name.partition("-")
    return int(ms) if len(ms) == 13 and ms.isdigit() and len(digest) == 64 else None


class Blobs:
    """A stream's blobs: offload on publish, resolve on read, sweep after trims (module docstring)."""

    def __init__(self, store: BlobStore, *, threshold_bytes: int, grace_s: float) -> None:
        self.store, self.threshold_bytes, self.grace_ms = store, threshold_bytes, int(grace_s * 1000)
        self._next_sweep = 0.0

    def wants(self, nbytes: int) -> bool:
        return nbytes >= self.threshold_bytes

    async def put(self, parts: Sequence[Any]) -> str:
        name = blob_name(parts)
        await self.store.put(name, parts)
        return name

    def fresh(self, name: str) -> bool:
        """Whether an entry may still be made to name this blob: put less than half the margin ago."""
        return int(time.time() * 1000) - (put_ms(name) or 0) < self.grace_ms // 2

    async def get(self, name: str) -> bytes:
        """A blob's bytes, checked against the digest its name carries (SchemaError if missing or altered)."""
        data = await self.store.get(name)
        if hashlib.sha256(data).hexdigest() != name.partition("-")[2]:
            raise SchemaError(f"blob {name} does not match its checksum")
        return data

    async def maybe_sweep(self, redis: aioredis.Redis, stream: str, *more: tuple[aioredis.Redis, str]) -> int:
        if time.monotonic() < self._next_sweep:
            return 0
        self._next_sweep = time.monotonic() + self.grace_ms / 4000
        return await self.sweep(redis, stream, *more)

    async def sweep(self, redis: aioredis.Redis, stream: str, *more: tuple[aioredis.Redis, str]) -> int:
        """Delete the blobs put more than the margin before the stream's oldest entry: acked by every group
        and trimmed, or never referenced (their publisher died before its XADD). With `more` (the other
        partitions' trajectory streams, which share the store) the oldest entry of them all; a peer with no entry
        (none yet, or all trimmed) counts as Redis's clock now, or one idle partition would stop every sweep. A
        blob put for it before its XADD is kept by the margin, as one put for a stream with entries is."""
        first = min(
            [await first_entry_ms(redis, stream), *[await first_entry_ms(c, s, now_if_empty=True) for c, s in more]]
        )
        old = [n for n in await self.store.names() if (ms := put_ms(n)) is not None and ms < first - self.grace_ms]
        if old:
            await self.store.delete(old)
            log.info("blobs_deleted", stream=stream, count=len(old))
        return len(old)


async def first_entry_ms(redis: aioredis.Redis, stream: str, *, now_if_empty: bool = False) -> int:
    """The ms of the stream's oldest entry; of its next one when it is empty; 0 if it does not exist. With
    `now_if_empty`, Redis's clock now when it has no entry (or does not exist)."""
    try:
        first: Any = await redis.xrange(stream, count=1)
        if first:
            return parse_id(first[0][0])[0]
        if now_if_empty:
            seconds, micros = await redis.time()
            return int(seconds) * 1000 + int(micros) // 1000
        info: Any = await redis.xinfo_stream(stream)
        return parse_id(info["last-generated-id"])[0] + 1
    except rexc.ResponseError as exc:
        if no_such_key(exc):
            return 0
        raise
