"""The manifest of one published weight version: what tensors, where their bytes are, and their checksums.

A version's bytes are split into chunks (buckets of whole tensors, raw little-endian bytes one after the
other); each tensor names its chunk, offset and byte count, and each chunk carries its sha256. The manifest
travels as msgpack in the `manifest` field of the announcement on `{ns}:weights`; decoding validates it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import torch

from miles_stream.errors import MilesStreamError, SchemaError, WeightIntegrityError

MANIFEST_VERSION: Final = 1
DTYPES: Final = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
}  # fmt: skip
_NAMES: Final = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunk: int
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    nbytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightManifest:
    version: int
    transport: str
    location: str  # the transport's: a key prefix, a directory
    tensors: tuple[TensorInfo, ...]
    chunks: tuple[ChunkInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)


def buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Whole tensors in order, grouped into buckets of about `bucket_bytes` (a larger tensor alone)."""
    out: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if out[-1] and size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, tensor))
        size += nbytes
    return [b for b in out if b]


def pack_chunks(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> tuple[list[TensorInfo], list[bytes]]:
    """Whole tensors, in order, packed into chunks of about `bucket_bytes` (a larger tensor is a chunk alone)."""
    tensors: list[TensorInfo] = []
    chunks: list[bytes] = []
    for bucket in buckets(state, bucket_bytes):
        parts: list[bytes] = []
        offset = 0
        for name, tensor in bucket:
            if tensor.dtype not in _NAMES:
                raise MilesStreamError(f"weight {name!r} has dtype {tensor.dtype}, not one of {sorted(DTYPES)}")
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            tensors.append(TensorInfo(name, _NAMES[tensor.dtype], tuple(tensor.shape), len(chunks), offset, len(raw)))
            parts.append(raw)
            offset += len(raw)
        chunks.append(b"".join(parts))
    return tensors, chunks or [b""]


def chunk_infos(chunks: list[bytes]) -> tuple[ChunkInfo, ...]:
    return tuple(ChunkInfo(len(c), digest) for c, digest in zip(chunks, _sha256s(chunks), strict=True))


def _sha256s(chunks: list[Any]) -> list[str]:
    """The chunks' sha256 digests, several at once: hashlib releases the GIL on large buffers, so a 1 GB version
    hashes on as many cores as it has chunks (up to 8) instead of one."""
    if len(chunks) < 2:
        return [hashlib.sha256(c).hexdigest() for c in chunks]
    with ThreadPoolExecutor(max_workers=min(8, len(chunks)), thread_name_prefix="miles-sha256") as pool:
        return list(pool.map(lambda c: hashlib.sha256(c).hexdigest(), chunks))


def unpack_chunks(manifest: WeightManifest, chunks: list[bytes]) -> dict[str, torch.Tensor]:
    """Verify every chunk against the manifest and rebuild the tensors (copies: they own their memory)."""
    if len(chunks) != len(manifest.chunks):
        raise WeightIntegrityError(
            f"version {manifest.version}: {len(chunks)} chunks, manifest lists {len(manifest.chunks)}"
        )
    digests = _sha256s(chunks)
    for i, (data, info) in enumerate(zip(chunks, manifest.chunks, strict=True)):
        if len(data) != info.nbytes or digests[i] != info.sha256:
            raise WeightIntegrityError(f"version {manifest.version}: chunk {i} fails its sha256 or size check")
    out = {}
    for t in manifest.tensors:
        raw = bytearray(chunks[t.chunk][t.offset : t.offset + t.nbytes])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        out[t.name] = flat.view(DTYPES[t.dtype]).reshape(t.shape)
    return out


def encode_manifest(m: WeightManifest) -> bytes:
    data: bytes = msgpack.packb(
        {
            "v": MANIFEST_VERSION, "version": m.version, "transport": m.transport, "location": m.location,
            "tensors": [[t.name, t.dtype, list(t.shape), t.chunk, t.offset, t.nbytes] for t in m.tensors],
            "chunks": [[c.nbytes, c.sha256] for c in m.chunks],
        },
        use_bin_type=True,
    )  # fmt: skip
    return data


def decode_manifest(data: bytes) -> WeightManifest:
    try:
        m: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if m["v"] != MANIFEST_VERSION:
            raise SchemaError(f"unknown weight manifest version {m['v']!r}")
        chunks = tuple(ChunkInfo(int(n), str(h)) for n, h in m["chunks"])
        tensors = tuple(
            TensorInfo(str(name), str(dtype), tuple(int(d) for d in shape), int(c), int(o), int(n))
            for name, dtype, shape, c, o, n in m["tensors"]
        )
        manifest = WeightManifest(version=int(m["version"]), transport=str(m["transport"]),
                                  location=str(m["location"]), tensors=tensors, chunks=chunks)  # fmt: skip
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(f"weight manifest is malformed: {type(exc).__name__}: {exc}") from exc
    for t in manifest.tensors:
        if t.dtype not in DTYPES or not 0 <= t.chunk < len(chunks) or t.offset + t.nbytes > chunks[t.chunk].nbytes:
            raise SchemaError(f"weight manifest entry {t.name!r} does not fit its chunk")
        expected = DTYPES[t.dtype].itemsize * int(torch.Size(t.shape).numel())
        if expected != t.nbytes:
            raise SchemaError(
                f"weight manifest entry {t.name!r}: shape {t.shape} needs {expected} bytes, lists {t.nbytes}"
            )
    return manifest
