"""Binary encoding of `TrajectoryGroup`s: a msgpack header describing raw little-endian array bytes.

Frame layout (all integers little-endian):

    0      4 bytes   magic b"MSG1"
    4      uint32    header length H
    8      H bytes   msgpack header (the record's scalars and, per array, [dtype, shape, offset, stored, z])
    8+H    pad to 8  zero bytes
    body   arrays, each starting at an 8-byte aligned offset; z = 1 marks a zstd-compressed array

The header never holds numbers of an array as a list, and nothing is pickled. Decoding is zero-copy for
uncompressed arrays (read-only numpy views into the received bytes) and validates everything: magic, header
keys and types, the dtype whitelist, shape against byte length, bounds inside the frame, size limits, then
the record invariants of `schema.validate_group`. Any failure raises `SchemaError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np
import zstandard

from miles_stream.config import check
from miles_stream.errors import SchemaError
from miles_stream.schema import DEFAULT_LIMITS, SCHEMA_VERSION, Limits, Sample, TrajectoryGroup, validate_group

MAGIC: Final = b"MSG1"
_PREFIX: Final = struct.Struct("<4sI")
_ALIGN: Final = 8
_MAX_HEADER: Final = 4 << 20
_DTYPES: Final = {d.str: d for d in map(np.dtype, ("<i4", "<f4", "|u1", "<i8", "<u2"))}
_GROUP_KEYS: Final = frozenset({"v", "gid", "key", "pid", "t", "prompt", "samples"})
_SAMPLE_KEYS: Final = frozenset({"ids", "lp", "mask", "spans", "fin", "r", "route"})


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecConfig:
    """How arrays are stored. Compression trades CPU for bytes: worth it only on a slow network."""

    compress_min_bytes: int = 0  # 0 = never compress; otherwise zstd for arrays at least this large
    compress_level: int = 1
    max_entry_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        check(self.compress_min_bytes >= 0, "codec.compress_min_bytes", "must be >= 0 (0 disables compression)")
        check(1 <= self.compress_level <= 22, "codec.compress_level", "zstd levels run from 1 to 22")
        check(self.max_entry_bytes > 0, "codec.max_entry_bytes", "must be positive")


class Frame:
    """An encoded group as a list of buffers (header, then the arrays' own memory). Send it with a
    scatter-gather write, or `join()` it into one bytes object."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.nbytes = sum(memoryview(p).nbytes for p in parts)

    def join(self) -> bytes:
        return b"".join(self.parts)


class GroupCodec:
    """Encodes and decodes `TrajectoryGroup`s. One instance per thread (zstd contexts are not shared)."""

    def __init__(self, config: CodecConfig | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.config = config or CodecConfig()
        self.limits = limits
        self._zc = zstandard.ZstdCompressor(level=self.config.compress_level)
        self._zd = zstandard.ZstdDecompressor()

    # ---- encode -------------------------------------------------------------------------------------
    def encode(self, group: TrajectoryGroup) -> bytes:
        """The frame as one bytes object (one copy of the payload)."""
        return self.encode_frame(group).join()

    def encode_frame(self, group: TrajectoryGroup) -> Frame:
        """The frame as buffers that point into the group's arrays: no copy of the payload."""
        validate_group(group, self.limits)
        parts: list[Any] = []
        offset = 0

        def put(arr: np.ndarray) -> list[Any]:
            nonlocal offset
            data: Any = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
            compressed = 0
            if self.config.compress_min_bytes and data.nbytes >= self.config.compress_min_bytes:
                data, compressed = self._zc.compress(data), 1
            desc = [arr.dtype.str, list(arr.shape), offset, len(data), compressed]
            parts.append(data)
            pad = -len(data) % _ALIGN
            if pad:
                parts.append(b"\0" * pad)
            offset += len(data) + pad
            return desc

        header = {
            "v": group.schema_version,
            "gid": group.group_id,
            "key": group.prompt_key,
            "pid": group.producer_id,
            "t": group.created_at,
            "prompt": put(group.prompt_ids),
            "samples": [
                {
                    "ids": put(s.response_ids),
                    "lp": put(s.logprobs),
                    "mask": put(s.loss_mask),
                    "spans": put(s.version_spans),
                    "fin": s.finish_reason,
                    "r": s.reward,
                    "route": None if s.routing is None else put(s.routing),
                }
                for s in group.samples
            ],
        }
        head = msgpack.packb(header, use_bin_type=True)
        head_pad = -(_PREFIX.size + len(head)) % _ALIGN
        frame = Frame([_PREFIX.pack(MAGIC, len(head)) + head + b"\0" * head_pad, *parts])
        if frame.nbytes > self.config.max_entry_bytes:
            raise SchemaError(
                f"encoded group is {frame.nbytes} bytes, over max_entry_bytes={self.config.max_entry_bytes}"
            )
        return frame

    # ---- decode -------------------------------------------------------------------------------------
    def decode(self, frame: bytes | bytearray | memoryview) -> TrajectoryGroup:
        view = memoryview(frame).cast("B") if not isinstance(frame, memoryview) else frame.cast("B")
        if len(view) > self.config.max_entry_bytes:
            raise SchemaError(f"entry is {len(view)} bytes, over max_entry_bytes={self.config.max_entry_bytes}")
        if len(view) < _PREFIX.size:
            raise SchemaError(f"entry is {len(view)} bytes, shorter than the {_PREFIX.size}-byte frame prefix")
        magic, head_len = _PREFIX.unpack_from(view)
        if magic != MAGIC:
            raise SchemaError(f"bad magic {bytes(magic)!r}: not a miles-stream trajectory group")
        if head_len > min(_MAX_HEADER, len(view) - _PREFIX.size):
            raise SchemaError(f"header length {head_len} runs past the {len(view)}-byte entry")
        header = self._unpack_header(view[_PREFIX.size : _PREFIX.size + head_len])
        body_start = _PREFIX.size + head_len + (-(_PREFIX.size + head_len) % _ALIGN)
        body = view[body_start:]
        group = self._group_from_header(header, body)
        validate_group(group, self.limits)
        return group

    def _unpack_header(self, raw: memoryview) -> dict[str, Any]:
        try:
            header = msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                max_str_len=1 << 16,
                max_bin_len=0,
                max_array_len=1 << 16,
                max_map_len=64,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises many unrelated types for corrupt input
            raise SchemaError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc
        if not isinstance(header, dict):
            raise SchemaError(f"header must be a map, got {type(header).__name__}")
        version = header.get("v")
        if version != SCHEMA_VERSION:
            raise SchemaError(f"unknown schema version {version!r} (this build reads {SCHEMA_VERSION})")
        _exact_keys(header, _GROUP_KEYS, "group")
        return header

    def _group_from_header(self, h: dict[str, Any], body: memoryview) -> TrajectoryGroup:
        samples = h["samples"]
        if not isinstance(samples, list) or not 1 <= len(samples) <= self.limits.max_samples:
            raise SchemaError(f"samples must be a list of 1 to {self.limits.max_samples} entries")
        created_at = h["t"]
        if not isinstance(created_at, float):
            raise SchemaError(f"created_at must be a float, got {type(created_at).__name__}")
        return TrajectoryGroup(
            group_id=_str(h["gid"], "group_id"),
            prompt_key=_str(h["key"], "prompt_key"),
            producer_id=_str(h["pid"], "producer_id"),
            prompt_ids=self._array(h["prompt"], body, "prompt_ids"),
            samples=tuple(self._sample(s, body, f"samples[{i}]") for i, s in enumerate(samples)),
            created_at=created_at,
            schema_version=h["v"],
        )

    def _sample(self, s: Any, body: memoryview, where: str) -> Sample:
        if not isinstance(s, dict):
            raise SchemaError(f"{where} must be a map, got {type(s).__name__}")
        _exact_keys(s, _SAMPLE_KEYS, where)
        reward = s["r"]
        if not isinstance(reward, float):
            raise SchemaError(f"{where}.reward must be a float, got {type(reward).__name__}")
        return Sample(
            response_ids=self._array(s["ids"], body, f"{where}.response_ids"),
            logprobs=self._array(s["lp"], body, f"{where}.logprobs"),
            loss_mask=self._array(s["mask"], body, f"{where}.loss_mask"),
            version_spans=self._array(s["spans"], body, f"{where}.version_spans"),
            finish_reason=_str(s["fin"], f"{where}.finish_reason"),  # type: ignore[arg-type]
            reward=reward,
            routing=None if s["route"] is None else self._array(s["route"], body, f"{where}.routing"),
        )

    def _array(self, desc: Any, body: memoryview, name: str) -> np.ndarray:
        if not (isinstance(desc, list) and len(desc) == 5):
            raise SchemaError(f"{name}: array descriptor must be [dtype, shape, offset, stored, z]")
        dtype_str, shape, offset, stored, compressed = desc
        dtype = _DTYPES.get(dtype_str) if isinstance(dtype_str, str) else None
        if dtype is None:
            raise SchemaError(f"{name}: dtype {dtype_str!r} is not allowed (allowed: {', '.join(_DTYPES)})")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(_is_count(d) for d in shape)):
            raise SchemaError(f"{name}: shape {shape!r} must be 1 to 3 non-negative integers")
        if not (_is_count(offset) and _is_count(stored) and compressed in (0, 1)):
            raise SchemaError(f"{name}: offset, stored length and compression flag must be non-negative ints")
        if offset % _ALIGN or offset + stored > len(body):
            raise SchemaError(f"{name}: bytes [{offset}, {offset + stored}) lie outside the {len(body)}-byte body")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes > self.config.max_entry_bytes:
            raise SchemaError(f"{name}: shape {shape} needs {nbytes} bytes, over max_entry_bytes")
        data: Any = body[offset : offset + stored]
        if compressed:
            data = self._decompress(data, nbytes, name)
        elif stored != nbytes:
            raise SchemaError(f"{name}: shape {shape} of {dtype.str} needs {nbytes} bytes, the entry has {stored}")
        arr = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
        arr.flags.writeable = False  # records are immutable, whatever buffer they arrived in
        return arr

    def _decompress(self, data: memoryview, nbytes: int, name: str) -> bytes:
        try:
            # zstd sizes its output by the size the frame header declares, if any: check it first, or a
            # corrupt or hostile header could make the consumer allocate any amount of memory
            declared = zstandard.frame_content_size(data)
            if declared not in (-1, nbytes):
                raise SchemaError(f"{name}: zstd frame declares {declared} bytes, the shape needs {nbytes}")
            out = self._zd.decompress(data, max_output_size=nbytes)
        except zstandard.ZstdError as exc:
            raise SchemaError(f"{name}: zstd data is corrupt: {exc}") from exc
        if len(out) != nbytes:
            raise SchemaError(f"{name}: decompressed to {len(out)} bytes, the shape needs {nbytes}")
        return out


def _exact_keys(d: dict[str, Any], expected: frozenset[str], where: str) -> None:
    keys = set(d)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(map(str, keys - expected))
        raise SchemaError(f"{where}: missing keys {missing}, unexpected keys {extra}")


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
