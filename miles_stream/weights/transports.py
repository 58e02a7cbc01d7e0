"""Weight transports: where a version's bytes go. Redis announces every version; the bytes travel here.

- `redis`: chunks as Redis strings `{ns}:weights:v{version}:{i}`, for deployments with no shared filesystem.
- `file`: one safetensors file per version in `{root}/v{version:08d}/`, written to a temporary directory and
  renamed into place, so a reader never sees half a version. The manifest's one chunk is the whole file.
Both verify every chunk's sha256 when loading; a mismatch is a `WeightIntegrityError`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
import torch
from safetensors.torch import save_file

from miles_stream.bus import Keys
from miles_stream.bus.dataplane import StreamClient
from miles_stream.errors import WeightIntegrityError
from miles_stream.weights.manifest import (
    DTYPES,
    TensorInfo,
    WeightManifest,
    chunk_infos,
    pack_chunks,
    unpack_chunks,
)

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "I32": "int32",
                       "U8": "uint8", "BOOL": "bool"}  # fmt: skip


class WeightTransport(Protocol):
    name: str

    async def write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest: ...

    async def read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]: ...

    async def delete(self, version: int) -> None: ...

    async def stored(self) -> list[int]:
        """The versions whose bytes this transport holds, ascending ([] where it stores nothing): the publisher
        prunes those written and never announced (a trainer killed in between)."""
        ...


class RedisTransport:
    """Chunks through `data` (a data-plane client: bulk bytes move on its worker thread, off the event loop
    and the GIL, which a producer's decode thread needs) where given, else through `redis`."""

    name = "redis"

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, bucket_bytes: int = 64 << 20, data: StreamClient | None = None
    ) -> None:
        self.redis, self.keys, self.bucket_bytes = redis, keys, bucket_bytes
        self.data: StreamClient | aioredis.Redis = data if data is not None else redis

    def _prefix(self, version: int) -> str:
        return f"{self.keys.weights}:v{version}"

    async def write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        tensors, chunks = await asyncio.to_thread(pack_chunks, state, self.bucket_bytes)
        prefix = self._prefix(version)
        for i, chunk in enumerate(chunks):
            await self.data.set(f"{prefix}:{i}", chunk)
        return WeightManifest(version=version, transport=self.name, location=prefix, tensors=tuple(tensors),
                              chunks=chunk_infos(chunks))  # fmt: skip

    async def read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        keys = [f"{manifest.location}:{i}" for i in range(len(manifest.chunks))]
        chunks: list[Any] = [await self.data.get(k) for k in keys]
        if any(c is None for c in chunks):
            raise WeightIntegrityError(f"version {manifest.version}: a chunk is missing from Redis")
        return await asyncio.to_thread(unpack_chunks, manifest, chunks)

    async def delete(self, version: int) -> None:
        keys = [k async for k in self.redis.scan_iter(match=f"{self._prefix(version)}:*", count=1000)]
        if keys:
            await self.redis.delete(*keys)

    async def stored(self) -> list[int]:
        pattern = re.compile(rf"{re.escape(self.keys.weights)}:v(\d+):\d+")
        found = [k async for k in self.redis.scan_iter(match=f"{self.keys.weights}:v[0-9]*:*", count=1000)]
        return sorted({int(m[1]) for k in found if (m := pattern.fullmatch(k.decode()))})


class FileTransport:
    name = "file"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    async def write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        return await asyncio.to_thread(self._write, version, state)

    def _write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        final = self._dir(version)
        tmp = self.root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            path = tmp / "model.safetensors"
            save_file(_unshared(state), str(path))
            data = path.read_bytes()
            os.replace(tmp, final) if not final.exists() else _refuse(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return WeightManifest(version=version, transport=self.name, location=str(final),
                              tensors=_safetensors_layout(data), chunks=chunk_infos([data]))  # fmt: skip

    async def read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        path = Path(manifest.location) / "model.safetensors"
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise WeightIntegrityError(f"version {manifest.version}: cannot read {path}: {exc}") from exc
        return await asyncio.to_thread(unpack_chunks, manifest, [data])

    async def delete(self, version: int) -> None:
        await asyncio.to_thread(shutil.rmtree, self._dir(version), True)

    async def stored(self) -> list[int]:
        names = await asyncio.to_thread(lambda: [p.name for p in self.root.glob("v*")] if self.root.is_dir() else [])
        return sorted(int(n[1:]) for n in names if re.fullmatch(r"v\d{8,}", n))


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and a copy where a tensor shares memory with an earlier one (tied weights):
    safetensors refuses shared storage."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        out[name] = t.clone() if ptr in seen else t
        if ptr != -1:
            seen.add(ptr)
    return out


def _refuse(path: Path) -> None:
    raise WeightIntegrityError(f"{path} exists already: versions are written once")


def _safetensors_layout(data: bytes) -> tuple[TensorInfo, ...]:
    """Where each tensor lies in a safetensors file (8-byte header length, JSON header, then the data)."""
    (header_len,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
        assert dtype in DTYPES
        out.append(TensorInfo(name, dtype, tuple(meta["shape"]), 0, base + start, end - start))
    return tuple(out)
