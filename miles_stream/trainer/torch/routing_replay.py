"""Rollout Routing Replay (R3): the trainer's MoE layers use the experts the rollout engine chose.

A MoE router (Qwen3-MoE, Mixtral: the `...mlp.gate` modules with a `top_k`) returns (logits [N, E], gate
weights [N, K], expert ids [N, K]) for the N tokens of a forward pass. `RoutingReplay` hooks every router of a
model; for a micro-batch it is given the recorded expert ids of each token (`replay_inputs`) and:
- counts the tokens whose router's own top-k differs from the recording in some layer (always, as a metric);
- with `replace`, returns the recorded ids instead, with gate weights from the current router's softmax at
  those experts, renormalised over them as the router itself renormalises (Mixtral always; Qwen3-MoE when
  `norm_topk_prob`). Gradients reach the router through those weights.
Tokens without a record (the last token of a sequence never ran forward at rollout; padding) keep the
router's own choice. The hooks stay on through the backward pass, so recomputed activations (activation
checkpointing) route the same way.

Shapes: the recording of a sample is `Sample.routing` [P + T - 1, layers, K]; a micro-batch's is laid out as
the forward's tokens: padded rows [b x width] (row-major) or packed [sum of lengths].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from miles_stream.models.moe import moe_routers

REPLAY_ENTRY = "miles_routing_replay"  # a model's own R3 (a method `(*, replace) -> Replay | None`): the Megatron
# backend's GPTModel wrapper, whose routers are not HF `...mlp.gate` modules


class Replay(Protocol):
    """What the train step drives: `RoutingReplay` here, `MegatronRoutingReplay` in trainer/megatron/moe.py."""

    def begin(self, inputs: tuple[Tensor, Tensor] | None, *, count: bool = True) -> None: ...
    def end_forward(self) -> None: ...
    def end(self) -> None: ...
    def take_counts(self) -> tuple[int, int]: ...


def routing_replay_of(model: nn.Module, *, replace: bool) -> Replay | None:
    """R3 for `model`: its own (`REPLAY_ENTRY`) when it has one, else hooks on its HF routers; None when dense."""
    own = getattr(model, REPLAY_ENTRY, None)
    if own is not None:
        replay: Replay | None = own(replace=replace)
        return replay
    return RoutingReplay(model, replace=replace) if moe_routers(model) else None


def replay_inputs(
    routing: Sequence[np.ndarray | None], lengths: Sequence[int], *, packed: bool, device: torch.device | str
) -> tuple[Tensor, Tensor] | None:
    """(ids [N, layers, K] int64, recorded [N] bool) in the forward's token order, or None when no sample of
    the micro-batch carries a recording."""
    present = [r for r in routing if r is not None]
    if not present:
        return None
    layers, k = present[0].shape[1:]
    width = max(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if packed else np.arange(len(lengths)) * width
    n = int(sum(lengths)) if packed else len(lengths) * width
    ids = torch.zeros(n, layers, k, dtype=torch.long)
    recorded = torch.zeros(n, dtype=torch.bool)
    for start, trace in zip(starts.tolist(), routing, strict=True):
        if trace is None:
            continue
        if trace.shape[1:] != (layers, k):
            raise ValueError(f"routing traces of one batch disagree: {trace.shape[1:]} vs {(layers, k)}")
        ids[start : start + len(trace)] = torch.from_numpy(trace.astype(np.int64))
        recorded[start : start + len(trace)] = True
    return ids.to(device), recorded.to(device)


class ReplayState:
    """The state one R3 implementation keeps between `begin` and `end`, and its mismatch counts: this module's
    `RoutingReplay` (forward hooks on HF routers) and the Megatron backend's `MegatronRoutingReplay` (a hook
    inside Megatron's routers) differ only in how they reach a router."""

    def __init__(self, routers: Sequence[Any], *, replace: bool, layers: int | None = None) -> None:
        self.routers, self.replace = list(routers), replace
        # the layers a routing trace holds: one a router, unless the model holds only some of its layers (a
        # pipeline stage of the Megatron backend, whose routers index the trace by their global layer)
        self.layers = len(self.routers) if layers is None else layers
        self._ids: Tensor | None = None
        self._recorded: Tensor | None = None
        self._differs: Tensor | None = None
        self._counting = False
        self.differing_tokens = 0  # totals over `count`ed forward passes
        self.recorded_tokens = 0

    def begin(self, inputs: tuple[Tensor, Tensor] | None, *, count: bool = True) -> None:
        """The next forward pass's recording (None: route freely); `count`: add its differing tokens up."""
        if inputs is not None and inputs[0].shape[1] != self.layers:
            if self.replace:
                raise ValueError(f"the routing trace has {inputs[0].shape[1]} layers, the model {self.layers} "
                                 "MoE layers: recorded with another model?")  # fmt: skip
            inputs = None  # only counted, and these cannot be compared
        self._ids, self._recorded = inputs if inputs is not None else (None, None)
        self._differs = None if self._recorded is None else torch.zeros_like(self._recorded)
        self._counting = inputs is not None and count

    def count(self, own: Tensor, recorded_ids: Tensor, recorded: Tensor) -> None:
        """Mark the recorded tokens whose router's own top-k (`own`) is not the recording, in this layer."""
        if self._counting and self._differs is not None:
            self._differs |= (own.sort(-1).values != recorded_ids.sort(-1).values).any(-1) & recorded

    def end_forward(self) -> None:
        """Count this forward's differing tokens; the recording stays for the backward pass."""
        if self._counting and self._differs is not None and self._recorded is not None:
            self.differing_tokens += int(self._differs.sum())
            self.recorded_tokens += int(self._recorded.sum())
        self._counting = False

    def end(self) -> None:
        self._ids = self._recorded = self._differs = None
        self._counting = False

    def take_counts(self) -> tuple[int, int]:
        counts = self.differing_tokens, self.recorded_tokens
        self.differing_tokens = self.recorded_tokens = 0
        return counts


class RoutingReplay(ReplayState):
    def __init__(self, model: nn.Module, *, replace: bool) -> None:
        super().__init__(moe_routers(model), replace=replace)
        self._hooks = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._ids is None or self._recorded is None:
                return None
            logits, scores, own = output
            recorded_ids = self._ids[:, layer]
            if own.shape != recorded_ids.shape:
                raise RuntimeError(f"router {layer} saw {tuple(own.shape)} tokens x top-k, the replay has "
                                   f"{tuple(recorded_ids.shape)}")  # fmt: skip
            self.count(own, recorded_ids, self._recorded)
            if not self.replace:
                return None
            chosen = torch.where(self._recorded[:, None], recorded_ids, own)
            weights = torch.softmax(logits.float(), dim=-1).gather(-1, chosen)
            if getattr(module, "norm_topk_prob", True):
                weights = weights / weights.sum(-1, keepdim=True)
            return logits, weights.to(scores.dtype), chosen

        return hook
