"""Synthetic trajectory groups of realistic shape, for tests, benchmarks and load generation."""

from __future__ import annotations

import time
import uuid

import numpy as np

from miles_stream.schema import Sample, TrajectoryGroup, make_spans


def synthetic_group(
    rng: np.random.Generator,
    *,
    n_samples: int = 8,
    prompt_len: int = 64,
    response_len: int = 128,
    vocab: int = 151_936,
    routing_layers: int = 0,
    topk: int = 8,
    experts: int = 128,
    version: int = 0,
    producer_id: str = "synthetic",
    prompt_key: str | None = None,
    group_id: str | None = None,
) -> TrajectoryGroup:
    """A valid group with random tokens, logprobs and rewards; routing traces when `routing_layers` > 0."""
    routing_dtype = np.uint8 if experts <= 256 else np.uint16

    def sample(length: int) -> Sample:
        routing = None
        if routing_layers:
            positions = max(prompt_len + length - 1, 0)
            routing = rng.integers(0, experts, (positions, routing_layers, topk), dtype=routing_dtype)
        return Sample(
            response_ids=rng.integers(0, vocab, length, dtype=np.int32),
            logprobs=(-rng.exponential(1.0, length)).astype(np.float32),
            loss_mask=np.ones(length, dtype=np.uint8),
            version_spans=make_spans([(0, version)]),
            finish_reason="stop",
            reward=float(rng.integers(0, 2)),
            routing=routing,
        )

    return TrajectoryGroup(
        group_id=group_id or uuid.uuid4().hex,
        prompt_key=prompt_key or uuid.uuid4().hex[:12],
        producer_id=producer_id,
        prompt_ids=rng.integers(0, vocab, prompt_len, dtype=np.int32),
        samples=tuple(sample(response_len) for _ in range(n_samples)),
        created_at=time.time(),
    )


def payload_bytes(group: TrajectoryGroup) -> int:
    """Bytes of array data in `group` (what the throughput figures count)."""
    total = group.prompt_ids.nbytes
    for s in group.samples:
        total += s.response_ids.nbytes + s.logprobs.nbytes + s.loss_mask.nbytes + s.version_spans.nbytes
        total += 0 if s.routing is None else s.routing.nbytes
    return total
