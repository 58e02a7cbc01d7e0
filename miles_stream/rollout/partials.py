"""Partial rollouts on `{ns}:partials`: a group whose samples were interrupted, for any producer to finish.

A producer that aborts a group (a weight update with `rollout.on_update: recycle`, or a stop) publishes
what it has and acks the prompt in one transaction; another producer, or the same one, claims the entry
through the "producers" group, resumes every unfinished sample from where it stopped, starts those that
had not started, scores the whole group and publishes it. The group id is the prompt's, as for a group made
in one go. One entry, three fields:

    d   the samples with at least one token, as a `TrajectoryGroup` (the wire format, validated on both
        sides): finish reason "abort" for an unfinished sample; rewards 0 (the group is scored once whole);
        routing padded with zeros to prompt + response - 1 positions where fewer are known yet
    p   the prompt record (`prompts.encode_prompt`), exactly as the feeder wrote it
    m   JSON: {"fresh": samples not started, "routing_rows": positions of known routing per sample}

An entry that fails to decode is dead-lettered with the reason, like any other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from miles_stream.codec import GroupCodec
from miles_stream.errors import SchemaError
from miles_stream.prompts import PromptRecord, decode_prompt
from miles_stream.rollout.turns import Trajectory
from miles_stream.schema import Sample, TrajectoryGroup

PROMPT = b"p"
META = b"m"


@dataclass(frozen=True, slots=True)
class Partial:
    prompt_data: bytes
    prompt: PromptRecord
    samples: tuple[Trajectory, ...]  # each with at least one token; finish reason "abort" if unfinished
    fresh: int  # samples not started yet

    @property
    def prefixes(self) -> list[Trajectory | None]:
        """One entry per sample of the group: what it has so far, or None to start it."""
        return [*self.samples, *([None] * self.fresh)]


def group_id(prompt: PromptRecord) -> str:
    return f"e{prompt.epoch}-i{prompt.index}"


def encode_partial(
    codec: GroupCodec,
    prompt_data: bytes,
    prompt: PromptRecord,
    prompt_ids: Sequence[int],
    samples: Sequence[Trajectory],
    producer_id: str,
) -> dict[bytes, bytes] | None:
    """The fields of a partial entry, or None if no sample has a token (the prompt alone says it all)."""
    started = [s for s in samples if len(s)]
    if not started:
        return None
    prompt_arr = np.asarray(prompt_ids, dtype=np.int32)
    group = TrajectoryGroup(
        group_id=group_id(prompt),
        prompt_key=prompt.key,
        producer_id=producer_id,
        prompt_ids=prompt_arr,
        samples=tuple(_padded_sample(s, len(prompt_arr)) for s in started),
        created_at=time.time(),
    )
    meta = {"fresh": len(samples) - len(started), "routing_rows": [_rows(s) for s in started]}
    return {b"d": codec.encode(group), PROMPT: prompt_data, META: json.dumps(meta).encode()}


def decode_partial(codec: GroupCodec, fields: Mapping[bytes, Any]) -> Partial:
    """Raises `SchemaError` naming what is wrong with the entry."""
    for name in (b"d", PROMPT, META):
        if name not in fields:
            raise SchemaError(f"partial entry lacks field {name.decode()!r}")
    group = codec.decode(fields[b"d"])
    prompt_data = bytes(fields[PROMPT])
    prompt = decode_prompt(prompt_data)
    try:
        meta = json.loads(fields[META])
        fresh, rows = int(meta["fresh"]), [int(r) for r in meta["routing_rows"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise SchemaError(f"partial entry meta is malformed: {exc}") from exc
    if fresh < 0 or len(rows) != len(group.samples):
        raise SchemaError(f"partial entry meta {meta!r} does not fit its {len(group.samples)} samples")
    if group.group_id != group_id(prompt):
        raise SchemaError(f"partial group {group.group_id!r} is not prompt {group_id(prompt)!r}'s")
    samples = tuple(_trajectory(s, r) for s, r in zip(group.samples, rows, strict=True))
    return Partial(prompt_data, prompt, samples, fresh)


def _rows(s: Trajectory) -> int:
    return 0 if s.routing is None else len(s.routing)


def _padded_sample(s: Trajectory, prompt_len: int) -> Sample:
    routing = s.routing
    if routing is not None:
        missing = prompt_len + len(s) - 1 - len(routing)
        if missing > 0:
            routing = np.concatenate([routing, np.zeros((missing, *routing.shape[1:]), routing.dtype)])
    return Sample(
        response_ids=s.response_ids, logprobs=s.logprobs, loss_mask=s.loss_mask, version_spans=s.version_spans,
        finish_reason=s.finish_reason, reward=0.0, routing=routing,
    )  # fmt: skip


def _trajectory(s: Sample, routing_rows: int) -> Trajectory:
    """The sample as a prefix to resume from, in arrays of its own (the decoded ones are read-only views)."""
    return Trajectory(
        response_ids=np.array(s.response_ids, np.int32), logprobs=np.array(s.logprobs, np.float32),
        loss_mask=np.array(s.loss_mask, np.uint8), version_spans=np.array(s.version_spans),
        finish_reason=s.finish_reason, routing=None if s.routing is None else np.array(s.routing[:routing_rows]),
    )  # fmt: skip
