"""Rollout functions: single-turn and multi-turn with a tool, on the native engine and a tiny MoE model."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.engines.base import GenerationResult
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model, build_tokenizer
from miles_stream.rollout import SamplingParams
from miles_stream.rollout.turns import Calculator, ToolLoop, Trajectory, evaluate_arithmetic, extend, single_turn
from miles_stream.schema import make_spans


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("moe"), TinyModelConfig(kind="moe"))


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[NativeEngine]:
    eng = NativeEngine(str(model_dir), max_batch=4, seed=3)
    yield eng
    await eng.close()


@pytest.mark.parametrize(
    "text,value",
    [("12+34", 46), ("2*3-4", 2), ("7//2", 3), ("-5+1", -4), ("2**100", None), ("1/2", None), ("7//0", None),
     ("__import__('os').system('x')", None), ("", None), ("12+", None)],
)  # fmt: skip
def test_arithmetic_is_parsed_not_evaluated(text: str, value: int | None) -> None:
    assert evaluate_arithmetic(text) == value


def test_calculator_answers_after_an_equals_sign() -> None:
    tok = build_tokenizer()
    calc = Calculator(tok)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert calc(ids("so (12+34=")) == ids("46")
    assert calc(ids("12+34")) is None
    assert calc(ids("(a+b=")) is None


async def test_single_turn_is_one_engine_call_with_a_full_mask(engine: NativeEngine) -> None:
    traj = await single_turn(engine, [5, 6, 7], SamplingParams(max_new_tokens=5, ignore_eos=True), "r")
    assert len(traj.response_ids) == 5 and traj.loss_mask.tolist() == [1] * 5


async def test_tool_turns_interleave_masked_tool_output_with_model_tokens(
    engine: NativeEngine, model_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    every_char = tuple(range(4, len(tokenizer)))  # each model turn stops after its first token
    answer = tokenizer("42", add_special_tokens=False)["input_ids"]
    loop = ToolLoop(lambda ids: answer, max_turns=3)
    params = SamplingParams(temperature=0.7, max_new_tokens=50, stop_token_ids=every_char)
    prompt = [5, 6, 7, 8]
    traj = await loop(engine, prompt, params, "r")
    assert traj.loss_mask.tolist() == [1, 0, 0, 1, 0, 0, 1]
    assert traj.response_ids[[1, 2, 4, 5]].tolist() == answer * 2
    assert traj.logprobs[traj.loss_mask == 0].tolist() == [0.0] * 4
    assert traj.version_spans.tolist() == [[0, 0]] and traj.finish_reason == "stop"
    # the model's tokens are scored exactly as a teacher-forced pass over the whole sequence scores them
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chosen: list[torch.Tensor] = []
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    hooks = [g.register_forward_hook(lambda mod, inp, out: chosen.append(out[2])) for g in gates]
    full = torch.tensor([prompt + traj.response_ids.tolist()])
    with torch.no_grad():
        logits = model(full[:, :-1]).logits[0, len(prompt) - 1 :]
    for h in hooks:
        h.remove()
    logp = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(traj.response_ids, dtype=torch.long)[:, None])
    model_tokens = torch.from_numpy(traj.loss_mask == 1)
    assert torch.allclose(logp.squeeze(-1)[model_tokens], torch.from_numpy(traj.logprobs)[model_tokens], atol=1e-5)
    assert traj.routing is not None and traj.routing.shape[0] == len(prompt) + len(traj.response_ids) - 1
    assert (np.sort(traj.routing, -1) == np.sort(torch.stack(chosen, 1).numpy(), -1)).all()


async def test_the_token_budget_covers_all_turns(engine: NativeEngine) -> None:
    loop = ToolLoop(lambda ids: [10, 11, 12], max_turns=10)
    params = SamplingParams(max_new_tokens=9, stop_token_ids=tuple(range(4, 50)))
    traj = await loop(engine, [5, 6], params, "r")
    assert len(traj.response_ids) <= 9
    assert traj.loss_mask[-1] == 1  # a sample never ends on tool output


def _cut(traj: Trajectory, n: int, prompt_len: int) -> Trajectory:
    """The first `n` response tokens of `traj`, as an aborted rollout would have left them."""
    routing = None if traj.routing is None else traj.routing[: prompt_len + n - 1]
    return Trajectory(response_ids=traj.response_ids[:n], logprobs=traj.logprobs[:n], loss_mask=traj.loss_mask[:n],
                      version_spans=traj.version_spans[:1], finish_reason="abort", routing=routing)  # fmt: skip


@pytest.mark.parametrize("cut", [1, 4, 7])
async def test_a_resumed_greedy_sample_equals_the_uninterrupted_one(engine: NativeEngine, cut: int) -> None:
    prompt, params = [5, 6, 7], SamplingParams(temperature=0, max_new_tokens=9, ignore_eos=True)
    whole = await single_turn(engine, prompt, params, "whole")
    resumed = await single_turn(engine, prompt, params, "resumed", prefix=_cut(whole, cut, len(prompt)))
    assert resumed.response_ids.tolist() == whole.response_ids.tolist()
    assert np.allclose(resumed.logprobs, whole.logprobs, atol=1e-5)
    assert resumed.routing is not None and whole.routing is not None
    assert resumed.routing.shape == whole.routing.shape
    assert (np.sort(resumed.routing, -1) == np.sort(whole.routing, -1)).all()
    assert resumed.finish_reason == "length" and resumed.version_spans.tolist() == [[0, 0]]


async def test_a_tool_loop_resumes_mid_turn_and_after_tool_output(engine: NativeEngine) -> None:
    loop = ToolLoop(lambda ids: [10, 11], max_turns=3)
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=tuple(range(4, 50)))
    prompt = [5, 6, 7, 8]
    whole = await loop(engine, prompt, params, "whole")
    assert whole.loss_mask.tolist() == [1, 0, 0, 1, 0, 0, 1]
    assert whole.routing is not None
    for cut in (3, 6):  # after tool output, which the model has not run over yet (each model turn is one token)
        known = whole.routing[: len(prompt) + cut - 3]  # fewer routing rows than prompt + response - 1
        prefix = dataclasses.replace(_cut(whole, cut, len(prompt)), routing=known)
        resumed = await loop(engine, prompt, params, "resumed", prefix=prefix)
        assert resumed.response_ids.tolist() == whole.response_ids.tolist(), cut
        assert resumed.loss_mask.tolist() == whole.loss_mask.tolist()
        assert resumed.routing is not None and whole.routing is not None
        assert (np.sort(resumed.routing, -1) == np.sort(whole.routing, -1)).all()


def test_extend_records_a_new_version_span_where_the_resumed_tokens_start() -> None:
    done = Trajectory(response_ids=np.array([1, 2], np.int32), logprobs=np.array([-1, -2], np.float32),
                      loss_mask=np.ones(2, np.uint8), version_spans=make_spans([(0, 3)]), finish_reason="abort",
                      routing=np.zeros((4, 2, 1), np.uint8))  # fmt: skip
    result = GenerationResult(request_id="r", response_ids=np.array([3], np.int32),
                              logprobs=np.array([-0.5], np.float32), finish_reason="stop",
                              version_spans=make_spans([(0, 4)]), routing=np.ones((5, 2, 1), np.uint8))  # fmt: skip
    out = extend(done, result)
    assert out.response_ids.tolist() == [1, 2, 3] and out.logprobs.tolist() == [-1, -2, -0.5]
    assert out.version_spans.tolist() == [[0, 3], [2, 4]] and out.finish_reason == "stop"
    assert out.routing is not None and out.routing[:, 0, 0].tolist() == [0, 0, 0, 0, 1]  # known rows kept
