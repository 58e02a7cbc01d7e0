"""FP8 and INT4 in the native engine and the trainer with one quantization (models/quantized.py): the two
compute the same logits bit for bit, the engine quantizes published weights as it stages them, the trainer
keeps its parameters and trains through the quantizers, and unsupported combinations are refused in a line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.errors import ConfigError, MilesStreamError
from miles_stream.kernels.fp8 import FP8, quantize_weight
from miles_stream.kernels.int4 import quantize_int4
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.models.quantized import for_inference, for_training
from miles_stream.rollout import GenerationRequest, SamplingParams
from miles_stream.rollout.config import RolloutConfig
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import collate
from miles_stream.trainer.config import FsdpConfig, TrainerConfig
from miles_stream.trainer.torch.build import load_policy
from miles_stream.trainer.torch.policy import PolicyTrainer

ENCODE = {"fp8": quantize_weight, "int4": quantize_int4}


@pytest.fixture(scope="module", params=["dense", "moe"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind = request.param
    return build_tiny_model(tmp_path_factory.mktemp(kind), TinyModelConfig(kind=kind, init_std=0.1))


def load(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_engine_and_trainer_layers_compute_the_same_logits(model_dir: Path, scheme: Any) -> None:
    ids = torch.randint(4, 50, (3, 20), generator=torch.Generator().manual_seed(0))
    engine, trainer, plain = load(model_dir), load(model_dir), load(model_dir)
    for_inference(engine, scheme)
    assert for_training(trainer, scheme) >= 2
    with torch.no_grad():
        got, want, unquantized = (m(input_ids=ids).logits for m in (engine, trainer, plain))
    assert torch.equal(got, want)
    assert (got - unquantized).abs().max() > 1e-3  # it is quantized


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_engine_holds_quantized_weights_and_the_trainer_its_parameters(model_dir: Path, scheme: Any) -> None:
    plain = load(model_dir)
    trainer = load(model_dir)
    params = dict(trainer.named_parameters())
    for_training(trainer, scheme)
    assert dict(trainer.named_parameters()) == params  # same names, same objects: optimizer and publication
    engine = load(model_dir)
    for_inference(engine, scheme)
    state = engine.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    q, scale = ENCODE[scheme](plain.state_dict()[name])
    assert state[name].dtype == (FP8 if scheme == "fp8" else torch.uint8)
    assert torch.equal(state[name].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(state[name + "_scale"], scale)
    assert state["lm_head.weight"].dtype == torch.float32  # the output layer and embeddings keep their dtype
    experts = [n for n in state if n.endswith("experts.gate_up_proj")]
    assert all(state[n].dtype in (FP8, torch.uint8) for n in experts)


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
async def test_engine_quantizes_published_weights_as_it_stages_them(model_dir: Path, scheme: Any) -> None:
    engine = NativeEngine(str(model_dir), max_batch=2, seed=0, precision=scheme)
    try:
        new = {n: t + 0.01 * torch.randn_like(t) for n, t in load(model_dir).state_dict().items()}
        await engine.update_weights(1, new)
        state = engine.model.state_dict()
        for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.experts.down_proj"):
            if name in new:
                q, scale = ENCODE[scheme](new[name])
                assert torch.equal(state[name].view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(state[name + "_scale"], scale)
        assert torch.equal(state["model.norm.weight"], new["model.norm.weight"])
        params = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)
        out = await engine.generate([GenerationRequest(request_id="a", prompt_ids=[5, 6, 7], params=params)])
        assert len(out[0].response_ids) == 6 and out[0].version_spans[0, 1] == 1
        with pytest.raises(MilesStreamError, match="has shape"):
            await engine.update_weights(2, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    finally:
        await engine.close()


@pytest.mark.parametrize(("precision", "qat"), [("fp8", "none"), ("dtype", "int4")])
def test_trainer_steps_through_the_quantizers(model_dir: Path, precision: Any, qat: Any) -> None:
    config = TrainerConfig(model=str(model_dir), precision=precision, qat=qat, lr=1e-3)
    model = load_policy(config)
    trainer = PolicyTrainer(model, config, AlgoConfig(), temperature=1.0)
    rng = np.random.default_rng(0)
    groups = [synthetic_group(rng, n_samples=4, prompt_len=5, response_len=6, vocab=50) for _ in range(2)]
    groups = [replace(g, samples=tuple(replace(s, reward=float(i % 2)) for i, s in enumerate(g.samples)))
              for g in groups]  # fmt: skip
    name = "model.layers.0.mlp.down_proj.weight" if "model.layers.0.mlp.down_proj.weight" in dict(
        model.named_parameters()) else "model.layers.0.mlp.experts.down_proj"  # fmt: skip
    before = dict(model.named_parameters())[name].detach().clone()
    metrics = trainer.train(collate(groups))
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert not torch.equal(dict(model.named_parameters())[name], before)  # gradients reached the master weights


def test_unsupported_combinations_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.precision: fp8 is built for the native engine only"):
        RolloutConfig(engine="sglang", precision="fp8", sglang=replace(RolloutConfig().sglang, urls=("http://x",)))
    with pytest.raises(ConfigError, match=r"trainer\.qat: int4 QAT and trainer\.precision fp8"):
        TrainerConfig(precision="fp8", qat="int4")
    with pytest.raises(ConfigError, match=r"not tried with trainer\.fsdp"):
        TrainerConfig(precision="fp8", fsdp=FsdpConfig(enabled=True))
    odd = torch.nn.Sequential(torch.nn.Linear(5, 4))
    with pytest.raises(ConfigError, match="odd input width 5"):
        for_inference(odd, "int4")
