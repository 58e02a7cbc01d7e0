"""`PolicyTrainer`, the torch backend (`TrainerBackend`): one rollout batch in, `updates_per_batch` optimizer
steps out.

    batch ─► [ref logprobs] ─► [old logprobs] ─► advantages (whole batch) ─► for each of the batch's parts:
               zero grads ─► micro-batches (token budget): forward ─► objective ─► backward
               ─► sum grads over ranks ─► clip ─► AdamW step ─► schedule step

Losses are normalised by the part's token (or sample) count summed over every rank, and gradients are
summed over ranks, so N ranks with 1/N of the data each take exactly the step one rank would take with all
of it. Old logprobs: with one update per batch, the policy before the step is the one the forward pass
runs, so they are its detached logprobs (no second pass); with more, or when the advantages need them (the
reward KL, OPD), they are computed once up front.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import Tensor, nn

from miles_stream.buffer.micro import plan_micro_batches
from miles_stream.kernels.packed_attention import use_packed_attention
from miles_stream.trainer.algo import AdvantageInputs, LossInputs, Objective, build_objective, compute_advantages
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.critic import Critic
from miles_stream.trainer.torch.hf import decoder_layers
from miles_stream.trainer.torch.inputs import MicroInputs, micro_inputs, packed_inputs
from miles_stream.trainer.torch.layout import ModelLayout, Replicated
from miles_stream.trainer.torch.logprobs import PACKS_ITSELF, response_logprobs
from miles_stream.trainer.torch.optim import build_scheduler
from miles_stream.trainer.torch.routing_replay import Replay, replay_inputs, routing_replay_of

log = structlog.get_logger(__name__)
SUMMED = frozenset({"loss", "pg_loss", "kl_loss", "entropy"})  # already divided by the global count


class PolicyTrainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        algo: AlgoConfig,
        *,
        temperature: float,
        ref_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        critic: Critic | None = None,
        parallel: DataParallel | None = None,
        objective: Objective | None = None,
        layout: ModelLayout | None = None,
    ) -> None:
        if (algo.advantage_estimator == "ppo") != (critic is not None):
            raise ValueError("algo.advantage_estimator=ppo needs a critic (and only ppo has one)")
        if (algo.kl_loss_coef > 0 or algo.kl_coef > 0) and ref_model is None:
            raise ValueError("algo.kl_loss_coef / algo.kl_coef > 0 need a reference model")
        if algo.use_opd and teacher_model is None:
            raise ValueError("algo.use_opd needs a teacher model")
        self.model, self.ref_model, self.config, self.algo = model, ref_model, config, algo
        self.teacher_model, self.critic = teacher_model, critic
        self.temperature = temperature
        self.parallel = parallel or DataParallel()
        self.layout: ModelLayout = layout or Replicated(self.parallel)  # replicated, or sharded by fsdp.py
        self.device = next(model.parameters()).device
        # bf16 compute over float32 main params (trainer.main_params_dtype): autocast around each forward
        compute = getattr(torch, config.dtype)
        self.publish_dtype: torch.dtype | None = compute if next(model.parameters()).dtype != compute else None
        # (FSDP's mixed precision gathers parameters in bf16 itself: no autocast there)
        self.compute_dtype = None if self.layout.casts_compute else self.publish_dtype
        self.objective = objective or build_objective(algo)  # SftObjective for `train --sft`
        if config.pack_sequences:
            for m in (model, ref_model, teacher_model, critic.model.decoder if critic else None):
                if m is not None and not getattr(m, PACKS_ITSELF, False):
                    use_packed_attention(m)
        made = {id(m): routing_replay_of(m, replace=config.routing_replay)
                for m in (model, ref_model, teacher_model) if m is not None}  # fmt: skip
        self.replays = {key: r for key, r in made.items() if r is not None}
        if config.activation_checkpointing:
            set_activation_checkpointing(model, True)
        if config.compile:
            for layer in decoder_layers(model):
                layer.compile(dynamic=True)
        self.optimizer = self.layout.optimizer(list(model.parameters()), config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self._grad_norm_average = 0.0

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.model.config, "vocab_size", 0) or 0)

    def weights(self) -> tuple[Mapping[str, Tensor], torch.dtype | None]:
        """The policy's tensors (HF names) and, under mixed precision, the compute dtype to publish them in."""
        return self.layout.weights(self.model), self.publish_dtype

    def save(self, directory: Path) -> None:
        self.layout.save(directory, self.model, self.optimizer, self.scheduler, self.critic)

    def load(self, directory: Path) -> None:
        self.layout.load(directory, self.model, self.optimizer, self.scheduler, self.critic)

    def export_hf(self, dest: Path) -> None:
        self.layout.export_hf(self.model, self.config.model, dest)

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """Train on `batch` (this rank's share); returns metrics averaged over its optimizer steps and ranks."""
        started = time.perf_counter()
        self.model.train()
        ref_BT = self._logprobs(self.ref_model, batch) if self.ref_model is not None else None
        recompute = self.config.recompute_old_logprobs
        # up front when something before the first update reads them: several updates, OPD, the reward KL
        early = self.config.updates_per_batch > 1 or self.algo.use_opd or (self.algo.kl_coef > 0 and ref_BT is not None)
        old_BT = self._logprobs(self.model, batch) if recompute and early else None
        kl_BT = None
        if ref_BT is not None and self.algo.kl_coef > 0:
            cpu = batch.mask_BT.device  # old and reference logprobs were computed on the trainer's device
            kl_BT = (batch.logp_rollout_BT if old_BT is None else old_BT.to(cpu)) - ref_BT.to(cpu)
        student_BT = teacher_BT = None
        if self.teacher_model is not None:  # advantages are computed where the batch is (the CPU)
            teacher_BT = self._logprobs(self.teacher_model, batch).to(batch.mask_BT.device)
            student_BT = batch.logp_rollout_BT if old_BT is None else old_BT.to(batch.mask_BT.device)
        values_BT = self.critic.values(batch, self._plan, self._inputs, self._precision) if self.critic else None
        inputs = AdvantageInputs(rewards_B=batch.rewards_B, group_B=batch.group_B, mask_BT=batch.mask_BT, kl_BT=kl_BT,
                                 values_BT=values_BT, student_BT=student_BT, teacher_BT=teacher_BT)  # fmt: skip
        adv_BT, returns_BT = compute_advantages(self.algo, inputs)
        totals: dict[str, float] = {}
        critic_only = self.critic is not None and self.critic.steps < self.algo.num_critic_only_steps
        parts = [] if critic_only else _split(list(range(batch.size)), self.config.updates_per_batch)
        for part in parts:
            for name, value in self._update(batch, part, adv_BT, old_BT, ref_BT).items():
                totals[name] = totals.get(name, 0.0) + value / len(parts)
        if self.critic is not None and values_BT is not None and returns_BT is not None:
            totals |= self.critic.update(batch, returns_BT, values_BT, self._plan, self._inputs, self._precision)
            totals["critic_only"] = float(critic_only)
        tokens = self.parallel.sum(torch.tensor(float(sum(batch.lengths)))).item()
        totals["train_s"] = time.perf_counter() - started
        totals["tokens"] = tokens
        return totals

    def _update(
        self, batch: RolloutBatch, part: list[int], adv_BT: Tensor, old_BT: Tensor | None, ref_BT: Tensor | None
    ) -> dict[str, float]:
        """One optimizer step on rows `part`: each micro-batch's forward, objective and backward, in the order the
        layout's pipeline gives (without one: each forward followed by its backward)."""
        counts = self.parallel.sum(torch.tensor([float(batch.mask_BT[part].sum()), float(len(part))]))
        step = _Step(adv_BT, old_BT, ref_BT, num_tokens=counts[0].item(), num_samples=counts[1].item())
        self.optimizer.zero_grad(set_to_none=True)
        every = batch.lengths  # a property that builds the list: once, not once a row
        micro = self.layout.align(self._plan([every[i] for i in part]))
        pipeline = self.layout.pipeline
        order = pipeline.order(len(micro)) if pipeline else [(f, i) for i in range(len(micro)) for f in (True, False)]
        waiting: dict[int, tuple[Tensor, Replay | None]] = {}  # forwarded micro-batches' losses, to backward
        with pipeline.step() if pipeline else contextlib.nullcontext():
            for forward, i in order:
                if forward:
                    plan, real = micro[i]
                    waiting[i] = self._forward(batch, [part[r] for r in plan], real, step)
                    continue
                loss, replay = waiting.pop(i)
                loss.backward()  # type: ignore[no-untyped-call]
                if replay is not None:
                    replay.end()
        self.layout.reduce_grads(self.params)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = self.layout.clip_grads(self.params, clip)
        lr = float(self.scheduler.get_last_lr()[0])
        if math.isfinite(grad_norm):
            self._watch_grad_norm(grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        else:  # a NaN/inf loss or gradient would ruin the weights: skip this update (every rank sees the same sum)
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            log.error("update_skipped_nonfinite", grad_norm=grad_norm, skipped_total=self.skipped_steps)
        out = (
            self._reduce_metrics(step.summed, step.weighted, step.tokens, step.num_tokens)
            | self._replay_metrics()
            | {
                "grad_norm": grad_norm,
                "lr": lr,
                "skipped_updates": float(self.skipped_steps),
            }
        )
        return pipeline.share(out) if pipeline else out

    def _forward(self, batch: RolloutBatch, rows: list[int], real: bool, step: _Step) -> tuple[Tensor, Replay | None]:
        """One micro-batch's forward and objective: (the loss to backward, its routing replay); its metrics added to
        `step` (a repeat that keeps this rank in step with the others' collectives, `real` False, adds nothing). A
        pipeline stage without the loss backwards 0 x its placeholder logprobs, which brings the next stage's
        gradient (pipeline.py); its metrics are the last stage's, shared after the step."""
        mb = batch.rows(rows)
        t = mb.mask_BT.shape[1]
        replay = self._begin_replay(self.model, mb, count=real)
        with self._precision():
            logp, entropy = response_logprobs(self.model, self._inputs(mb), temperature=self.temperature,
                                              fused=self.config.fused_logprobs,
                                              entropy_grad=self.algo.entropy_coef > 0)  # fmt: skip
        if replay is not None:
            replay.end_forward()
        pipeline = self.layout.pipeline
        if pipeline and not pipeline.last_stage:
            return logp.sum() * 0.0, replay
        mask = mb.mask_BT.to(self.device)
        rollout = mb.logp_rollout_BT.to(self.device)
        if step.old_BT is not None:
            old = step.old_BT[rows, :t]
        else:
            old = logp.detach() if self.config.recompute_old_logprobs else rollout
        loss, metrics = self.objective(LossInputs(
            logp_BT=logp, logp_old_BT=old, logp_rollout_BT=rollout, adv_BT=step.adv_BT[rows, :t].to(self.device),
            mask_BT=mask, num_tokens=step.num_tokens, num_samples=step.num_samples,
            logp_ref_BT=None if step.ref_BT is None else step.ref_BT[rows, :t], entropy_BT=entropy,
        ))  # fmt: skip
        if not real:
            return loss * 0.0, replay
        mb_tokens = float(mask.sum())
        step.tokens += mb_tokens
        for name, value in metrics.items():
            target, scale = (step.summed, 1.0) if name in SUMMED else (step.weighted, mb_tokens)
            target[name] = target.get(name, torch.zeros((), device=self.device)) + value.detach().float() * scale
        return loss, replay

    def _watch_grad_norm(self, grad_norm: float) -> None:
        """Log a gradient norm over `grad_spike_factor` times its recent average (the step still goes on)."""
        average = self._grad_norm_average
        if average and grad_norm > self.config.grad_spike_factor * average:
            log.warning("grad_norm_spike", grad_norm=round(grad_norm, 4), recent_average=round(average, 4))
        self._grad_norm_average = grad_norm if not average else 0.9 * average + 0.1 * grad_norm

    def _reduce_metrics(
        self, summed: dict[str, Tensor], weighted: dict[str, Tensor], local_tokens: float, num_tokens: float
    ) -> dict[str, float]:
        names = sorted(summed) + sorted(weighted)
        if not names:
            return {}
        local = torch.stack([summed[n] for n in sorted(summed)] + [weighted[n] for n in sorted(weighted)])
        total = self.parallel.sum(local.cpu())
        out = {}
        for i, name in enumerate(names):
            out[name] = float(total[i]) if name in summed else float(total[i]) / max(num_tokens, 1.0)
        return out

    def _begin_replay(self, model: Any, mb: RolloutBatch, *, count: bool = True) -> Replay | None:
        """Hand `model`'s routing replay the micro-batch's recorded experts (None: a dense model)."""
        replay = self.replays.get(id(model))
        if replay is None:
            return None
        inputs = None
        if mb.routing:
            inputs = replay_inputs(mb.routing, mb.lengths, packed=self.config.pack_sequences, device=self.device)
        replay.begin(inputs, count=count)
        return replay

    def _replay_metrics(self) -> dict[str, float]:
        """routing_mismatch: the fraction of recorded tokens whose trainer-side top-k differed in some layer."""
        replay = self.replays.get(id(self.model))
        if replay is None:
            return {}
        counts = self.parallel.sum(torch.tensor([float(c) for c in replay.take_counts()]))
        return {"routing_mismatch": float(counts[0] / counts[1])} if counts[1] > 0 else {}

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _plan(self, lengths: Sequence[int]) -> list[list[int]]:
        return plan_micro_batches(lengths, self.config.micro_batch_tokens, packed=self.config.pack_sequences)

    def _inputs(self, mb: RolloutBatch) -> MicroInputs:
        return packed_inputs(mb, self.device) if self.config.pack_sequences else micro_inputs(mb, self.device)

    @torch.no_grad()
    def _logprobs(self, model: Any, batch: RolloutBatch) -> Tensor:
        """[B, T] logprobs of every response token under `model`, micro-batch by micro-batch."""
        out = torch.zeros_like(batch.logp_rollout_BT, device=self.device)
        plan = self._plan(batch.lengths)
        # FSDP shards only the policy (a frozen reference or teacher stays whole on every rank); expert parallel
        # splits every model's experts
        aligned = model is self.model or self.layout.aligns_frozen
        for rows, real in self.layout.align(plan) if aligned else [(r, True) for r in plan]:
            mb = batch.rows(rows)
            replay = self._begin_replay(model, mb, count=False)
            with self._precision():
                logp, _ = response_logprobs(model, self._inputs(mb), temperature=self.temperature,
                                            fused=self.config.fused_logprobs)  # fmt: skip
            if replay is not None:
                replay.end()
            if real:
                out[rows, : mb.mask_BT.shape[1]] = logp * mb.mask_BT.to(self.device)
        return out


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn a Hugging Face model's activation checkpointing on or off (transformers >= 5.2x renamed it from
    gradient checkpointing; both spellings are met in the wild)."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{name}_checkpointing_enable")(**{f"{name}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_checkpointing_disable")()


def _split(rows: Sequence[int], parts: int) -> list[list[int]]:
    """`rows` cut into `parts` contiguous runs of nearly equal size (the empty ones dropped)."""
    size, extra = divmod(len(rows), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            out.append(list(rows[start:end]))
        start = end
    return out


@dataclass(slots=True)
class _Step:
    """One optimizer step's inputs every micro-batch reads, and the metrics its micro-batches add up."""

    adv_BT: Tensor
    old_BT: Tensor | None
    ref_BT: Tensor | None
    num_tokens: float
    num_samples: float
    summed: dict[str, Tensor] = field(default_factory=dict)
    weighted: dict[str, Tensor] = field(default_factory=dict)
    tokens: float = 0.0  # this rank's real micro-batches' tokens
