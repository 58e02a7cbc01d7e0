"""Rollout functions: single-turn and multi-turn with a tool, on the native engine and a tiny MoE model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.models import TinyModelConfig, build_tiny_model, build_tokenizer
from miles_stream.rollout import SamplingParams
from miles_stream.rollout.native import NativeEngine
from miles_stream.rollout.turns import Calculator, ToolLoop, evaluate_arithmetic, single_turn


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
