"""How one sample is rolled out: `RolloutFn`, single-turn by default, multi-turn with tools as a worked example.

A multi-turn sample interleaves the model's tokens (loss mask 1, the engine's logprobs) with tool output
(loss mask 0, logprob 0): each turn re-runs the whole context through the engine and generates until a stop
token, then the tool answers and the next turn starts. Version spans are offset to response positions.
The routing trace is the last turn's, which ran over every position (prompt, earlier turns, tool output):
under one weight version it equals what each earlier turn saw.

Legend: P prompt tokens, T response tokens (model and tool), as in `schema.Sample`.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from miles_stream.rollout.types import (
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
    merge_spans,
)
from miles_stream.schema import FinishReason, make_spans


@dataclass(frozen=True, slots=True, kw_only=True)
class Trajectory:
    """One sample before scoring: the `schema.Sample` fields less the reward."""

    response_ids: np.ndarray
    logprobs: np.ndarray
    loss_mask: np.ndarray
    version_spans: np.ndarray
    finish_reason: FinishReason
    routing: np.ndarray | None


class RolloutFn(Protocol):
    async def __call__(
        self, engine: RolloutEngine, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> Trajectory: ...


async def single_turn(
    engine: RolloutEngine, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
) -> Trajectory:
    (result,) = await engine.generate([GenerationRequest(request_id=request_id, prompt_ids=prompt_ids, params=params)])
    return Trajectory(
        response_ids=result.response_ids,
        logprobs=result.logprobs,
        loss_mask=np.ones(len(result.response_ids), dtype=np.uint8),
        version_spans=result.version_spans,
        finish_reason=result.finish_reason,
        routing=result.routing,
    )


Tool = Callable[[list[int]], list[int] | None]  # response so far -> tool output tokens, or None to end


@dataclass(frozen=True, slots=True)
class ToolLoop:
    """Turns of model output and tool output, up to `max_turns` model turns and `params.max_new_tokens`
    response tokens in all. A turn that ends otherwise than on a stop token ends the sample."""

    tool: Tool
    max_turns: int = 4

    async def __call__(
        self, engine: RolloutEngine, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> Trajectory:
        ids: list[int] = []
        logprobs: list[float] = []
        mask: list[int] = []
        spans: list[tuple[int, int]] = []
        for turn in range(self.max_turns):
            budget = params.max_new_tokens - len(ids)
            request = GenerationRequest(request_id=request_id, prompt_ids=[*prompt_ids, *ids],
                                        params=dataclasses.replace(params, max_new_tokens=budget))  # fmt: skip
            (result,) = await engine.generate([request])
            spans += [(start + len(ids), version) for start, version in result.version_spans.tolist()]
            ids += result.response_ids.tolist()
            logprobs += result.logprobs.tolist()
            mask += [1] * len(result.response_ids)
            answer = self.tool(ids) if result.finish_reason == "stop" and turn + 1 < self.max_turns else None
            if not answer or len(ids) + len(answer) >= params.max_new_tokens:
                return _trajectory(ids, logprobs, mask, spans, result)
            ids += answer
            logprobs += [0.0] * len(answer)
            mask += [0] * len(answer)
        raise AssertionError("unreachable: the last turn returns")


def _trajectory(
    ids: list[int], logprobs: list[float], mask: list[int], spans: list[tuple[int, int]], last: GenerationResult
) -> Trajectory:
    return Trajectory(
        response_ids=np.asarray(ids, dtype=np.int32),
        logprobs=np.asarray(logprobs, dtype=np.float32),
        loss_mask=np.asarray(mask, dtype=np.uint8),
        version_spans=make_spans(merge_spans(spans, len(ids))),
        finish_reason=last.finish_reason,
        routing=last.routing,
    )


# ---- the worked example: a calculator ------------------------------------------------------------------
_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
}  # fmt: skip


def evaluate_arithmetic(expression: str) -> int | None:
    """Integer +, -, *, // over literals, parsed (never eval'd); None if the text is not such an expression."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 10**12:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return int(_OPS[type(node.op)](value(node.left), value(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError("not integer arithmetic")

    try:
        return value(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


@dataclass(frozen=True, slots=True)
class Calculator:
    """A tool for `ToolLoop`: when the model's text so far ends with "=", the arithmetic between the last
    "(" and that "=" is computed and its digits are the tool output; otherwise the sample ends. Use it with
    "=" among the stop token ids so that each turn ends where the tool should answer."""

    tokenizer: Any

    def __call__(self, response_ids: list[int]) -> list[int] | None:
        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        if not text.endswith("="):
            return None
        result = evaluate_arithmetic(text[text.rfind("(") + 1 : -1])
        if result is None:
            return None
        ids: list[int] = self.tokenizer(str(result), add_special_tokens=False)["input_ids"]
        return ids
