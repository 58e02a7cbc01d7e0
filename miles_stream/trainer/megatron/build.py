"""The Megatron-core backend (`trainer.backend: megatron`) built from its configs, and `MegatronTrainer`, the
`TrainerBackend` the loops drive.

    build:  Megatron's groups (parallel.py) -> per model (policy; a frozen reference for the KL loss; a frozen
            teacher for OPD): this rank's parameters converted one by one from the HF checkpoint's tensors
            (convert.rank_params: its TP shards, its stage's layers, its EP rank's experts) into a GPTModel
            (model.py) -> the torch train step (`PolicyTrainer`, trainer/torch/policy.py) over it with
            `MegatronLayout`: the same objective, corrections, advantages, micro-batching, AdamW and schedule
            as the torch backend, with its sums over the DP group only
    train:  the union of the model-parallel (TP x PP) group's shares (parallel.mp_union) -> PolicyTrainer.train;
            with PP the stages run the micro-batches in 1F1B order, the loss on the last (pipeline.py)

Qwen3-MoE: experts and routers converted too (convert.py), R3 in the routers (moe.py); experts split over
expert-parallel ranks (trainer.megatron.expert_parallel; parallel.py, dispatch.py, layout.py) and over TP ranks, with
sequence parallel (trainer.megatron.sequence_parallel, which MoE with TP requires; sequence.py).
Layers cut into pipeline stages (trainer.megatron.pipeline_parallel, evenly or first_stage_layers /
last_stage_layers: convert.StageSplit; convert.by_stage, pipeline.py), dense Qwen3
and Qwen3-MoE (a stage's routers and experts with its layers, the experts split again over the stage's EP ranks;
R3 replays each stage's own layers of the trace). Sequences split over context-parallel ranks
(trainer.megatron.context_parallel; context.py).
Packed sequences (trainer.pack_sequences): one row a micro-batch, Megatron's `thd` layout (model.py, attention.py),
with TP, PP and EP (not with CP).
Not built yet (each refused with what to change): PPO's critic, packed sequences with context parallel, sequence
parallel with context parallel, activation checkpointing, torch.compile.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from miles_stream.errors import ConfigError
from miles_stream.trainer.algo import Objective
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, StageSplit, rank_name, rank_params
from miles_stream.trainer.megatron.layout import MegatronLayout
from miles_stream.trainer.megatron.model import MegatronPolicy, build_gpt
from miles_stream.trainer.megatron.parallel import Groups, init_groups, mp_union
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.policy import PolicyTrainer


class Checkpoint(Mapping[str, Tensor]):
    """A local Hugging Face checkpoint's tensors (one safetensors file or sharded), each read from its file when
    asked for: only the files' headers are held, so a rank reads its own share of a model larger than its host
    memory (235B in bf16 is 470 GB; eight ranks of a host each reading it whole would need 3.8 TB)."""

    def __init__(self, path: str) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise ConfigError(f"model directory {path!r} holds no .safetensors file (a Hugging Face checkpoint)")
        handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in handles for name in h.keys()}  # type: ignore[no-untyped-call]  # noqa: SIM118

    def __getitem__(self, name: str) -> Tensor:
        tensor: Tensor = self._where[name].get_tensor(name)  # type: ignore[no-untyped-call]
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_policy(path: str, groups: Groups, *, device: str, dtype: str, split: StageSplit | None = None,
                sp: bool = False) -> MegatronPolicy:  # fmt: skip
    """The checkpoint at `path` as this rank's GPTModel (its TP shards, its EP rank's experts, its pipeline
    stage's layers: `split` says how many each stage holds; `sp`: sequence parallel), in `dtype` on `device`: each
    parameter converted from the checkpoint's tensors it is made of (convert.rank_params) and copied in before the
    next is read."""
    from transformers import AutoConfig

    if not Path(path, "config.json").is_file():
        raise ConfigError(f"model directory {path!r} holds no config.json (a local Hugging Face checkpoint)")
    hf_config = AutoConfig.from_pretrained(path)
    shape = Qwen3Shape.of(hf_config)
    gpt = build_gpt(hf_config, tp=groups.tp, ep=groups.ep.world, pp=groups.pp.world, stage=groups.pp.rank,
                    cp=groups.cp.world, device=device, dtype=getattr(torch, dtype), split=split, sp=sp)  # fmt: skip
    where = {"pp": groups.pp.world, "stage": groups.pp.rank, "ep": groups.ep.world, "ep_rank": groups.ep.rank}

    def here(name: str) -> str | None:  # its name on this rank, None where another rank holds it
        return rank_name(name, shape, split=split, **where)

    params = dict(gpt.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in rank_params(Checkpoint(path), shape, groups.tp, groups.tp_rank,
                                        keep=lambda n: here(n) is not None):  # fmt: skip
            local = here(name) or name
            p = params.get(local)
            if p is None:
                raise RuntimeError(f"conversion and GPTModel disagree on names: {local} is not in the GPTModel")
            if p.shape != tensor.shape:
                raise RuntimeError(f"{local}: GPTModel holds {tuple(p.shape)}, conversion {tuple(tensor.shape)}")
            p.copy_(tensor)
            loaded.add(local)
    if loaded != set(params):
        raise RuntimeError(f"conversion and GPTModel disagree on names: {sorted(set(params) - loaded)[:4]}")
    return MegatronPolicy(gpt, hf_config, groups, split)


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
    if cfg.pack_sequences and mcfg.context_parallel > 1:  # context.py splits padded rows; thd would need the
        # split per sequence (Megatron's THD CP needs TE's attention)
        raise ConfigError("the megatron backend splits padded rows over context-parallel ranks, not packed ones: set "
                          "trainer.pack_sequences false or trainer.megatron.context_parallel 1")  # fmt: skip
    groups = init_groups(parallel, mcfg.tensor_parallel, mcfg.expert_parallel, mcfg.pipeline_parallel,
                         mcfg.context_parallel)  # fmt: skip
    torch.manual_seed(cfg.seed)
    if mcfg.sequence_parallel and cfg.device.startswith("cuda"):
        # under SP Megatron forks its RNG tracker's "model-parallel-rng" state around the decoder and the embedding's
        # dropout (transformer_block.py:706-707, language_model_embedding.py:145-146), which fails unless the state
        # was made: made as Megatron's training makes it (the default CUDA generator seeded with cfg.seed again, as
        # torch.manual_seed just did). Qwen3 draws nothing there (no dropout). On a CPU: model.py's no-op tracker
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.seed)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    split = StageSplit(mcfg.first_stage_layers, mcfg.last_stage_layers)
    sp = mcfg.sequence_parallel
    model = load_policy(cfg.model, groups, device=cfg.device, dtype=cfg.params_dtype, split=split, sp=sp)
    frozen: dict[str, Any] = {}
    if algo.kl_loss_coef > 0 or algo.kl_coef > 0:
        frozen["ref_model"] = load_policy(cfg.ref_model or cfg.model, groups, device=cfg.device, dtype=cfg.dtype,
                                          split=split, sp=sp)  # fmt: skip
    if algo.use_opd:
        frozen["teacher_model"] = load_policy(cfg.teacher_model, groups, device=cfg.device, dtype=cfg.dtype,
                                              split=split, sp=sp)  # fmt: skip
    for m in frozen.values():
        m.requires_grad_(False).train(False)
    compute = getattr(torch, cfg.dtype)  # published in it when the main params differ (as policy.py decides)
    publish = compute if cfg.params_dtype != cfg.dtype else None
    layout = MegatronLayout(
        groups, parallel, model, publish_dtype=publish, distributed_optimizer=mcfg.distributed_optimizer
    )
    policy = PolicyTrainer(model, cfg, algo, temperature=temperature, parallel=groups.dp, objective=objective,
                           layout=layout, **frozen)  # fmt: skip
    return MegatronTrainer(policy, groups, parallel)
