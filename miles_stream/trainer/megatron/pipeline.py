"""Pipeline parallel's hand-offs between the stages of a PP group, as autograd functions, and the 1F1B order a
training step runs its micro-batches in (`OneFOneB`, the torch train step's `Pipeline`, trainer/torch/layout.py).

A training step (1F1B, Megatron's order without interleaving): stage s of P runs min(P-s-1, M) forwards first,
then one forward and one backward in turn, then the remaining backwards; the last stage alone computes the loss:

    stage s < P-1, forward:   its layers -> `to_next_later`: the hidden states sent on without waiting (isend),
                              placeholders back (no loss here: the train step backwards `0 x placeholders`)
    stage s < P-1, backward:  the placeholders' backward receives dL/dh from the next stage and goes on; its
                              `from_previous` sends dL/dh to the stage before without waiting
    last stage:               `from_previous` (a blocking receive) -> its layers -> logprobs -> the objective ->
                              backward, whose `from_previous` sends dL/dh back without waiting
    after the step:           every send waited for (`OneFOneB.step`), the last stage's metrics broadcast (`share`)

Of the hand-offs, only the receives wait, and every stage reaches each of its sends without waiting on a later
receive, so on gloo the order cannot deadlock (blocking sends could: stage s sending h forward while stage s+1
sends dL/dh back). On NCCL a large send completes only when its receive runs, and sends and receives between two
ranks of one group queue on one stream: stage 0's "send h1" ahead of its "receive dL/dh0" and stage 1's "send
dL/dh0" ahead of its "receive h1" would wait on each other. So the hidden states go forward on the PP group and
their gradients come back on a second group over the same ranks (`Lanes`; parallel.py `pp_back`), each with its own
communicator and stream, as Megatron avoids the same wait by pairing them (p2p_communication.py:54-125); not run on
NCCL. The collectives inside a stage (TP, CP, EP) run in the same order on its ranks. Stage s holds up to P-s
micro-batches' activations at once (the first stage P, against one before 1F1B), and a completed send is let go
when the next one starts; a stage is busy M of the M+P-1 slots (8 of 9 at P=2, M=8), where passing each micro-batch
through all stages alone kept it busy 1 of P. An error on the last stage (in the objective, say) leaves the others
waiting on a receive: torchrun stops the other ranks when one exits. R3 with PP ORs its mismatch flags over the PP
group after each forward (moe.py): that collective waits for the same micro-batch's forward on every stage, which
serialises the stages' forwards with MoE (correct, less overlap).

Forward-only passes (reference, old and teacher logprobs, under no_grad) run each micro-batch through every stage
in turn: `to_next` sends the hidden states and takes the last stage's logprobs and entropy, broadcast over the PP
group, so every stage returns them. Megatron's own schedule (`forward_backward_pipelining_without_interleaving`,
pipeline_parallel/schedules.py:1972) does not run on a CPU in megatron-core 0.16.1: it counts tokens in a tensor
on "cuda" (schedules.py:2138), its p2p hand-off makes every receive buffer on `torch.cuda.current_device()`
(p2p_communication.py:309-323) and, for micro-batches of varying length (variable_seq_lengths), exchanges shapes in
CUDA tensors and calls torch.cuda.synchronize (:188-242); it also owns the micro-batch loop and the loss (a
forward_step_func and a loss_func), which would be a second train loop here.

Tensors go as the residual stream's dtype (the parameters' dtype, Megatron's `pipeline_dtype`); their shape is
known to every stage from the micro-batch (the same input ids on every stage): [L, b, H], packed rows [L, 1, H]
(every stage rebuilds the same PackedSeqParams from the micro-batch: nothing more is sent).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

Sends = list[tuple[Any, Tensor]]  # sends in flight (their work, the tensor it reads), waited for after the step
Lanes = tuple[Any, Any]  # (the PP group the hidden states go forward on, the one their gradients come back on)


def _keep(sends: Sends, work: Any, tensor: Tensor) -> None:
    """A send in flight, kept until it completes (those already complete are let go: a step's hand-offs are not
    all held until its end)."""
    sends[:] = [(w, t) for w, t in sends if not w.is_completed()]
    sends.append((work, tensor))


def _grad_from_next(ctx: Any, device: torch.device) -> Tensor:
    """The hidden states' gradient, received from the next stage on the gradients' lane (both hand-offs' backward)."""
    grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=device)
    dist.recv(grad, src=ctx.peer, group=ctx.back)
    return grad


class _FromPrevious(torch.autograd.Function):
    """Forward: receive the hidden states from the stage before. Backward: send their gradient back to it (into
    `sends` without waiting, in a 1F1B step)."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, shape: tuple[int, ...], dtype: torch.dtype, peer: int, lanes: Lanes,
                sends: Sends | None) -> Tensor:  # fmt: skip
        ctx.peer, ctx.back, ctx.sends = peer, lanes[1], sends
        out = torch.empty(shape, dtype=dtype, device=anchor.device)
        dist.recv(out, src=peer, group=lanes[0])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:
        grad = grad.contiguous()
        if ctx.sends is None:
            dist.send(grad, dst=ctx.peer, group=ctx.back)
        else:
            _keep(ctx.sends, dist.isend(grad, dst=ctx.peer, group=ctx.back), grad)
        return None, None, None, None, None, None


class _ToNext(torch.autograd.Function):
    """Forward: send the hidden states to the next stage, then take the micro-batch's logprobs and entropy from
    the last stage. Backward: receive the hidden states' gradient from the next stage (the gradients of the
    logprobs and entropy given here are the last stage's to use: every stage computes the same loss)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, out_shape: tuple[int, ...], peer: int, last: int, lanes: Lanes) -> Any:
        ctx.peer, ctx.back = peer, lanes[1]
        ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
        dist.send(hidden.contiguous(), dst=peer, group=lanes[0])
        logp = torch.empty(out_shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        dist.broadcast(logp, src=last, group=lanes[0])
        dist.broadcast(entropy, src=last, group=lanes[0])
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        return _grad_from_next(ctx, grad_logp.device), None, None, None, None


class _ToNextLater(torch.autograd.Function):
    """1F1B's hand-off: forward sends the hidden states to the next stage without waiting and returns placeholder
    logprobs and entropy (zeros: this stage computes no loss); backward receives the hidden states' gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, out_shape: tuple[int, ...], peer: int, lanes: Lanes, sends: Sends) -> Any:
        ctx.peer, ctx.back = peer, lanes[1]
        ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
        sent = hidden.contiguous()
        _keep(sends, dist.isend(sent, dst=peer, group=lanes[0]), sent)
        logp = torch.zeros(out_shape, dtype=torch.float32, device=hidden.device)
        return logp, torch.zeros_like(logp)

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        return _grad_from_next(ctx, grad_logp.device), None, None, None, None


def from_previous(shape: tuple[int, ...], dtype: torch.dtype, *, device: torch.device, peer: int, lanes: Lanes,
                  sends: Sends | None = None) -> Tensor:  # fmt: skip
    """[L, b, H] hidden states from the stage before (global rank `peer`); differentiable when grad is on (the
    gradient sent back into `sends` without waiting when given: a 1F1B step)."""
    anchor = torch.empty(0, device=device, requires_grad=torch.is_grad_enabled())
    out: Tensor = _FromPrevious.apply(anchor, shape, dtype, peer, lanes, sends)  # type: ignore[no-untyped-call]
    return out


def to_next_later(hidden: Tensor, out_shape: tuple[int, ...], *, peer: int, lanes: Lanes,
                  sends: Sends) -> tuple[Tensor, Tensor]:  # fmt: skip
    """1F1B: hand `hidden` to the next stage (global rank `peer`) into `sends`; placeholder (logp, entropy) of
    `out_shape`, whose backward receives the hidden states' gradient."""
    logp, entropy = _ToNextLater.apply(hidden, out_shape, peer, lanes, sends)  # type: ignore[no-untyped-call]
    return logp, entropy


def to_next(hidden: Tensor, out_shape: tuple[int, ...], *, peer: int, last: int, lanes: Lanes) -> tuple[Tensor, Tensor]:
    """Hand `hidden` to the next stage (global rank `peer`); returns the last stage's (logp, entropy) float32 of
    `out_shape`, through which the hidden states' gradient comes back."""
    logp, entropy = _ToNext.apply(hidden, out_shape, peer, last, lanes)  # type: ignore[no-untyped-call]
    return logp, entropy


def share_last(logp: Tensor, entropy: Tensor, *, last: int, group: Any) -> None:
    """The last stage's side of `to_next`'s broadcast (values only: its own autograd graph stays its own)."""
    dist.broadcast(logp.detach().contiguous(), src=last, group=group)
    dist.broadcast(entropy.detach().contiguous(), src=last, group=group)


class OneFOneB:
    """The `Pipeline` (trainer/torch/layout.py) of a stage of a PP group: the 1F1B order, the sends of a step in
    flight on the model (`model.sends`, read by its forward), the last stage's metrics shared."""

    def __init__(self, model: Any, stage: int, stages: int, group: Any, last: int) -> None:
        self.model, self.stage, self.stages, self.group, self.last = model, stage, stages, group, last
        self.last_stage = stage == stages - 1

    def order(self, count: int) -> list[tuple[bool, int]]:
        warmup = min(self.stages - self.stage - 1, count)
        out = [(True, i) for i in range(warmup)]
        for i in range(count - warmup):
            out += [(True, warmup + i), (False, i)]
        return out + [(False, i) for i in range(count - warmup, count)]

    @contextmanager
    def step(self) -> Iterator[None]:
        sends: Sends = []
        self.model.sends = sends
        try:
            yield
        finally:
            self.model.sends = None
        for work, _ in sends:  # (not after an error: a peer that failed would never receive)
            work.wait()

    def share(self, metrics: dict[str, float]) -> dict[str, float]:
        box: list[Any] = [metrics if self.last_stage else None]
        dist.broadcast_object_list(box, src=self.last, group=self.group)
        shared: dict[str, float] = box[0]
        return shared
