"""R3: a tiny MoE model rolled out by the native engine (routing recorded), then trained on by a copy whose
routers are perturbed so that their own top-k differs from the recording on a good share of tokens. With
replay the trainer routes every recorded token as recorded and its logprobs come closer to the rollout's."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from miles_stream.engines.base import GenerationRequest, SamplingParams
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.models.moe import moe_routers
from miles_stream.schema import Sample, TrajectoryGroup, make_spans
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.inputs import micro_inputs, packed_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs
from miles_stream.trainer.torch.policy import PolicyTrainer
from miles_stream.trainer.torch.routing_replay import RoutingReplay, replay_inputs


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("moe"), TinyModelConfig(kind="moe", max_position=1024))


@pytest.fixture(scope="module")
def batch(moe_dir: Path) -> RolloutBatch:
    """Six prompts x two samples of 16 tokens, sampled at temperature 1 with routing recorded."""

    async def roll() -> list[Any]:
        engine = NativeEngine(str(moe_dir), max_batch=16, seed=3)
        try:
            params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
            requests = [GenerationRequest(request_id=f"r{i}", prompt_ids=prompt(i // 2), params=params)
                        for i in range(12)]  # fmt: skip
            return await engine.generate(requests)
        finally:
            await engine.close()

    results = asyncio.run(roll())
    groups = []
    for g in range(6):
        pair = results[2 * g : 2 * g + 2]
        samples = tuple(Sample(response_ids=r.response_ids, logprobs=r.logprobs, loss_mask=np.ones(16, np.uint8),
                               version_spans=make_spans([(0, 0)]), finish_reason="length", routing=r.routing,
                               reward=float(i)) for i, r in enumerate(pair))  # fmt: skip
        groups.append(TrajectoryGroup(group_id=f"g{g}", prompt_key=str(g), producer_id="p",
                                      prompt_ids=np.asarray(prompt(g), np.int32), samples=samples,
                                      created_at=0.0))  # fmt: skip
    return collate(groups)


def prompt(group: int) -> list[int]:
    return [1 + group, 4, 6 + group % 3]


def perturbed_routers(moe_dir: Path, scale: float) -> Any:
    model = AutoModelForCausalLM.from_pretrained(str(moe_dir))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for router in moe_routers(model):
            router.weight.add_(scale * router.weight.std() * torch.randn(router.weight.shape, generator=g))
    return model


def forward(
    model: Any, batch: RolloutBatch, *, replace: bool, packed: bool = False, probe: Any = None
) -> tuple[torch.Tensor, float]:
    """(logprobs [B, T], fraction of recorded tokens whose own routing differs) over the whole batch. `probe`
    is hooked on each router after the replay, so it sees what the layer really uses."""
    replay = RoutingReplay(model, replace=replace)
    probes = [r.register_forward_hook(probe) for r in moe_routers(model)] if probe is not None else []
    try:
        replay.begin(replay_inputs(batch.routing, batch.lengths, packed=packed, device="cpu"))
        with torch.no_grad():
            inputs = packed_inputs(batch, "cpu") if packed else micro_inputs(batch, "cpu")
            logp, _ = response_logprobs(model, inputs, temperature=1.0)
        replay.end_forward()
        replay.end()
        differing, recorded = replay.take_counts()
        return logp, differing / recorded
    finally:
        replay.remove()
        for p in probes:
            p.remove()


def gap(logp: torch.Tensor, batch: RolloutBatch) -> float:
    return float(((logp - batch.logp_rollout_BT).abs() * batch.mask_BT).sum() / batch.mask_BT.sum())


def test_the_rollout_trace_lines_up_with_the_trainers_tokens(moe_dir: Path, batch: RolloutBatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(moe_dir))
    logp, differs = forward(model, batch, replace=False)
    assert differs < 0.02  # same weights: the same experts (a misaligned trace would differ almost everywhere)
    assert gap(logp, batch) < 1e-4


@pytest.mark.parametrize("packed", [False, True])
def test_replay_routes_as_recorded_and_brings_logprobs_closer(moe_dir: Path, batch: RolloutBatch,
                                                              packed: bool) -> None:  # fmt: skip
    model = perturbed_routers(moe_dir, scale=0.5)
    free, differs = forward(model, batch, replace=False, packed=packed)
    assert 0.2 < differs < 0.95, differs  # the perturbation moved a good share of tokens to other experts

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    replayed, differs_again = forward(model, batch, replace=True, packed=packed,
                                      probe=lambda m, a, out: seen.append((out[2], out[1])))  # fmt: skip
    # still the router's own choice, counted before it is replaced (later layers see replayed inputs, so it moves)
    assert differs_again == pytest.approx(differs, abs=0.05)
    ids, recorded = replay_inputs(batch.routing, batch.lengths, packed=packed, device="cpu")  # type: ignore[misc]
    assert len(seen) == len(moe_routers(model))
    for layer, (chosen, weights) in enumerate(seen):
        assert torch.equal(chosen[recorded], ids[recorded, layer])  # every recorded token, every layer
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))  # renormalised (Qwen3 norm_topk)
    assert gap(replayed, batch) < 0.5 * gap(free, batch), (gap(replayed, batch), gap(free, batch))


def test_a_training_step_with_replay_reports_the_mismatch_and_trains_the_routers(
    moe_dir: Path, batch: RolloutBatch
) -> None:
    base = perturbed_routers(moe_dir, scale=0.5)
    _, differs = forward(copy.deepcopy(base), batch, replace=False)
    results = {}
    for replay in (False, True):
        model = copy.deepcopy(base)
        trainer = PolicyTrainer(model, TrainerConfig(lr=1e-3, routing_replay=replay, micro_batch_tokens=64),
                                AlgoConfig(), temperature=1.0)  # fmt: skip
        metrics = trainer.train(batch)
        assert metrics["routing_mismatch"] == pytest.approx(differs, abs=0.05)  # logged with and without replay
        grads = [r.weight.grad for r in moe_routers(model)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)  # through the gate weights
        results[replay] = metrics["mismatch_abs"]  # |logp - rollout logp| as the trainer sees it
    assert results[True] < results[False]
