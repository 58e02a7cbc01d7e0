"""Data parallel: each rank trains its share of the batch; gradients and counts are summed across ranks.

Ranks come from torch.distributed's environment (`torchrun` sets RANK, WORLD_SIZE, MASTER_ADDR/PORT):
gloo on CPU, NCCL on GPU. Without that environment this is one rank and every call is a no-op. The math
modules never see this object; the trainer calls it between them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True, slots=True)
class DataParallel:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: str) -> DataParallel:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if device == "cuda" and torch.cuda.is_available():
            # one GPU a rank: torchrun's LOCAL_RANK (else every rank's "cuda" is cuda:0, and NCCL refuses two ranks
            # on one device); a device named with its index is the user's choice
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Tensor) -> Tensor:
        """`values` summed over ranks (a new tensor; the input is not changed)."""
        out = values.detach().clone()
        if self.world > 1:
            dist.all_reduce(out)
        return out

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (`sum_grads_over`)."""
        if self.world > 1:
            sum_grads_over(params)

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def sum_grads_over(params: Iterable[torch.nn.Parameter], group: Any = None) -> None:
    """Sum every parameter's gradient over the ranks of `group` (all, if None), in one flat buffer per dtype. A
    parameter with no gradient on this rank (an MoE expert no token chose) gets zeros, so every rank sends the
    same layout."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
