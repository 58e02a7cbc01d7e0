"""How one sample is rolled out: `RolloutFn`, single-turn by default, multi-turn with tools as a worked example.

A multi-turn sample interleaves the model's tokens (loss mask 1, the engine's logprobs) with tool output
(loss mask 0, logprob 0): each turn re-runs the whole context through the engine and generates until a stop
token, then the tool answers and the next turn starts. Version spans are offset to response positions.

Every rollout function can resume a sample from a `prefix`, the partial `Trajectory` of an aborted rollout
(`{ns}:partials`): the engine is given prompt + prefix as its context and the budget left, and what it
returns is appended (`extend`). The routing trace keeps the rows already known and takes the rest from the
newest engine call, which ran over every position (prompt, earlier turns, tool output): rows recorded under
an older weight version stay as they were recorded.

Legend: P prompt tokens, T response tokens (model and tool), as in `schema.Sample`. While a sample is being
built its routing may cover fewer than P + T - 1 positions (tool output not yet run through the model);
a finished sample's covers them all.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from miles_stream.engines.base import (
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

    @staticmethod
    def empty() -> Trajectory:
        return Trajectory(
            response_ids=np.zeros(0, np.int32), logprobs=np.zeros(0, np.float32), loss_mask=np.zeros(0, np.uint8),
            version_spans=make_spans([]), finish_reason="abort", routing=None,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.response_ids)


class RolloutFn(Protocol):
    async def __call__(
        self,
        engine: RolloutEngine,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        prefix: Trajectory | None = None,
    ) -> Trajectory: ...


def extend(done: Trajectory, result: GenerationResult) -> Trajectory:
    """`done` followed by the model tokens of `result`, which the engine generated after prompt + `done`."""
    offset = len(done)
    spans = [*done.version_spans.tolist(), *((start + offset, v) for start, v in result.version_spans.tolist())]
    routing = result.routing
    if done.routing is not None and routing is not None:
        routing = np.concatenate([done.routing, routing[len(done.routing) :]])
    return Trajectory(
        response_ids=np.concatenate([done.response_ids, result.response_ids.astype(np.int32)]),
        logprobs=np.concatenate([done.logprobs, result.logprobs.astype(np.float32)]),
        loss_mask=np.concatenate([done.loss_mask, np.ones(len(result.response_ids), np.uint8)]),
        version_spans=make_spans(merge_spans([tuple(s) for s in spans], offset + len(result.response_ids))),
        finish_reason=result.finish_reason,
        routing=routing if routing is not None else done.routing,
    )


def append_tool_output(done: Trajectory, tool_ids: Sequence[int]) -> Trajectory:
    """`done` followed by tool output: not the model's, so loss mask 0 and logprob 0."""
    n = len(tool_ids)
    return dataclasses.replace(
        done,
        response_ids=np.concatenate([done.response_ids, np.asarray(tool_ids, np.int32)]),
        logprobs=np.concatenate([done.logprobs, np.zeros(n, np.float32)]),
        loss_mask=np.concatenate([done.loss_mask, np.zeros(n, np.uint8)]),
    )


def _continuation(
    prompt_ids: Sequence[int], done: Trajectory, params: SamplingParams, request_id: str
) -> GenerationRequest | None:
    """The engine request that continues `done` within what is left of `params.max_new_tokens`; None where
    nothing is left."""
    budget = params.max_new_tokens - len(done)
    if budget < 1:
        return None
    return GenerationRequest(request_id=request_id, prompt_ids=[*prompt_ids, *done.response_ids.tolist()],
                             params=dataclasses.replace(params, max_new_tokens=budget))  # fmt: skip


async def generate_after(
    engine: RolloutEngine, prompt_ids: Sequence[int], done: Trajectory, params: SamplingParams, request_id: str
) -> Trajectory:
    """One engine call that continues `done` within what is left of `params.max_new_tokens`."""
    request = _continuation(prompt_ids, done, params, request_id)
    if request is None:  # nothing left to generate: the sample ends where it is
        return dataclasses.replace(done, finish_reason="length")
    (result,) = await engine.generate([request])
    return extend(done, result)


class SingleTurn:
    """One engine call per sample: the default `RolloutFn`. `group` rolls out a whole group's samples in one
    engine call, as the producer does: one hand-off to the engine and one wake-up for the n samples instead of
    n of each (at 32 samples a group, per-sample calls were a quarter of the producer's loop)."""

    async def __call__(
        self,
        engine: RolloutEngine,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        prefix: Trajectory | None = None,
    ) -> Trajectory:
        return await generate_after(engine, prompt_ids, prefix or Trajectory.empty(), params, request_id)

    async def group(
        self,
        engine: RolloutEngine,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        prefixes: Sequence[Trajectory | None],
    ) -> list[Trajectory]:
        """Each sample as `self(...)` would make it; a prefix that already ended (not by abort) is kept."""
        out = [p if p is not None and p.finish_reason != "abort" else None for p in prefixes]
        todo = [(i, p or Trajectory.empty()) for i, p in enumerate(prefixes) if out[i] is None]
        requests = {i: _continuation(prompt_ids, done, params, request_id) for i, done in todo}
        asked = [r for r in requests.values() if r is not None]
        results = iter(await engine.generate(asked) if asked else [])
        for i, done in todo:
            ended = dataclasses.replace(done, finish_reason="length")  # nothing left to generate
            out[i] = ended if requests[i] is None else extend(done, next(results))
        return [t for t in out if t is not None]  # every one is set


single_turn = SingleTurn()


Tool = Callable[[list[int]], list[int] | None]  # response so far -> tool output tokens, or None to end


@dataclass(frozen=True, slots=True)
class ToolLoop:
    """Turns of model output and tool output, up to `max_turns` model turns and `params.max_new_tokens`
    response tokens in all. A turn that ends otherwise than on a stop token ends the sample."""

    tool: Tool
    max_turns: int = 4

    async def __call__(
        self,
        engine: RolloutEngine,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        prefix: Trajectory | None = None,
    ) -> Trajectory:
        traj = prefix or Trajectory.empty()
        turns = _tool_outputs(traj.loss_mask)  # model turns finished before the current one
        while True:
            traj = await generate_after(engine, prompt_ids, traj, params, request_id)
            turns += 1
            last_turn = traj.finish_reason != "stop" or turns >= self.max_turns
            answer = None if last_turn else self.tool(traj.response_ids.tolist())
            if not answer or len(traj) + len(answer) >= params.max_new_tokens:
                return traj
            traj = append_tool_output(traj, answer)


def _tool_outputs(mask: np.ndarray) -> int:
    """How many runs of tool output (loss mask 0) a response holds."""
    zero = mask == 0
    return int(zero[0]) + int((zero[1:] & ~zero[:-1]).sum()) if len(mask) else 0


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
