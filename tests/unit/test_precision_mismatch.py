"""The point of one quantization for rollout and training: on the tiny dense model, the trainer's logprobs of
the engine's FP8 samples are far closer when the trainer runs the same FP8 quantization than when it runs
unquantized (bench/bench_precision_mismatch.py measures the whole table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.rollout import GenerationRequest, SamplingParams
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.build import load_policy
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig(init_std=0.1))


async def test_fp8_training_removes_the_fp8_rollout_mismatch(model_dir: Path) -> None:
    engine = NativeEngine(str(model_dir), max_batch=4, seed=0, precision="fp8")
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 50, 6).tolist() for _ in range(8)]
    try:
        results = await engine.generate([GenerationRequest(request_id=str(i), prompt_ids=p, params=params)
                                         for i, p in enumerate(prompts)])  # fmt: skip
    finally:
        await engine.close()
    logp_rollout = torch.tensor(np.stack([r.logprobs for r in results]))
    n, t = logp_rollout.shape
    batch = RolloutBatch([np.asarray(p, np.int32) for p in prompts], [r.response_ids for r in results],
                         logp_rollout, torch.ones(n, t), torch.zeros(n), torch.arange(n))  # fmt: skip
    mismatch = {}
    for precision in ("dtype", "fp8"):
        model = load_policy(TrainerConfig(model=str(model_dir), precision=precision))  # type: ignore[arg-type]
        with torch.no_grad():
            logp, _ = response_logprobs(model, micro_inputs(batch, "cpu"), temperature=1.0)
        mismatch[precision] = float((logp - logp_rollout).abs().mean())
    assert mismatch["dtype"] > 0.02  # FP8 rollout scored by an unquantized trainer
    assert mismatch["fp8"] * 50 < mismatch["dtype"], mismatch
