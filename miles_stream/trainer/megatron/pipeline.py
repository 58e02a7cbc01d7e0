"""Pipeline parallel's hand-offs between the stages of a PP group, as autograd functions, so that the torch train
step (trainer/torch/policy.py: for each micro-batch forward, objective, backward) drives a pipelined model
unchanged.

One micro-batch through P stages (every stage of the PP group runs the same micro-batches, in the same order):

    stage 0:    embedding -> its layers -> `to_next` ─send h─►  stage 1: `from_previous` -> its layers -> ...
    last stage: ... -> final norm -> output layer -> logprobs, entropy ─broadcast over the PP group─► every stage
    every stage: the same objective on the same logprobs (the loss functions stay pure and shared), then
    loss.backward(): the last stage's backward reaches `from_previous`, which sends dL/dh to the stage before;
    that stage's backward enters at `to_next` (the logprobs it returned), which receives dL/dh and goes on.

The schedule is the simplest correct one: each micro-batch's forward and backward run through all stages before
the next starts (no two stages work at once: a pipeline bubble of (P-1)/P). Megatron's 1F1B schedule
(`forward_backward_pipelining_without_interleaving`, pipeline_parallel/schedules.py:1972) does not run on a CPU
in megatron-core 0.16.1: it counts tokens in a tensor on "cuda" (schedules.py:2138), its p2p hand-off makes
every receive buffer on `torch.cuda.current_device()` (p2p_communication.py:309-323) and, for micro-batches of
varying length (variable_seq_lengths), exchanges shapes in CUDA tensors and calls torch.cuda.synchronize
(:188-242); it also owns the micro-batch loop and the loss (a forward_step_func and a loss_func), which would be a
second train loop here.

Tensors go as the residual stream's dtype (the parameters' dtype, Megatron's `pipeline_dtype`); their shape is
known to every stage from the micro-batch (the same input ids on every stage): [L, b, H], packed rows [L, 1, H]
(every stage rebuilds the same PackedSeqParams from the micro-batch: nothing more is sent).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _FromPrevious(torch.autograd.Function):
    """Forward: receive the hidden states from the stage before. Backward: send their gradient back to it."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, shape: tuple[int, ...], dtype: torch.dtype, peer: int, group: Any) -> Tensor:
        ctx.peer, ctx.group = peer, group
        out = torch.empty(shape, dtype=dtype, device=anchor.device)
        dist.recv(out, src=peer, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:
        dist.send(grad.contiguous(), dst=ctx.peer, group=ctx.group)
        return None, None, None, None, None


class _ToNext(torch.autograd.Function):
    """Forward: send the hidden states to the next stage, then take the micro-batch's logprobs and entropy from
    the last stage. Backward: receive the hidden states' gradient from the next stage (the gradients of the
    logprobs and entropy given here are the last stage's to use: every stage computes the same loss)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, out_shape: tuple[int, ...], peer: int, last: int, group: Any) -> Any:
        ctx.peer, ctx.group = peer, group
        ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
        dist.send(hidden.contiguous(), dst=peer, group=group)
        logp = torch.empty(out_shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        dist.broadcast(logp, src=last, group=group)
        dist.broadcast(entropy, src=last, group=group)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_logp.device)
        dist.recv(grad, src=ctx.peer, group=ctx.group)
        return grad, None, None, None, None


def from_previous(shape: tuple[int, ...], dtype: torch.dtype, *, device: torch.device, peer: int,
                  group: Any) -> Tensor:  # fmt: skip
    """[L, b, H] hidden states from the stage before (global rank `peer`); differentiable when grad is on."""
    anchor = torch.empty(0, device=device, requires_grad=torch.is_grad_enabled())
    out: Tensor = _FromPrevious.apply(anchor, shape, dtype, peer, group)  # type: ignore[no-untyped-call]
    return out


def to_next(hidden: Tensor, out_shape: tuple[int, ...], *, peer: int, last: int, group: Any) -> tuple[Tensor, Tensor]:
    """Hand `hidden` to the next stage (global rank `peer`); returns the last stage's (logp, entropy) float32 of
    `out_shape`, through which the hidden states' gradient comes back."""
    logp, entropy = _ToNext.apply(hidden, out_shape, peer, last, group)  # type: ignore[no-untyped-call]
    return logp, entropy


def share_last(logp: Tensor, entropy: Tensor, *, last: int, group: Any) -> None:
    """The last stage's side of `to_next`'s broadcast (values only: its own autograd graph stays its own)."""
    dist.broadcast(logp.detach().contiguous(), src=last, group=group)
    dist.broadcast(entropy.detach().contiguous(), src=last, group=group)
