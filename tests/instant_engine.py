"""A rollout engine that answers at once with random tokens, and a byte tokenizer, for tests where the bus is what
is checked (no model). Importable from any test: the conftest beside it puts tests/ on sys.path.

`HangingEngine` generates until it is aborted (what `RolloutProducer` does on stop), then answers every request
with no token and finish reason "abort": the producer hands the prompt back (`producer._recycle`); `LateEngine`
loses the first abort."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from miles_stream.engines.base import GenerationRequest, GenerationResult
from miles_stream.rewards.base import inline


class InstantEngine:
    weight_version = 0

    def __init__(self, length: int = 4, seed: int = 0) -> None:
        self.length, self.rng = length, np.random.default_rng(seed)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        await asyncio.sleep(0)
        return [self._result(r.request_id, self.length, "stop") for r in requests]

    def _result(self, request_id: str, length: int, reason: Any) -> GenerationResult:
        return GenerationResult(request_id=request_id, response_ids=self.rng.integers(3, 60, length, dtype=np.int32),
                                logprobs=np.full(length, -1.0, np.float32), finish_reason=reason,
                                version_spans=np.zeros((1, 2), np.int64))  # fmt: skip

    async def update_weights(self, version: int, state: Any) -> None: ...

    async def abort(self, request_ids: Sequence[str]) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def close(self) -> None: ...


class HangingEngine(InstantEngine):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0  # generate calls made (one a group: `SingleTurn.group`)
        self._aborted = asyncio.Event()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls += 1
        await self._aborted.wait()
        return [self._result(r.request_id, 0, "abort") for r in requests]

    async def abort(self, request_ids: Sequence[str]) -> None:
        self._aborted.set()


class LateEngine(HangingEngine):
    """A `HangingEngine` whose first abort is lost, as one that reaches a server before the request it names
    (vLLM ignores an id it does not hold yet); the requests end at the next abort."""

    def __init__(self) -> None:
        super().__init__()
        self.aborts = 0

    async def abort(self, request_ids: Sequence[str]) -> None:
        self.aborts += 1
        if self.aborts > 1:
            await super().abort(request_ids)


class ByteTokenizer:
    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode()[:64])}

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return [bytes(r).decode(errors="replace") for r in rows]


@inline  # scored in the loop, no thread (rewards/base.py)
def constant_reward(sample: Any) -> float:
    return 1.0
