"""The Megatron-core backend (`trainer.backend: megatron`) built from its configs, and `MegatronTrainer`, the
`TrainerBackend` the loops drive.

    build:  Megatron's groups (parallel.py) -> per model (policy; a frozen reference for the KL loss; a frozen
            teacher for OPD): the HF checkpoint's tensors -> convert.to_megatron -> this TP rank's shards copied
            into a GPTModel (model.py) -> the torch train step (`PolicyTrainer`, trainer/torch/policy.py) over
            it with `MegatronLayout`: the same objective, corrections, advantages, micro-batching, AdamW and
            schedule as the torch backend, with its sums over the DP group only
    train:  the union of the model-parallel (TP x PP) group's shares (parallel.mp_union) -> PolicyTrainer.train;
            with PP each micro-batch's forward and backward pass through the stages (pipeline.py)

Qwen3-MoE: experts and routers converted too (convert.py), R3 in the routers (moe.py), on one TP rank; experts
split over expert-parallel ranks (trainer.megatron.expert_parallel; parallel.py, dispatch.py, layout.py).
Dense Qwen3: layers cut into pipeline stages (trainer.megatron.pipeline_parallel; convert.by_stage, pipeline.py).
Packed sequences (trainer.pack_sequences): one row a micro-batch, Megatron's `thd` layout (model.py, attention.py),
with every layout above.
Not built yet (each refused with what to change): PPO's critic, context parallelism, MoE with tensor or pipeline
parallel, activation checkpointing, torch.compile.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from miles_stream.errors import ConfigError
from miles_stream.trainer.algo import Objective
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, by_expert, by_stage, to_megatron
from miles_stream.trainer.megatron.layout import MegatronLayout
from miles_stream.trainer.megatron.model import MegatronPolicy, build_gpt
from miles_stream.trainer.megatron.parallel import Groups, init_groups, mp_union
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.policy import PolicyTrainer


def hf_tensors(path: str) -> dict[str, Tensor]:
    """Every tensor of a local Hugging Face checkpoint's safetensors files (one or sharded), on the CPU."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model directory {path!r} holds no .safetensors file (a Hugging Face checkpoint)")
    out: dict[str, Tensor] = {}
    for f in files:
        out |= load_file(str(f))
    return out


def load_policy(path: str, groups: Groups, *, device: str, dtype: str) -> MegatronPolicy:
    """The checkpoint at `path` as this rank's GPTModel (its TP shards, its EP rank's experts, its pipeline
    stage's layers), in `dtype` on `device`."""
    from transformers import AutoConfig

    if not Path(path, "config.json").is_file():
        raise ConfigError(f"model directory {path!r} holds no config.json (a local Hugging Face checkpoint)")
    hf_config = AutoConfig.from_pretrained(path)
    shape = Qwen3Shape.of(hf_config)
    gpt = build_gpt(hf_config, tp=groups.tp, ep=groups.ep.world, pp=groups.pp.world, stage=groups.pp.rank,
                    device=device, dtype=getattr(torch, dtype))  # fmt: skip
    shard = to_megatron(hf_tensors(path), shape, groups.tp)[groups.tp_rank]
    if groups.pp.world > 1:
        shard = by_stage(shard, shape, groups.pp.world)[groups.pp.rank]
    if groups.ep.world > 1:
        shard = by_expert(shard, shape, groups.ep.world)[groups.ep.rank]
    params = dict(gpt.named_parameters())
    if set(shard) != set(params):
        raise RuntimeError(f"conversion and GPTModel disagree on names: {sorted(set(shard) ^ set(params))[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != shard[name].shape:
                raise RuntimeError(f"{name}: GPTModel holds {tuple(p.shape)}, conversion {tuple(shard[name].shape)}")
            p.copy_(shard[name])
    return MegatronPolicy(gpt, hf_config, groups)


class MegatronTrainer:
    """`TrainerBackend` over a GPTModel: the torch train step on the model-parallel group's union of batches."""

    def __init__(self, policy: PolicyTrainer, groups: Groups, world: DataParallel) -> None:
        self.policy, self.groups, self.parallel = policy, groups, world

    @property
    def model(self) -> MegatronPolicy:
        model: MegatronPolicy = self.policy.model  # type: ignore[assignment]
        return model

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        return self.policy.train(mp_union(batch, self.groups))

    def weights(self) -> tuple[Mapping[str, Tensor], torch.dtype | None]:
        return self.policy.weights()

    def save(self, directory: Path) -> None:
        self.policy.save(directory)

    def load(self, directory: Path) -> None:
        self.policy.load(directory)

    def export_hf(self, dest: Path) -> None:
        self.policy.export_hf(dest)

    @property
    def vocab_size(self) -> int:
        return self.policy.vocab_size


def build_megatron_trainer(cfg: TrainerConfig, algo: AlgoConfig, *, temperature: float, parallel: DataParallel,
                           objective: Objective | None = None) -> MegatronTrainer:  # fmt: skip
    if algo.advantage_estimator == "ppo":
        raise ConfigError("the megatron backend has no critic yet: use algo.advantage_estimator grpo "
                          "(or another critic-free one), or trainer.backend torch")  # fmt: skip
    if cfg.dtype != cfg.params_dtype and not cfg.device.startswith("cuda"):
        # Megatron's linear layers keep autocast's state for their backward on CUDA only (custom_fwd/custom_bwd
        # with device_type="cuda", megatron/core/tensor_parallel/layers.py:68-69, :447, :494): on a CPU the
        # backward multiplies a bf16 gradient by a float32 weight and fails
        raise ConfigError("the megatron backend computes bf16 over float32 main params only on CUDA: on a CPU use "
                          "trainer.dtype float32, or trainer.main_params_dtype bfloat16")  # fmt: skip
    mcfg = cfg.megatron
    groups = init_groups(parallel, mcfg.tensor_parallel, mcfg.expert_parallel, mcfg.pipeline_parallel)
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    model = load_policy(cfg.model, groups, device=cfg.device, dtype=cfg.params_dtype)
    frozen: dict[str, Any] = {}
    if algo.kl_loss_coef > 0 or algo.kl_coef > 0:
        frozen["ref_model"] = load_policy(cfg.ref_model or cfg.model, groups, device=cfg.device, dtype=cfg.dtype)
    if algo.use_opd:
        frozen["teacher_model"] = load_policy(cfg.teacher_model, groups, device=cfg.device, dtype=cfg.dtype)
    for m in frozen.values():
        m.requires_grad_(False).train(False)
    layout = MegatronLayout(groups, parallel, model)
    policy = PolicyTrainer(model, cfg, algo, temperature=temperature, parallel=groups.dp, objective=objective,
                           layout=layout, **frozen)  # fmt: skip
    return MegatronTrainer(policy, groups, parallel)
