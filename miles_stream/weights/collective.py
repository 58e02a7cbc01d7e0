"""Weight-update groups: process groups apart from the default one, for sending weights from rank 0 (a
trainer, or a producer driving SGLang servers) to the ranks that serve them. Used by the `broadcast` transport
and by the SGLang client's distributed push."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch


def init_weight_group(backend: str, address: str, port: int, world: int, rank: int, name: str,
                      timeout_s: float) -> Any:  # fmt: skip
    """A process group apart from the default one, built as SGLang builds its side (a TCP rendezvous at
    address:port, keys under `name`), so both ends meet. Uses torch's `_new_process_group_helper`, as SGLang
    does: PyTorch has no public way to make a group without a default group."""
    from torch.distributed import rendezvous  # type: ignore[attr-defined]
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(rendezvous(f"tcp://{address}:{port}", rank, world, timeout=timeout))
    store.set_timeout(timeout)
    group = _new_process_group_helper(world, rank, [], Backend(backend), PrefixStore(name, store), group_name=name,  # type: ignore[arg-type]
                                      timeout=timeout)  # fmt: skip
    group = group[0] if isinstance(group, tuple) else group
    _world.pg_group_ranks[group] = {i: i for i in range(world)}  # as SGLang does: destroy_process_group needs it
    return group


def destroy_weight_group(group: Any) -> None:
    """Destroy a group made by `init_weight_group`: its name can be used again, its store is released."""
    import torch.distributed as dist

    dist.destroy_process_group(group)


def broadcast_from_rank0(group: Any, tensor: torch.Tensor) -> None:
    """Rank 0 sends `tensor`, every other rank receives into it; returns when this rank's part is done."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()
