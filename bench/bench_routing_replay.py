"""R3 on a tiny Qwen3-MoE, CPU: how many tokens a perturbed trainer routes differently from the rollout, and how
far its logprobs are from the rollout's with and without replaying the recorded experts.

    python bench/bench_routing_replay.py [--scale 0.5] [--samples 12] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from miles_stream.engines.base import GenerationRequest, SamplingParams
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.models.moe import moe_routers
from miles_stream.schema import Sample, TrajectoryGroup, make_spans
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs
from miles_stream.trainer.torch.routing_replay import RoutingReplay, replay_inputs


async def rollout(model_dir: str, samples: int, tokens: int) -> RolloutBatch:
    engine = NativeEngine(model_dir, max_batch=samples, seed=3)
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=tokens, ignore_eos=True)
        prompts = [[1 + i, 4, 6 + i % 3] for i in range(samples)]
        results = await engine.generate([GenerationRequest(request_id=f"r{i}", prompt_ids=p, params=params)
                                         for i, p in enumerate(prompts)])  # fmt: skip
    finally:
        await engine.close()
    groups = [TrajectoryGroup(group_id=f"g{i}", prompt_key=str(i), producer_id="bench",
                              prompt_ids=np.asarray(p, np.int32), created_at=0.0,
                              samples=(Sample(response_ids=r.response_ids, logprobs=r.logprobs,
                                              loss_mask=np.ones(tokens, np.uint8), version_spans=make_spans([(0, 0)]),
                                              finish_reason="length", routing=r.routing, reward=0.0),))
              for i, (p, r) in enumerate(zip(prompts, results, strict=True))]  # fmt: skip
    return collate(groups)


def measure(model: Any, batch: RolloutBatch, replace: bool) -> tuple[float, float]:
    replay = RoutingReplay(model, replace=replace)
    replay.begin(replay_inputs(batch.routing, batch.lengths, packed=False, device="cpu"))
    with torch.no_grad():
        logp, _ = response_logprobs(model, micro_inputs(batch, "cpu"), temperature=1.0)
    replay.end_forward()
    replay.remove()
    differing, recorded = replay.take_counts()
    gap = float(((logp - batch.logp_rollout_BT).abs() * batch.mask_BT).sum() / batch.mask_BT.sum())
    return differing / recorded, gap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=0.5, help="router noise, in units of each router's std")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(tmp, TinyModelConfig(kind="moe", max_position=1024)))
        batch = asyncio.run(rollout(model_dir, args.samples, args.tokens))
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        same, same_gap = measure(model, batch, replace=False)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for router in moe_routers(model):
                weight: Any = router.weight
                weight.add_(args.scale * weight.std() * torch.randn(weight.shape, generator=g))
        moved, free_gap = measure(model, batch, replace=False)
        _, replay_gap = measure(model, batch, replace=True)
    print(f"rollout weights:   {same:.1%} of tokens routed differently, mean |dlogp| {same_gap:.5f}")
    print(f"perturbed routers: {moved:.1%} of tokens routed differently")
    print(f"  without R3 mean |dlogp| {free_gap:.5f}; with R3 {replay_gap:.5f} ({free_gap / replay_gap:.1f}x closer)")


if __name__ == "__main__":
    main()
