"""Records on the wire: one `TrajectoryGroup` per stream entry, holding all n `Sample`s of one prompt.

Shapes (legend: P prompt tokens, T response tokens, S version spans, L MoE layers, K experts per token):

    TrajectoryGroup.prompt_ids   int32   [P]        shared by every sample of the group
    Sample.response_ids          int32   [T]
    Sample.logprobs              float32 [T]        behaviour logprob of each sampled token
    Sample.loss_mask             uint8   [T]        1 = counts in the loss, 0 = tool output and the like
    Sample.version_spans         int64   [S, 2]     rows (first response token index, weight version);
                                                    first index is 0, indices strictly increase
    Sample.routing               uint8 | uint16 [P + T - 1, L, K]   or None; the experts chosen at every
                                                    position the model ran on (the last sampled token is
                                                    never fed back), uint8 when there are fewer than 256

Arrays are numpy arrays; decoded ones are read-only views into the received bytes. `validate_group`
checks every invariant above and raises `SchemaError` naming the field; the codec calls it on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

from miles_stream.errors import SchemaError

SCHEMA_VERSION: Final = 1
FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: Final = ("stop", "length", "abort")

PROMPT_DTYPES: Final = (np.dtype("<i4"),)
TOKEN_DTYPES: Final = (np.dtype("<i4"),)
LOGPROB_DTYPES: Final = (np.dtype("<f4"),)
MASK_DTYPES: Final = (np.dtype("u1"),)
SPAN_DTYPES: Final = (np.dtype("<i8"),)
ROUTING_DTYPES: Final = (np.dtype("u1"), np.dtype("<u2"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One sampled response to the group's prompt."""

    response_ids: np.ndarray
    logprobs: np.ndarray
    loss_mask: np.ndarray
    version_spans: np.ndarray
    finish_reason: FinishReason
    reward: float
    routing: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def oldest_version(self) -> int:
        return int(self.version_spans[:, 1].min())

    @property
    def newest_version(self) -> int:
        return int(self.version_spans[:, 1].max())


@dataclass(frozen=True, slots=True, kw_only=True)
class TrajectoryGroup:
    """All samples of one prompt: what GRPO-style advantages need in one piece."""

    group_id: str
    prompt_key: str
    producer_id: str
    prompt_ids: np.ndarray
    samples: tuple[Sample, ...]
    created_at: float
    schema_version: int = field(default=SCHEMA_VERSION)

    @property
    def oldest_version(self) -> int:
        return min(s.oldest_version for s in self.samples)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Size limits enforced on decode, so one bad record cannot exhaust a consumer's memory."""

    max_samples: int = 1024
    max_prompt_tokens: int = 262_144
    max_response_tokens: int = 262_144
    max_spans: int = 4096
    max_routing_layers: int = 1024
    max_routing_topk: int = 64
    max_id_bytes: int = 256
    vocab_size: int = 0  # token ids must be below it; 0 = unchecked (a consumer that knows its model sets it)


DEFAULT_LIMITS: Final = Limits()


def make_spans(pairs: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> np.ndarray:
    """Version spans from (first token index, version) pairs."""
    return np.asarray(pairs, dtype="<i8").reshape(-1, 2)


def validate_group(group: TrajectoryGroup, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise `SchemaError` unless every invariant of the module docstring holds."""
    if group.schema_version != SCHEMA_VERSION:
        raise SchemaError(f"unknown schema version {group.schema_version} (this build reads {SCHEMA_VERSION})")
    for name in ("group_id", "prompt_key", "producer_id"):
        value = getattr(group, name)
        if not isinstance(value, str) or not value or len(value.encode()) > limits.max_id_bytes:
            raise SchemaError(f"{name} must be a non-empty string of at most {limits.max_id_bytes} bytes")
    if not isinstance(group.created_at, float) or not math.isfinite(group.created_at):
        raise SchemaError(f"created_at must be a finite float, got {group.created_at!r}")
    _check_array("prompt_ids", group.prompt_ids, PROMPT_DTYPES, 1)
    prompt_len = group.prompt_ids.shape[0]
    if prompt_len > limits.max_prompt_tokens:
        raise SchemaError(f"prompt has {prompt_len} tokens, over the limit of {limits.max_prompt_tokens}")
    if prompt_len and int(group.prompt_ids.min()) < 0:
        raise SchemaError("prompt_ids holds a negative token id")
    if prompt_len and limits.vocab_size and int(group.prompt_ids.max()) >= limits.vocab_size:
        raise SchemaError(f"prompt_ids holds token id {int(group.prompt_ids.max())}, outside the vocabulary "
                          f"of {limits.vocab_size}")  # fmt: skip
    if not 1 <= len(group.samples) <= limits.max_samples:
        raise SchemaError(f"a group holds 1 to {limits.max_samples} samples, got {len(group.samples)}")
    routing_layout: tuple[int, int] | None = None
    for i, sample in enumerate(group.samples):
        if not isinstance(sample, Sample):
            raise SchemaError(f"samples[{i}] is {type(sample).__name__}, not Sample")
        layout = _validate_sample(sample, prompt_len, limits, f"samples[{i}]")
        if i == 0:
            routing_layout = layout
        elif layout != routing_layout:
            raise SchemaError(f"samples[{i}] routing layout {layout} differs from samples[0]'s {routing_layout}")


def _validate_sample(s: Sample, prompt_len: int, limits: Limits, where: str) -> tuple[int, int] | None:
    _check_array(f"{where}.response_ids", s.response_ids, TOKEN_DTYPES, 1)
    n = s.response_ids.shape[0]
    if n > limits.max_response_tokens:
        raise SchemaError(f"{where} has {n} response tokens, over the limit of {limits.max_response_tokens}")
    if n and int(s.response_ids.min()) < 0:
        raise SchemaError(f"{where}.response_ids holds a negative token id")
    if n and limits.vocab_size and int(s.response_ids.max()) >= limits.vocab_size:
        raise SchemaError(f"{where}.response_ids holds token id {int(s.response_ids.max())}, outside the "
                          f"vocabulary of {limits.vocab_size}")  # fmt: skip
    _check_array(f"{where}.logprobs", s.logprobs, LOGPROB_DTYPES, 1)
    _check_array(f"{where}.loss_mask", s.loss_mask, MASK_DTYPES, 1)
    for name, arr in (("logprobs", s.logprobs), ("loss_mask", s.loss_mask)):
        if arr.shape[0] != n:
            raise SchemaError(f"{where}.{name} has {arr.shape[0]} entries for {n} response tokens")
    if n and not bool(np.isfinite(s.logprobs).all()):
        raise SchemaError(f"{where}.logprobs holds NaN or inf")
    if n and float(s.logprobs.max()) > 1e-3:
        raise SchemaError(f"{where}.logprobs holds a positive log-probability {float(s.logprobs.max())}")
    if n and int(s.loss_mask.max()) > 1:
        raise SchemaError(f"{where}.loss_mask holds a value other than 0 or 1")
    _check_spans(s.version_spans, n, limits, where)
    if s.finish_reason not in FINISH_REASONS:
        raise SchemaError(f"{where}.finish_reason {s.finish_reason!r} is not one of {FINISH_REASONS}")
    if not isinstance(s.reward, float) or not math.isfinite(s.reward):
        raise SchemaError(f"{where}.reward must be a finite float, got {s.reward!r}")
    if s.routing is None:
        return None
    _check_array(f"{where}.routing", s.routing, ROUTING_DTYPES, 3)
    positions, layers, topk = s.routing.shape
    expected = max(prompt_len + n - 1, 0)
    if positions != expected:
        raise SchemaError(f"{where}.routing covers {positions} positions, expected prompt + response - 1 = {expected}")
    if not (1 <= layers <= limits.max_routing_layers and 1 <= topk <= limits.max_routing_topk):
        raise SchemaError(f"{where}.routing layout [{layers} layers, top-{topk}] is outside the limits")
    return layers, topk


def _check_spans(spans: np.ndarray, n: int, limits: Limits, where: str) -> None:
    _check_array(f"{where}.version_spans", spans, SPAN_DTYPES, 2)
    count = spans.shape[0]
    if spans.shape[1] != 2 or not 1 <= count <= limits.max_spans:
        raise SchemaError(f"{where}.version_spans must be [S, 2] with 1 <= S <= {limits.max_spans}, got {spans.shape}")
    starts, versions = spans[:, 0], spans[:, 1]
    if starts[0] != 0:
        raise SchemaError(f"{where}.version_spans must start at token 0, got {int(starts[0])}")
    if count > 1 and not bool((np.diff(starts) > 0).all()):
        raise SchemaError(f"{where}.version_spans token indices must strictly increase")
    if count > 1 and int(starts[-1]) >= n:
        raise SchemaError(f"{where}.version_spans start at token {int(starts[-1])} past the {n} response tokens")
    if int(versions.min()) < 0:
        raise SchemaError(f"{where}.version_spans holds a negative weight version")


def _check_array(name: str, arr: object, dtypes: tuple[np.dtype, ...], ndim: int) -> None:
    if not isinstance(arr, np.ndarray):
        raise SchemaError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype not in dtypes:
        allowed = ", ".join(d.str for d in dtypes)
        raise SchemaError(f"{name} has dtype {arr.dtype.str}, allowed: {allowed}")
    if arr.ndim != ndim:
        raise SchemaError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
