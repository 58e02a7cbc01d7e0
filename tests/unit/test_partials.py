"""Partial-rollout entries: what a producer leaves on {ns}:partials decodes to the samples it had."""

from __future__ import annotations

import json

import numpy as np
import pytest

from miles_stream.codec import GroupCodec
from miles_stream.errors import SchemaError
from miles_stream.prompts import PromptRecord, encode_prompt
from miles_stream.rollout.partials import decode_partial, encode_partial
from miles_stream.rollout.turns import Trajectory
from miles_stream.schema import make_spans

PROMPT = PromptRecord(key="7", text="3+4=", label="7", epoch=1, index=7)
PROMPT_IDS = [5, 6, 7, 8]


def traj(n: int, reason: str, routing_rows: int | None = None) -> Trajectory:
    rows = len(PROMPT_IDS) + n - 1 if routing_rows is None else routing_rows
    return Trajectory(
        response_ids=np.arange(10, 10 + n, dtype=np.int32), logprobs=-np.arange(1, n + 1, dtype=np.float32) / 10,
        loss_mask=np.ones(n, np.uint8), version_spans=make_spans([(0, 2), (1, 3)][: min(n, 2)]),
        finish_reason=reason, routing=np.full((rows, 2, 2), 3, np.uint8),  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_partial_round_trips_its_samples_and_counts_the_unstarted_ones() -> None:
    codec = GroupCodec()
    samples = [traj(3, "abort"), traj(5, "stop"), Trajectory.empty(), traj(2, "abort", routing_rows=4)]
    fields = encode_partial(codec, encode_prompt(PROMPT), PROMPT, PROMPT_IDS, samples, "p0")
    assert fields is not None
    partial = decode_partial(codec, fields)
    assert partial.prompt == PROMPT and partial.fresh == 1 and len(partial.prefixes) == 4
    assert partial.prefixes[-1] is None
    for got, want in zip(partial.samples, [samples[0], samples[1], samples[3]], strict=True):
        assert got.response_ids.tolist() == want.response_ids.tolist()
        assert got.logprobs.tolist() == want.logprobs.tolist()
        assert got.version_spans.tolist() == want.version_spans.tolist()
        assert got.finish_reason == want.finish_reason
        assert got.routing is not None and want.routing is not None
        assert got.routing.shape == want.routing.shape  # only the known rows: the padding is not kept
        got.response_ids[0] = 1  # writable, not a view into the received bytes


def test_a_group_with_no_token_yet_is_not_a_partial() -> None:
    assert encode_partial(GroupCodec(), b"", PROMPT, PROMPT_IDS, [Trajectory.empty()] * 2, "p0") is None


def test_malformed_partial_entries_name_what_is_wrong() -> None:
    codec = GroupCodec()
    good = encode_partial(codec, encode_prompt(PROMPT), PROMPT, PROMPT_IDS, [traj(3, "abort")], "p0")
    assert good is not None
    bad_meta = {**good, b"m": json.dumps({"fresh": -1, "routing_rows": [6]}).encode()}
    other = PromptRecord(key="8", text="x", label="", epoch=0, index=8)
    cases = [({k: v for k, v in good.items() if k != b"m"}, "lacks field 'm'"), (bad_meta, "does not fit"),
             ({**good, b"m": b"{"}, "meta is malformed"), ({**good, b"d": b"junk"}, "frame prefix"),
             ({**good, b"p": encode_prompt(other)}, "is not prompt")]  # fmt: skip
    for fields, message in cases:
        with pytest.raises(SchemaError, match=message):
            decode_partial(codec, fields)
