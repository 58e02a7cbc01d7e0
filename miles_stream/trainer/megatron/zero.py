"""`ShardedAdamW`: AdamW whose state is split over the data-parallel ranks that hold the same parameters (ZeRO
stage 1: what Megatron's distributed optimizer saves), `trainer.megatron.distributed_optimizer: true`.

    parts       the parameters replicated over the DP group (DP x CP with context parallel), and the experts,
                replicated over the expert-DP group (layout.py's two gradient sums): each part's ranks split it with
                torch's ZeroRedundancyOptimizer (torch/distributed/optim/zero_redundancy_optimizer.py: whole
                parameters, largest first, each to the rank holding the fewest elements so far,
                `_partition_parameters`); a part whose group is one rank is a plain AdamW
    a step      the gradients are summed over the group and clipped by the global norm as without it (layout.py);
                each rank's AdamW steps the parameters it owns, then every owner broadcasts its parameters to the
                group (ZeroRedundancyOptimizer.step, `_sync_params`)
    schedule    one param group, as build_optimizer's AdamW: the LR schedule sets its lr, copied into the parts
                before each step
    checkpoint  each rank writes the moments it owns (layout.py, reshard.py read them back by name)

Per parameter between steps: float32 parameter 4 B + float32 gradient 4 B + AdamW's two moments 8 B / N (N ranks
in its group) on average, where AdamW alone keeps 16 B; whole parameters are placed, so a rank given a tensor
larger than 1/N of its part (an embedding) holds more (`greedy_shares` says how much). Traffic per rank and step:
the gradient all-reduce (2 (N-1)/N of the gradients' bytes, as without it) plus the broadcasts ((N-1)/N of the
parameters' bytes received): 1.5x the all-reduce alone. Megatron's distributed optimizer keeps the same bytes at
float32 parameters and gradients (8 + 8/N: its gradient buffer stays whole), splits by element ranges of a flat
buffer (no rank holds more than 1/N), and reduce-scatters the gradients into them instead of all-reducing (1x);
neither is built here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from miles_stream.trainer.megatron.parallel import GroupParallel


def greedy_shares(numels: Sequence[int], ranks: int) -> list[int]:
    """The elements each of `ranks` ranks owns when ZeroRedundancyOptimizer places parameters of these sizes: whole
    parameters, largest first, each to the rank holding the fewest so far, the lowest such rank on a tie
    (`_partition_parameters`, `_get_min_index`)."""
    shares = [0] * ranks
    for numel in sorted(numels, reverse=True):
        shares[shares.index(min(shares))] += numel
    return shares


class ShardedAdamW(torch.optim.Optimizer):
    """AdamW over `parts` ((parameters, the group of ranks holding the same ones)), each rank keeping the moments
    of its share of every part (see the module's docstring). Its state is split over ranks: `state_dict` and
    `load_state_dict` refuse, the layout saves and loads each rank's share (`owned_state`, `load_owned`)."""

    def __init__(self, parts: Sequence[tuple[list[nn.Parameter], GroupParallel]], options: dict[str, Any]) -> None:
        super().__init__([p for params, _ in parts for p in params], options)  # one group: what the schedule sets
        self.parts: list[torch.optim.Optimizer] = [
            ZeroRedundancyOptimizer(params, torch.optim.AdamW, process_group=group.group, **options)
            if group.world > 1 else torch.optim.AdamW(params, **options)
            for params, group in parts if params
        ]  # fmt: skip

    def _local(self) -> list[torch.optim.Optimizer]:
        """The AdamWs over this rank's own parameters."""
        return [part.optim if isinstance(part, ZeroRedundancyOptimizer) else part for part in self.parts]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ShardedAdamW takes no closure")
        (group,) = self.param_groups
        for part in self.parts:
            for g in part.param_groups:
                g.update({k: v for k, v in group.items() if k != "params"})
            part.step()

    def owned(self) -> list[nn.Parameter]:
        """The parameters whose moments this rank holds."""
        return [p for opt in self._local() for g in opt.param_groups for p in g["params"]]

    def owned_state(self) -> dict[Tensor, dict[str, Tensor]]:
        """{parameter: its AdamW state ("step", "exp_avg", "exp_avg_sq")} of the owned ones that have stepped."""
        return {p: s for opt in self._local() for p, s in opt.state.items() if s}

    def hyperparameters(self) -> dict[str, Any]:
        """The param group without its parameters (AdamW's keys, the schedule's initial_lr)."""
        (group,) = self.param_groups
        return {k: v for k, v in group.items() if k != "params"}

    def load_owned(self, hyper: dict[str, Any], state: dict[Tensor, dict[str, Tensor]]) -> None:
        """Take a saved param group's hyperparameters and the owned parameters' state (a parameter absent from
        `state` has none: never stepped)."""
        self.param_groups[0].update(hyper)
        for opt in self._local():
            (group,) = opt.param_groups
            params = group["params"]
            opt.load_state_dict({"state": {i: state[p] for i, p in enumerate(params) if p in state},
                                 "param_groups": [{**group, **hyper, "params": list(range(len(params)))}]})  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        raise TypeError("a ShardedAdamW's state is split over ranks: the layout saves each rank's (owned_state)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise TypeError("a ShardedAdamW's state is split over ranks: the layout loads each rank's (load_owned)")
