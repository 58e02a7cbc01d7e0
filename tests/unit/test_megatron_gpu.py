"""The Megatron backend on a GPU (issue 22's H200 checks, at the tiny shapes; `bench/bench_train_step.py --backend
megatron` measures step time and MFU at Qwen3-0.6B's): Megatron's GPTModel on CUDA, bf16 compute over float32 main
params (autocast around Megatron's layers, SDPA's CUDA kernels), against the HF model and the torch backend on the
same weights and batch: logprobs within bf16 tolerance, one GRPO step's loss and gradient norm, and Qwen3-MoE with
R3 (the HF model's own routes replayed: logprobs as the HF model's replayed forward, mismatch counted)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import fixed_batch

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs, packed_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs
from miles_stream.trainer.torch.routing_replay import RoutingReplay, replay_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(600),
]

ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)


def config(model_dir: Path, backend: str, **extra: Any) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend=backend, device="cuda",
                         dtype="bfloat16", main_params_dtype="float32", megatron=MegatronConfig(), **extra)  # fmt: skip


@pytest.fixture(autouse=True)
def _groups() -> Any:
    yield
    release_groups()


@pytest.mark.parametrize("packed", [False, True])  # packed: the varlen kernel, given bf16 q/k out of the norms
def test_megatron_on_cuda_takes_the_torch_backends_bf16_step(tmp_path: Path, packed: bool) -> None:
    model_dir = build_tiny_model(tmp_path / "dense", TinyModelConfig(num_layers=4))
    batch = fixed_batch(model_dir, seed=0)
    mask = batch.mask_BT.bool()
    megatron: Any = build_backend(config(model_dir, "megatron", pack_sequences=packed), ALGO, temperature=1.0,
                                  parallel=DataParallel())  # fmt: skip
    torch_backend: Any = build_backend(config(model_dir, "torch", pack_sequences=packed), ALGO, temperature=1.0,
                                       parallel=DataParallel())  # fmt: skip
    x = packed_inputs(batch, "cuda") if packed else micro_inputs(batch, "cuda")  # packed: both models take one row
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = response_logprobs(megatron.model, x, temperature=1.0)
        want, _ = response_logprobs(torch_backend.model, x, temperature=1.0)
    assert float((got - want)[mask.cuda()].abs().max()) < 5e-2  # bf16 compute on both sides
    m, t = megatron.train(batch), torch_backend.train(batch)
    for name in ("loss", "grad_norm", "entropy"):
        assert m[name] == pytest.approx(t[name], rel=5e-2, abs=1e-3), (name, m[name], t[name])
    published, dtype = megatron.weights()
    assert dtype == torch.bfloat16
    names = list(load_causal_lm(str(model_dir), dtype="float32", device="cpu").state_dict())
    assert [n for n, _ in published.items()] == names


def test_megatron_moe_on_cuda_replays_the_hf_models_routes(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "moe", TinyModelConfig(kind="moe"))
    batch = fixed_batch(model_dir, seed=1, trace=(8, 2, 2))
    mask = batch.mask_BT.bool().cuda()
    hf = load_causal_lm(str(model_dir), dtype="float32", device="cuda")
    x = micro_inputs(batch, "cuda")

    def replayed(replay: Any, model: Any) -> tuple[torch.Tensor, int, int]:
        replay.begin(replay_inputs(batch.routing, batch.lengths, packed=False, device="cuda"))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logp, _ = response_logprobs(model, x, temperature=0.7)
        replay.end_forward()
        replay.end()
        differing, recorded = replay.take_counts()
        return logp, differing, recorded

    want, hf_diff, recorded = replayed(RoutingReplay(hf, replace=True), hf)
    backend: Any = build_backend(config(model_dir, "megatron", routing_replay=True), AlgoConfig(), temperature=0.7,
                                 parallel=DataParallel())  # fmt: skip
    got, mg_diff, mg_recorded = replayed(backend.policy.replays[id(backend.model)], backend.model)
    assert mg_recorded == recorded > 0
    assert float((got - want)[mask].abs().max()) < 5e-2
    # the random traces differ from either model's own choice at most tokens; bf16 may flip a near-tie or two
    assert abs(mg_diff - hf_diff) <= max(2, recorded // 50), (mg_diff, hf_diff, recorded)
    metrics = backend.train(replace(batch))
    assert metrics["routing_mismatch"] >= 0 and torch.isfinite(torch.tensor(metrics["loss"]))
