"""The torch backend built from its own configs (trainer.*, algo.*): for the entry points and for tests."""

from __future__ import annotations

from typing import Any

import structlog
import torch

from miles_stream.errors import ConfigError
from miles_stream.models.quantized import Scheme, for_training
from miles_stream.trainer.algo import Objective
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch import fsdp
from miles_stream.trainer.torch.critic import Critic, ValueModel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.layout import ModelLayout, Replicated
from miles_stream.trainer.torch.policy import PolicyTrainer

log = structlog.get_logger(__name__)


def load_policy(cfg: TrainerConfig, device: str = "") -> Any:
    """trainer.model, loaded after the trainer's seed and thread count are set (RL and SFT alike), on `device`
    (default trainer.device); its linear layers quantized in the forward as trainer.precision / trainer.qat say."""
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    model = load_causal_lm(cfg.model, dtype=cfg.params_dtype, device=device or cfg.device)
    scheme: Scheme | None = "fp8" if cfg.precision == "fp8" else "int4" if cfg.qat == "int4" else None
    if scheme is not None:
        log.info("trainer_quantized", scheme=scheme, layers=for_training(model, scheme))
    return model


def build_trainer(cfg: TrainerConfig, algo: AlgoConfig, *, temperature: float, parallel: DataParallel,
                  objective: Objective | None = None) -> PolicyTrainer:  # fmt: skip
    """The policy with what `algo` asks for: a frozen reference (KL), a frozen teacher (OPD), a critic (PPO).
    `temperature`: what the trainer divides logits by (`RunConfig.trainer_temperature`); `objective`: the loss
    (default: `algo`'s policy objective; `train --sft` passes its NLL)."""
    if cfg.fsdp.enabled and algo.advantage_estimator == "ppo":
        raise ConfigError("trainer.fsdp does not shard PPO's critic yet: use algo.advantage_estimator grpo "
                          "(or another critic-free one), or trainer.fsdp.enabled false")  # fmt: skip
    sharded = cfg.fsdp.enabled and parallel.world > 1
    # sharded: loaded into host memory, each layer moved to the device as fully_shard splits it (no rank holds
    # the whole model on its accelerator)
    model = load_policy(cfg, "cpu" if sharded else "")
    needs_ref = algo.kl_loss_coef > 0 or algo.kl_coef > 0
    ref = load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype, device=cfg.device) if needs_ref else None
    teacher = load_causal_lm(cfg.teacher_model, dtype=cfg.dtype, device=cfg.device) if algo.use_opd else None
    for frozen in (ref, teacher):
        if frozen is not None:
            frozen.requires_grad_(False).train(False)
    critic = None
    layout: ModelLayout = Replicated(parallel)
    if sharded:
        fsdp.shard(model, cfg, parallel)
        layout = fsdp.Fsdp(parallel, cfg)
    elif cfg.fsdp.enabled:
        log.info("fsdp_one_rank_replicated")  # one rank: nothing to shard over
    if algo.advantage_estimator == "ppo":
        lm = load_causal_lm(cfg.critic_model or cfg.model, dtype=cfg.params_dtype, device=cfg.device)
        critic = Critic(ValueModel(lm), cfg, algo, parallel)
    return PolicyTrainer(model, cfg, algo, temperature=temperature, ref_model=ref, teacher_model=teacher,
                         critic=critic, parallel=parallel, objective=objective, layout=layout)  # fmt: skip
