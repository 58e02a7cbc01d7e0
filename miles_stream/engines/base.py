"""What a rollout engine takes and returns, and the `RolloutEngine` protocol every engine implements.

Shapes (legend: P prompt tokens, T response tokens, S version spans, L MoE layers, K experts per token):
    GenerationResult.response_ids   int32   [T]
    GenerationResult.logprobs       float32 [T]   log_softmax(logits / temperature) of each sampled token,
                                                  before top-k / top-p truncation (SGLang's convention;
                                                  temperature 0 means greedy, scored at temperature 1)
    GenerationResult.version_spans  int64   [S, 2] (first response token index, weight version)
    GenerationResult.routing        uint8 | uint16 [P + T - 1, L, K] or None (MoE models)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from miles_stream.config import check
from miles_stream.schema import FinishReason

if TYPE_CHECKING:
    import torch

    from miles_stream.weights.manifest import WeightManifest


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # the engine adds the model's EOS unless ignore_eos
    ignore_eos: bool = False  # for benchmarks: every sample runs to max_new_tokens

    def __post_init__(self) -> None:
        check(self.temperature >= 0, "sampling.temperature", "must be >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "sampling.top_k", "must be >= 0 (0 = off)")
        check(self.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResult:
    request_id: str
    response_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: FinishReason
    version_spans: np.ndarray
    routing: np.ndarray | None = None


def merge_spans(spans: list[tuple[int, int]], num_tokens: int) -> list[tuple[int, int]]:
    """(first token, version) marks in order of time -> one span per run of tokens under one version. A mark
    with no token after it is dropped; one with no token since the previous mark replaces it."""
    out: list[tuple[int, int]] = []
    for start, version in spans:
        if out and start >= num_tokens:
            continue
        if out and out[-1][0] == start:
            out[-1] = (start, version)
        elif not out or out[-1][1] != version:
            out.append((start, version))
    return out


class RolloutEngine(Protocol):
    """An inference engine that samples responses and reports what a trainer needs to correct for it."""

    @property
    def weight_version(self) -> int: ...

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    async def update_weights(self, version: int, state: Mapping[str, torch.Tensor]) -> None: ...

    async def abort(self, request_ids: Sequence[str]) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def close(self) -> None: ...


class ServerPool(Protocol):
    """An engine over HTTP servers that can join and leave while it runs (SGLang, vLLM: `pool.PooledEngine`):
    `rollout/membership.py` keeps `servers` equal to the set a producer is told to drive."""

    @property
    def servers(self) -> Mapping[str, object]: ...

    async def attach(self, url: str) -> None: ...

    async def detach(self, url: str) -> None: ...


@runtime_checkable
class UpdatesFromManifest(Protocol):
    """An engine that takes a published version itself (SGLang: servers may read the version's files, or
    need the bytes pushed their own way); `load` gives the tensors (checksums verified) if it needs them."""

    async def apply_manifest(
        self, manifest: WeightManifest, load: Callable[[], Awaitable[Mapping[str, torch.Tensor]]]
    ) -> None: ...
