from __future__ import annotations

import contextlib
import dataclasses
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miles_stream.codec import CodecConfig, GroupCodec
from miles_stream.errors import SchemaError
from miles_stream.schema import Limits, Sample, TrajectoryGroup, make_spans
from miles_stream.testing.synthetic import synthetic_group


@st.composite
def groups(draw: st.DrawFn) -> TrajectoryGroup:
    prompt_len = draw(st.integers(0, 40))
    n = draw(st.integers(1, 5))
    layers = draw(st.sampled_from([0, 1, 3]))
    topk = draw(st.integers(1, 4))
    wide = draw(st.booleans())
    samples = []
    for _ in range(n):
        t = draw(st.integers(0, 50))
        if prompt_len + t == 0:
            t = 1
        starts = sorted(draw(st.sets(st.integers(1, max(t - 1, 1)), max_size=3))) if t > 1 else []
        versions = draw(st.lists(st.integers(0, 2**40), min_size=len(starts) + 1, max_size=len(starts) + 1))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        routing = None
        if layers:
            dtype = np.uint16 if wide else np.uint8
            routing = rng.integers(0, 255, (prompt_len + t - 1, layers, topk)).astype(dtype)
        samples.append(
            Sample(
                response_ids=rng.integers(0, 2**31 - 1, t, dtype=np.int32),
                logprobs=(-rng.exponential(3.0, t)).astype(np.float32),
                loss_mask=rng.integers(0, 2, t, dtype=np.uint8),
                version_spans=make_spans(list(zip([0, *starts], versions, strict=True))),
                finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
                reward=draw(st.floats(-1e6, 1e6, allow_nan=False)),
                routing=routing,
            )
        )
    text = st.text(min_size=1, max_size=20)
    return TrajectoryGroup(
        group_id=draw(text),
        prompt_key=draw(text),
        producer_id=draw(text),
        prompt_ids=np.arange(prompt_len, dtype=np.int32),
        samples=tuple(samples),
        created_at=draw(st.floats(0, 2e9)),
    )


def assert_same(a: TrajectoryGroup, b: TrajectoryGroup) -> None:
    for f in ("group_id", "prompt_key", "producer_id", "created_at", "schema_version"):
        assert getattr(a, f) == getattr(b, f)
    assert a.prompt_ids.tobytes() == b.prompt_ids.tobytes()
    assert len(a.samples) == len(b.samples)
    for x, y in zip(a.samples, b.samples, strict=True):
        for f in ("response_ids", "logprobs", "loss_mask", "version_spans", "routing"):
            u, v = getattr(x, f), getattr(y, f)
            if u is None:
                assert v is None
                continue
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), f
        assert x.finish_reason == y.finish_reason and x.reward == y.reward


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group=groups(), compress=st.sampled_from([0, 1, 64]))
def test_round_trip_is_bit_exact(group: TrajectoryGroup, compress: int) -> None:
    codec = GroupCodec(CodecConfig(compress_min_bytes=compress))
    assert_same(group, codec.decode(codec.encode(group)))


def test_decoded_arrays_are_read_only_views() -> None:
    codec = GroupCodec()
    group = codec.decode(codec.encode(synthetic_group(np.random.default_rng(0), routing_layers=2)))
    with pytest.raises(ValueError, match="read-only"):
        group.samples[0].logprobs[0] = 0.0


def test_arrays_are_8_byte_aligned_in_the_frame() -> None:
    codec = GroupCodec()
    group = codec.decode(codec.encode(synthetic_group(np.random.default_rng(0), prompt_len=3, response_len=5)))
    for s in group.samples:
        for arr in (s.response_ids, s.logprobs, s.version_spans):
            assert arr.ctypes.data % 8 == 0


def _replace_sample(group: TrajectoryGroup, **changes: object) -> TrajectoryGroup:
    sample = dataclasses.replace(group.samples[0], **changes)
    return dataclasses.replace(group, samples=(sample, *group.samples[1:]))


BAD_SAMPLES = {
    "int64 tokens": ({"response_ids": np.zeros(16, np.int64)}, "response_ids has dtype <i8"),
    "short logprobs": ({"logprobs": np.zeros(15, np.float32) - 1}, "logprobs has 15 entries for 16"),
    "nan logprob": ({"logprobs": np.full(16, np.nan, np.float32)}, "NaN or inf"),
    "positive logprob": ({"logprobs": np.full(16, 0.5, np.float32)}, "positive log-probability"),
    "mask of 2": ({"loss_mask": np.full(16, 2, np.uint8)}, "other than 0 or 1"),
    "spans not at 0": ({"version_spans": make_spans([(3, 1)])}, "must start at token 0"),
    "spans decreasing": ({"version_spans": make_spans([(0, 1), (5, 2), (4, 3)])}, "strictly increase"),
    "span past end": ({"version_spans": make_spans([(0, 1), (16, 2)])}, "past the 16 response tokens"),
    "finish reason": ({"finish_reason": "timeout"}, "finish_reason 'timeout'"),
    "nan reward": ({"reward": float("nan")}, "reward must be a finite float"),
    "routing positions": ({"routing": np.zeros((5, 2, 2), np.uint8)}, "routing covers 5 positions"),
    "negative token": ({"response_ids": np.full(16, -1, np.int32)}, "negative token id"),
}


@pytest.mark.parametrize("changes,message", BAD_SAMPLES.values(), ids=BAD_SAMPLES.keys())
def test_invalid_records_are_refused_with_the_reason(changes: dict[str, object], message: str) -> None:
    group = _replace_sample(synthetic_group(np.random.default_rng(1), prompt_len=4, response_len=16), **changes)
    with pytest.raises(SchemaError, match=message):
        GroupCodec().encode(group)


def _frame_with_header(frame: bytes, edit: dict[str, object]) -> bytes:
    head_len = struct.unpack_from("<I", frame, 4)[0]
    header = msgpack.unpackb(frame[8 : 8 + head_len], raw=False)
    header.update(edit)
    head = msgpack.packb(header, use_bin_type=True)
    pad = -(8 + len(head)) % 8
    body_start = 8 + head_len + (-(8 + head_len) % 8)
    return frame[:4] + struct.pack("<I", len(head)) + head + b"\0" * pad + frame[body_start:]


def test_unknown_schema_version_is_refused() -> None:
    frame = GroupCodec().encode(synthetic_group(np.random.default_rng(2)))
    with pytest.raises(SchemaError, match="unknown schema version 2"):
        GroupCodec().decode(_frame_with_header(frame, {"v": 2}))


def test_unknown_header_key_is_refused() -> None:
    frame = GroupCodec().encode(synthetic_group(np.random.default_rng(2)))
    with pytest.raises(SchemaError, match="unexpected keys \\['extra'\\]"):
        GroupCodec().decode(_frame_with_header(frame, {"extra": 1}))


def test_disallowed_dtype_on_the_wire_is_refused() -> None:
    frame = GroupCodec().encode(synthetic_group(np.random.default_rng(2), prompt_len=4))
    head_len = struct.unpack_from("<I", frame, 4)[0]
    header = msgpack.unpackb(frame[8 : 8 + head_len], raw=False)
    header["prompt"][0] = "|O"
    with pytest.raises(SchemaError, match="dtype '\\|O' is not allowed"):
        GroupCodec().decode(_frame_with_header(frame, {"prompt": header["prompt"]}))


def test_shape_that_disagrees_with_byte_length_is_refused() -> None:
    frame = GroupCodec().encode(synthetic_group(np.random.default_rng(2), prompt_len=4))
    head_len = struct.unpack_from("<I", frame, 4)[0]
    header = msgpack.unpackb(frame[8 : 8 + head_len], raw=False)
    header["prompt"][1] = [3]
    with pytest.raises(SchemaError, match="needs 12 bytes, the entry has 16"):
        GroupCodec().decode(_frame_with_header(frame, {"prompt": header["prompt"]}))


def test_oversized_entry_is_refused_before_parsing() -> None:
    codec = GroupCodec(CodecConfig(max_entry_bytes=1000))
    with pytest.raises(SchemaError, match="over max_entry_bytes"):
        codec.decode(b"\0" * 1001)


def test_too_many_tokens_is_refused() -> None:
    group = synthetic_group(np.random.default_rng(3), response_len=20)
    with pytest.raises(SchemaError, match="over the limit of 10"):
        GroupCodec(limits=Limits(max_response_tokens=10)).decode(GroupCodec().encode(group))


def test_token_ids_outside_the_vocabulary_are_refused_where_it_is_known() -> None:
    group = synthetic_group(np.random.default_rng(4), vocab=1000)
    frame = GroupCodec().encode(group)
    GroupCodec().decode(frame)  # unchecked by default
    with pytest.raises(SchemaError, match="outside the vocabulary of 10"):
        GroupCodec(limits=Limits(vocab_size=10)).decode(frame)
    GroupCodec(limits=Limits(vocab_size=1000)).decode(frame)


def test_compressed_array_with_lying_size_is_refused() -> None:
    codec = GroupCodec(CodecConfig(compress_min_bytes=1))
    frame = codec.encode(synthetic_group(np.random.default_rng(2), prompt_len=64))
    head_len = struct.unpack_from("<I", frame, 4)[0]
    header = msgpack.unpackb(frame[8 : 8 + head_len], raw=False)
    header["prompt"][1] = [32]
    with pytest.raises(SchemaError, match="prompt_ids"):
        codec.decode(_frame_with_header(frame, {"prompt": header["prompt"]}))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_only_ever_raise_schema_error(data: bytes) -> None:
    for candidate in (data, b"MSG1" + data):
        with pytest.raises(SchemaError):
            GroupCodec().decode(candidate)


_VALID = GroupCodec(CodecConfig(compress_min_bytes=64)).encode(
    synthetic_group(np.random.default_rng(4), n_samples=2, prompt_len=8, response_len=24, routing_layers=2, topk=2)
)


@settings(max_examples=600, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, len(_VALID)),
)
def test_mutated_frames_decode_or_raise_schema_error(edits: list[tuple[int, int]], cut: int) -> None:
    frame = bytearray(_VALID)
    for pos, value in edits:
        frame[pos] = value
    for candidate in (bytes(frame), bytes(frame[:cut])):
        with contextlib.suppress(SchemaError):
            GroupCodec(CodecConfig(compress_min_bytes=64)).decode(candidate)


def test_zstd_frame_declaring_a_huge_size_is_refused_without_allocating_it() -> None:
    import zstandard

    # magic, descriptor 0xE0 (single segment, 8-byte content size), content size 2**40, one raw 4-byte block
    hostile = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", 1 << 40) + bytes([0x21, 0, 0]) + b"abcd"
    assert zstandard.frame_content_size(hostile) == 1 << 40
    with pytest.raises(SchemaError, match="declares 1099511627776 bytes, the shape needs 256"):
        GroupCodec()._decompress(memoryview(hostile), 256, "prompt_ids")
