"""Qwen3-MoE routing in the Megatron backend, and Rollout Routing Replay (R3) through Megatron's own hook.

Megatron's `TopKRouter` computes logits [N, E] (`gating`), then `topk_routing_with_score_function`
(megatron/core/transformer/moe/moe_utils.py:608-748) picks each token's K experts through
`compute_topk`, which hands the choice to the router's `router_replay` when it has one
(moe_utils.py:699-707: `router_replay.get_replay_topk(scores, topk, num_groups, group_topk, _compute_topk)`).
For Qwen3-MoE (softmax scores, `norm_topk_prob`): the top-k is taken over the logits and the gate weights are the
softmax over the K chosen logits (moe_utils.py:714-715), which is the HF router's softmax over all experts
renormalised over the chosen K; without `norm_topk_prob`, the softmax over all experts is taken first and
gathered (moe_utils.py:710-712, `moe_router_pre_softmax`).

R3 plugs in at that hook. Megatron's `RouterReplay` (router_replay.py) replays *every* token's indices from a
list it is given and keeps its instances in a class-level list (`global_router_replay_instances`), one process
-wide set of layers. The backend needs two things it does not do, so `LayerReplay` subclasses it and overrides
`get_replay_topk` (the method the hook calls):
- tokens without a record (a sequence's last token never ran forward at rollout; padding) keep the router's own
  choice, and the router's own top-k is compared with the recording on every forward (the `routing_mismatch`
  metric), as the torch backend's `RoutingReplay` (trainer/torch/routing_replay.py) does;
- one replay per model (the policy, a frozen reference): instances are not put in the global list.
With replay on, the K recorded experts' scores are gathered (as `REPLAY_FORWARD` does, router_replay.py:145-150),
so the gate weights come from the current router and gradients reach it through them.

Token order: Megatron flattens the router's logits [s, b, E] to [s*b, E] (router.py:540-541), sequence-major;
the recordings (`replay_inputs`) are row-major [b*s]: `LayerReplay` reorders them with the (s, b) the router saw.
Packed rows (trainer.pack_sequences): the router sees [L, 1, E], L the sequences' summed lengths, and
`replay_inputs(packed=True)` lays the recordings out sequence after sequence, as the row holds them: (s, b) =
(L, 1), and the reordering is the identity.

`LocalTopKRouter`: Megatron's `TopKRouter` with its own `gating` where Megatron's cannot run: on a CPU, `gating`
moves the weight to `torch.cuda.current_device()` on every forward (router.py:89-92); and without Transformer
Engine, `router_gating_linear`'s autograd function reads `te_general_gemm` (moe_utils.py:1192, :1225), a name
moe_utils.py binds only when TE imports (:22-39), so it fails with a NameError on any device. There the logits
are its non-TE branch's product (moe_utils.py:1195-1196, `inp.to(router_dtype) @ weight.to(router_dtype).t()`)
with plain autograd (same gradients; Megatron's function only saves memory). With TE on CUDA: Megatron's own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from miles_stream.trainer.megatron.context import ContextSplit
from miles_stream.trainer.megatron.sequence import SequenceSplit
from miles_stream.trainer.torch.routing_replay import ReplayState

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe.moe_utils import HAVE_TE
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplay


class LayerReplay(RouterReplay):  # type: ignore[misc]
    """One MoE layer's replay, fed by its model's `MegatronRoutingReplay`."""

    def __init__(self, owner: MegatronRoutingReplay, layer: int) -> None:
        # not RouterReplay.__init__: it registers the instance in the process-wide list (router_replay.py:85)
        self.target_topk_idx = self.recorded_topk_idx = None
        self.router_replay_action = None
        self.replay_backward_list: list[Tensor] = []
        self.owner, self.layer = owner, layer
        self.seq_batch: tuple[int, int] | None = None  # (s, b) of the router's current logits

    def get_replay_topk(self, scores: Tensor, topk: int, num_groups: int | None = None,
                        group_topk: int | None = None,
                        default_compute_topk: Any = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        values, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        recording = self.owner.layer_inputs(self.layer, self.seq_batch)
        if recording is None:
            return values, own
        recorded_ids, recorded = recording
        if recorded_ids.shape != own.shape:
            raise RuntimeError(f"router {self.layer} saw {tuple(own.shape)} tokens x top-k, the replay has "
                               f"{tuple(recorded_ids.shape)}")  # fmt: skip
        self.owner.count(own, recorded_ids, recorded)
        if not self.owner.replace:
            return values, own
        chosen = torch.where(recorded[:, None], recorded_ids, own)
        return scores.gather(1, chosen), chosen


class LocalTopKRouter(TopKRouter):  # type: ignore[misc]
    """Megatron's `TopKRouter` that runs without TE and on a CPU (see the module's docstring), and tells its
    replay the (s, b) layout of each forward."""

    def gating(self, input: Tensor) -> Tensor:
        if HAVE_TE and self.weight.device.type != "cpu":
            out: Tensor = super().gating(input)
            return out
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(router_dtype)
        return torch.nn.functional.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)

    def routing(self, logits: Tensor, padding_mask: Tensor | None = None) -> Any:
        if isinstance(self.router_replay, LayerReplay):
            self.router_replay.seq_batch = (int(logits.shape[0]), int(logits.shape[1]))
        return super().routing(logits, padding_mask=padding_mask)


class MegatronRoutingReplay(ReplayState):
    """R3 over a GPTModel's MoE routers, with the torch backend's `RoutingReplay` interface (begin, end_forward,
    end, take_counts: the shared `ReplayState`): `begin` gets `replay_inputs` (ids [b*s, layers, K], recorded
    [b*s], row-major); the differing tokens are kept [s*b], in Megatron's token order.

    Pipeline parallel: a stage holds some layers' routers, the trace every layer's (`layers` of them). Each router
    reads the trace at its global layer, `layer_number - 1` (Megatron numbers a stage's layers from its offset,
    uneven stages too, convert.StageSplit; transformer_layer.py:280, and hands the number to the MoE layer's
    router, :371-372, moe_layer.py:123-126, router.py:126-128). A token counts as differing when its routing
    differs in some layer of any stage: the step's per-token flags are OR-ed over the PP group (`group`) once, in
    `take_counts`, before they are counted, so every stage counts what one rank holding every layer counts (the
    train step then sums the counts over the DP group only).

    Context parallel: the model cuts the recording to this rank's tokens as it cuts the rows (`localize`, called
    from the model's forward), and the counts are summed over the CP group (`cp_group`), each token counted on the
    rank that holds it (also once a step)."""

    def __init__(self, routers: list[Any], *, replace: bool, layers: int | None = None, group: Any = None,
                 cp_group: Any = None) -> None:  # fmt: skip
        super().__init__(routers, replace=replace, layers=layers)
        self.group = group  # the PP group (None: one stage)
        self.cp_group = cp_group  # the CP group (None: whole sequences on every rank)
        self._local = False  # the recording cut to this CP rank's tokens (`localize`)
        self._pending: list[tuple[Tensor, Tensor]] = []  # (differs, recorded) of each counted forward this step
        for router in routers:
            if router.layer_number is None:  # set by its MoE layer at build
                raise ValueError("a router without its layer_number (not built inside a TransformerLayer)")
            router.router_replay = LayerReplay(self, int(router.layer_number) - 1)

    def begin(self, inputs: tuple[Tensor, Tensor] | None, *, count: bool = True) -> None:
        super().begin(inputs, count=count)
        self._local = False

    def localize(self, split: ContextSplit | SequenceSplit, rows: int) -> None:
        """Context parallel: keep this rank's tokens of the recording, as the model keeps them (context.py): each
        row padded to the split's length, then this rank's positions ([rows * 2c] tokens, row-major). Sequence
        parallel the same with this TP rank's chunk (sequence.py; the TP group then passed as `cp_group`)."""
        if self._ids is None or self._recorded is None or self._local:
            return
        width, positions = self._ids.shape[0] // rows, split.positions(self._ids.device)

        def take(t: Tensor) -> Tensor:
            padded = t.new_zeros((rows, split.padded, *t.shape[1:]))  # pads: not recorded
            padded[:, :width] = t.view(rows, width, *t.shape[1:])
            return padded[:, positions].reshape(rows * len(positions), *t.shape[1:])

        self._ids, self._recorded = take(self._ids), take(self._recorded)
        self._differs = torch.zeros_like(self._recorded)
        self._local = True

    def end_forward(self) -> None:
        """Keep this forward's flags for `take_counts` where other ranks hold part of the answer (other stages'
        layers, other CP ranks' tokens): reduced there once a step. Reduced here, every micro-batch's forward
        waited for every stage's, which serialised 1F1B's warm-up."""
        if self.group is None and self.cp_group is None:
            super().end_forward()
            return
        if self._counting and self._differs is not None and self._recorded is not None:
            self._pending.append((self._differs, self._recorded))
        self._counting = False

    def take_counts(self) -> tuple[int, int]:
        """The step's counts: a token differs when it differs in some layer of any stage (flags OR-ed over the PP
        group), each token counted on the CP rank that holds it (counts summed over the CP group). A collective on
        every rank of both groups: each stage ran the same micro-batches in the same order, so the flags line up."""
        pending, self._pending = self._pending, []
        if pending:
            flags = torch.cat([d for d, _ in pending]).to(torch.int32)  # gloo reduces no bool tensors
            recorded = torch.cat([r for _, r in pending])
            if self.group is not None:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            counts = torch.stack([flags.sum(), recorded.sum()]).to(torch.int64)
            if self.cp_group is not None:
                dist.all_reduce(counts, group=self.cp_group)
            self.differing_tokens += int(counts[0])
            self.recorded_tokens += int(counts[1])
        return super().take_counts()

    def layer_inputs(self, layer: int, seq_batch: tuple[int, int] | None) -> tuple[Tensor, Tensor] | None:
        """(ids [s*b, K], recorded [s*b]) of `layer` in Megatron's sequence-major token order, or None."""
        if self._ids is None or self._recorded is None:
            return None
        if seq_batch is None or seq_batch[0] * seq_batch[1] != self._ids.shape[0]:
            raise RuntimeError(f"the router saw (s, b) = {seq_batch}, the replay has {self._ids.shape[0]} tokens")
        s, b = seq_batch
        ids = self._ids[:, layer].view(b, s, -1).transpose(0, 1).reshape(s * b, -1)
        return ids, self._recorded.view(b, s).transpose(0, 1).reshape(s * b)
