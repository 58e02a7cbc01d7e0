"""Megatron-core's GPTModel for a Hugging Face Qwen3 checkpoint, and `MegatronPolicy`, the module the torch
train step drives (trainer/torch/policy.py reads a model through `response_logprobs`, which calls a model's
`logprobs.SHARDED_ENTRY` method when it has one).

    build_gpt(hf_config, tp)   TransformerConfig from the HF config (RMSNorm, SwiGLU, q/k norms, GQA, RoPE,
                               no biases, tied embeddings; Qwen3-MoE: top-k softmax routers, SequentialMLP
                               experts, the all-gather dispatcher, no auxiliary loss), the local layer spec (no
                               Transformer Engine) with its core attention swapped for PyTorch SDPA
                               (attention.py), its norms and (dense) linear layers for sequence.py's, which
                               run sequence parallel on a CPU too, and, for MoE, its router for
                               `moe.LocalTopKRouter`; float32
                               parameters initialised on the CPU, then overwritten by the converted checkpoint
    a forward:                 embedding -> rotary table -> decoder (final norm included) -> the hidden states
                               that predict each response token -> output layer logprobs (logprobs.py); with
                               pipeline parallel each stage runs its part and hands over (pipeline.py); with
                               sequence parallel each TP rank's decoder holds its chunk of the positions,
                               gathered again before the output layer (sequence.py)
    packed rows:               trainer.pack_sequences: one row [1, L] (trainer/torch/inputs.py `packed_inputs`),
                               handed to the decoder with Megatron's PackedSeqParams (qkv_format "thd", the
                               sequences' cu_seqlens and longest length) as GPTModel.forward hands them; the
                               rotary table covers the longest sequence, so positions restart at every sequence
                               (`MegatronPolicy.rope_table`); the attention keeps the sequences apart (attention.py)

What assumes CUDA in Megatron-core 0.16.1 and how the backend goes around it on a CPU (on CUDA the real path
runs): `RotaryEmbedding.get_emb` moves its table to `torch.cuda.current_device()` on first use
(models/common/embeddings/rotary_pos_embedding.py:160-162), so on a CPU the table is built here from
`get_freqs_non_repeated` exactly as get_emb builds it (:164-174); `DotProductAttention` allocates its scores on
CUDA (see attention.py: replaced by SDPA everywhere); the RNG tracker around attention dropout reads the CUDA
RNG (tensor_parallel/random.py:243-255): dropout is 0 for Qwen3, and on a CPU the inference tracker (whose fork
is a no-op, random.py:320-336) is installed instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from miles_stream.errors import ConfigError
from miles_stream.trainer.megatron.attention import SdpaAttention
from miles_stream.trainer.megatron.context import ContextSplit, sum_over_cp
from miles_stream.trainer.megatron.convert import Qwen3Shape, StageSplit
from miles_stream.trainer.megatron.dispatch import use_ep_dispatcher
from miles_stream.trainer.megatron.logprobs import output_logprobs
from miles_stream.trainer.megatron.moe import LocalTopKRouter, MegatronRoutingReplay
from miles_stream.trainer.megatron.parallel import Groups
from miles_stream.trainer.megatron.pipeline import Sends, from_previous, share_last, to_next, to_next_later
from miles_stream.trainer.megatron.sequence import (
    SequenceParallelNorm,
    SequenceSplit,
    SpColumnParallelLinear,
    SpRowParallelLinear,
    gather_sequence,
    pad_rows,
    scatter_sequence,
)
from miles_stream.trainer.torch.inputs import MicroInputs
from miles_stream.trainer.torch.logprobs import PACKS_ITSELF, SHARDED_ENTRY
from miles_stream.trainer.torch.routing_replay import REPLAY_ENTRY

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig


def rope_theta(hf_config: Any) -> float:
    """RoPE's base (transformers 5 keeps it in `rope_parameters`; older configs as `rope_theta`)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"the megatron backend builds plain RoPE; this model scales it ({params['rope_type']})")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def moe_config(shape: Qwen3Shape) -> dict[str, Any]:
    """Qwen3-MoE's routing as Megatron's TransformerConfig spells it (empty for a dense model)."""
    if not shape.experts:
        return {}
    return dict(
        num_moe_experts=shape.experts, moe_router_topk=shape.topk, moe_ffn_hidden_size=shape.expert_ffn,
        moe_router_score_function="softmax", moe_router_pre_softmax=not shape.norm_topk,  # see moe.py
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,  # the torch backend adds no aux loss
        moe_router_dtype="fp32",  # logits and gate weights in float32 (HF: logits in the input dtype, softmax fp32)
        moe_token_dispatcher_type="allgather",  # alltoall makes a CUDA stream at build (token_dispatcher.py:444-445)
        moe_grouped_gemm=False, moe_permute_fusion=False, moe_router_fusion=False,  # grouped_gemm / TE kernels
    )  # fmt: skip


def transformer_config(hf_config: Any, shape: Qwen3Shape, *, tp: int, device: str, dtype: torch.dtype,
                       ep: int = 1, pp: int = 1, cp: int = 1, split: StageSplit | None = None,
                       sp: bool = False) -> Any:  # fmt: skip
    """Megatron's TransformerConfig of the checkpoint's shape; `split`: the first / last pipeline stage's layer
    counts (num_layers_in_first/last_pipeline_stage: Megatron builds each stage's layers and numbers them from
    its offset, transformer_block.py:103-145, transformer_layer.py:54-152, as convert.StageSplit places them)."""
    cpu = not device.startswith("cuda")
    split = split or StageSplit()
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden, num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_groups, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps), add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=True, hidden_dropout=0.0, attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, sequence_parallel=sp,  # experts split over TP too (expert_tensor_parallel_size
        # unset: TP, transformer_config.py; sequence.py)
        num_layers_in_first_pipeline_stage=split.first, num_layers_in_last_pipeline_stage=split.last,
        params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=cpu, perform_initialization=False,  # the checkpoint's weights overwrite them
        # the fused paths below are CUDA kernels (or Apex / TE): off on a CPU, Megatron's defaults on CUDA
        masked_softmax_fusion=not cpu, bias_activation_fusion=False, bias_dropout_fusion=not cpu,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        **moe_config(shape),
    )  # fmt: skip


def build_gpt(hf_config: Any, *, tp: int, device: str, dtype: torch.dtype, ep: int = 1, pp: int = 1,
              stage: int = 0, cp: int = 1, split: StageSplit | None = None, sp: bool = False) -> Any:  # fmt: skip
    """An uninitialised GPTModel of the checkpoint's shape on `device` (this rank's TP shards; with expert
    parallel, its num_experts/ep experts of every layer, dispatched by dispatch.py's `EpDispatcher`; with
    pipeline parallel, pipeline stage `stage`'s layers (`split`: how many each stage holds, convert.StageSplit),
    the embedding on the first, the output layer on the last; `sp`: sequence parallel, sequence.py).

    A tied model cut into stages is built untied: Megatron's own path for it moves the last stage's copy of the
    embedding to CUDA (`weight.data.cuda()`, language_module.py:244) and all-reduces it from the first stage at
    build; here the conversion gives the last stage its copy (convert.by_stage) and the layout sums the two
    copies' gradients over the embedding group (layout.py), which is what Megatron does after that."""
    shape = Qwen3Shape.of(hf_config)
    shape.check_split(tp, ep, pp, split)
    if shape.experts and tp > 1 and not sp:
        # megatron-core 0.16.1's MoELayer refuses to train with TP unless sequence parallelism is on
        # (transformer/moe/moe_layer.py:379-383): its router and dispatcher expect each rank's own positions
        raise ConfigError(f"trainer.megatron.tensor_parallel={tp} with Qwen3-MoE needs sequence parallelism, as "
                          "Megatron's MoE layer does: set trainer.megatron.sequence_parallel true (or "
                          "tensor_parallel 1)")  # fmt: skip
    if not device.startswith("cuda"):
        megatron_random.initialize_rng_tracker(inference_rng_tracker=True)  # see the module's docstring
    spec = get_gpt_layer_local_spec(num_experts=shape.experts or None, moe_grouped_gemm=False, qk_layernorm=True,
                                    normalization="RMSNorm")  # fmt: skip
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = SdpaAttention
    # the local spec's norms are WrappedTorchNorm (transformer/torch_norm.py), made float32 and without SP
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelNorm
    attention.q_layernorm = attention.k_layernorm = SequenceParallelNorm
    attention.linear_qkv, attention.linear_proj = SpColumnParallelLinear, SpRowParallelLinear
    if shape.experts:  # experts: SequentialMLP (grouped GEMM needs the grouped_gemm package or TE); their linear
        # layers leave the tokens' exchange to the dispatcher (explicit_expert_comm, tensor_parallel/layers.py:841)
        layer.mlp.submodules.router = LocalTopKRouter
    else:
        layer.mlp.submodules.linear_fc1, layer.mlp.submodules.linear_fc2 = SpColumnParallelLinear, SpRowParallelLinear
    # a block spec of this stage's layers, to give the final norm ours too (from a layer spec Megatron makes it the
    # module-wide WrappedTorchNorm, transformer_block.py:257-259)
    block = TransformerBlockSubmodules(layer_specs=[spec] * (split or StageSplit()).layers(shape.num_layers, pp)[stage],
                                       layer_norm=SequenceParallelNorm)  # fmt: skip
    with warnings.catch_warnings():  # its deprecation notices (an MLP's ffn_hidden_size default, ...)
        warnings.simplefilter("ignore")
        gpt = GPTModel(transformer_config(hf_config, shape, tp=tp, ep=ep, pp=pp, cp=cp, device=device, dtype=dtype,
                                          split=split, sp=sp),
                       block,
                       vocab_size=shape.vocab, max_sequence_length=int(hf_config.max_position_embeddings),
                       position_embedding_type="rope", rotary_base=int(rope_theta(hf_config)),
                       share_embeddings_and_output_weights=shape.tied and pp == 1, parallel_output=True,
                       pre_process=stage == 0, post_process=stage == pp - 1,
                       scatter_embedding_sequence_parallel=False)  # fmt: skip
    if shape.experts and tp * ep > 1:  # the experts' tokens come from the TP x EP group
        use_ep_dispatcher(gpt)
    return gpt.to(device)


def packed_params(x: MicroInputs) -> PackedSeqParams | None:
    """Megatron's own description of a packed row (trainer/torch/inputs.py `packed_inputs`: one row, each sequence
    after the other), what GPTModel.forward hands its decoder (gpt_model.py:525-537) and the decoder each layer's
    attention (transformer_block.py:776, transformer_layer.py:606); None for padded rows."""
    if x.cu_seqlens is None:
        return None
    if x.input_ids.shape[0] != 1:
        raise ValueError(f"packed sequences come in one row, got {x.input_ids.shape[0]}")
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=x.cu_seqlens, cu_seqlens_kv=x.cu_seqlens,
                           max_seqlen_q=x.max_length, max_seqlen_kv=x.max_length)  # fmt: skip


class MegatronPolicy(nn.Module):
    """A GPTModel as the torch train step sees a policy: `config` (the HF config: `vocab_size`), parameters,
    and the logprob entry `response_logprobs` calls (`SHARDED_ENTRY`)."""

    def __init__(self, gpt: Any, hf_config: Any, groups: Groups, split: StageSplit | None = None) -> None:
        super().__init__()
        self.gpt = gpt
        self.config = hf_config
        self.groups = groups
        self.split = split or StageSplit()  # how many layers each pipeline stage holds (layout.py places by it)
        self.shape = Qwen3Shape.of(hf_config)
        pad = getattr(hf_config, "pad_token_id", None)
        self.pad_id: int | None = None if pad is None else int(pad)
        self.residual_dtype = next(gpt.parameters()).dtype  # what passes between stages (Megatron's pipeline_dtype)
        self.sequence_parallel = bool(gpt.config.sequence_parallel)  # each TP rank holds 1/tp of the positions
        pp = groups.pp
        # global ranks of the stage before, the stage after and the last stage in this rank's PP group
        stages = (max(pp.rank - 1, 0), min(pp.rank + 1, pp.world - 1), pp.world - 1)
        self.peers = tuple(dist.get_global_rank(pp.group, s) for s in stages) if pp.world > 1 else (0, 0, 0)
        self.lanes = (pp.group, groups.pp_back)  # hidden states forward, their gradients back (pipeline.py)
        setattr(self, SHARDED_ENTRY, self.response_logprobs)  # what trainer/torch/logprobs.py calls
        setattr(self, REPLAY_ENTRY, self.routing_replay)  # what trainer/torch/policy.py asks for R3
        self.replay: MegatronRoutingReplay | None = None  # the R3 made for this model (`routing_replay`)
        self.sends: Sends | None = None  # set during a 1F1B training step (pipeline.OneFOneB): hand-offs in flight
        setattr(self, PACKS_ITSELF, True)  # packed rows go to Megatron's attention as PackedSeqParams

    def routers(self) -> list[Any]:
        """The MoE routers in layer order (empty for a dense model)."""
        return [layer.mlp.router for layer in self.gpt.decoder.layers if hasattr(layer.mlp, "router")]

    def routing_replay(self, *, replace: bool) -> MegatronRoutingReplay | None:
        """R3 over this model's routers (None: a dense model); a stage's routers replay their own layers of the
        trace and combine their counts over the PP group (see moe.py)."""
        routers, pp, cp = self.routers(), self.groups.pp, self.groups.cp
        if not routers:
            return None
        # the ranks that each hold their own positions of a row: CP's, or under SP the TP group's (not both)
        shares = cp.group if cp.world > 1 else self.groups.tp_group if self.sequence_parallel else None
        self.replay = MegatronRoutingReplay(routers, replace=replace, layers=self.shape.num_layers,
                                            group=pp.group if pp.world > 1 else None, cp_group=shares)  # fmt: skip
        return self.replay

    def hidden(self, x: MicroInputs, sends: Sends | None = None) -> Tensor:
        """[L, b, H] this stage's output for the micro-batch's rows: right-padded (causal attention: padding after a
        sequence changes nothing before it), or one packed row ([L, 1, H], the sequences kept apart by
        `packed_params`): the decoder's after the final norm on the last stage. With context parallel, this rank's
        two chunks of every row ([2c, b, H], context.py). With sequence parallel, the rows padded to a multiple of
        tp and this rank's chunk of their positions ([L/tp, b, H], sequence.py): the embedding's output is cut, and
        so is what passes between pipeline stages."""
        g = self.groups
        seq = None
        if self.sequence_parallel:  # this rank's chunk of the positions (sequence.py)
            x = pad_rows(x, g.tp, self.pad_id or 0)
            seq = SequenceSplit(g.tp, g.tp_rank, x.input_ids.shape[1])
            if self.replay is not None:  # R3: the recording's tokens cut as the rows are
                self.replay.localize(seq, x.input_ids.shape[0])
        input_ids = x.input_ids
        b, length = input_ids.shape
        packed = packed_params(x)
        # (RoPE: the embedding adds no position of its own, language_model_embedding.py:44; these are unread)
        positions = torch.arange(length, device=input_ids.device)[None].expand(b, length)
        positions = positions if x.position_ids is None else x.position_ids
        split = None
        if g.cp.world > 1:
            split = ContextSplit(g.cp.world, g.cp.rank, length)
            input_ids = split.take(input_ids, self.pad_id or 0)
            positions = split.positions(input_ids.device)[None].expand(b, -1)
            if self.replay is not None:  # R3: the recording's tokens cut as the rows are
                self.replay.localize(split, b)
        if g.first_stage:
            h = self.gpt.embedding(input_ids=input_ids, position_ids=positions)  # [L, b, H]
            if self.pad_id is not None:  # HF's embedding has padding_idx=pad_token_id (transformers
                # models/qwen3/modeling_qwen3.py:342-345): the pad row gets no gradient from the input side
                pad = (input_ids == self.pad_id).transpose(0, 1)[..., None]
                h = torch.where(pad, h.detach(), h)
            if seq is not None:
                h = scatter_sequence(h, g.tp_group)
        else:  # the decoder of a stage without the embedding reads its input from set_input_tensor
            # (transformer_block.py:685-687)
            rows = input_ids.shape[1] if seq is None else seq.chunk  # under SP: this rank's chunk of the positions
            h = from_previous((rows, b, self.shape.hidden), self.residual_dtype, device=input_ids.device,
                              peer=self.peers[0], lanes=self.lanes, sends=sends)  # fmt: skip
            self.gpt.decoder.set_input_tensor(h)
        out: Tensor = self.gpt.decoder(hidden_states=h, attention_mask=None, rotary_pos_emb=self.rope_table(x, split),
                                       packed_seq_params=packed)  # fmt: skip
        return out

    def rope_table(self, x: MicroInputs, split: ContextSplit | None = None) -> Tensor:
        """RoPE's [n, 1, 1, d] angles for positions 0..n-1, n the row's length, or packed the longest sequence's:
        GPTModel asks for max(max_seqlen_q, max_seqlen_kv) when packed (rotary_pos_embedding.py:239-241, called
        from gpt_model.py:361-369), and Megatron's thd RoPE gives each sequence the table's first rows, so its
        positions restart at 0, as the torch backend's position ids do (rope_utils.py:232-247). A table as long as
        the whole row would switch it to each sequence's offset in the row (:211-231): the longest sequence is that
        long only when it is the row's one sequence, whose offset is 0. With context parallel: the angles of this
        rank's global positions (Megatron's rotary picks them itself on CUDA, :201-204; built here on both)."""
        rotary = self.gpt.rotary_pos_emb
        if split is not None:
            freqs = rotary.get_freqs_non_repeated(split.padded)[split.positions(x.input_ids.device)]
            return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        length = x.input_ids.shape[1] if x.cu_seqlens is None else x.max_length
        if x.input_ids.is_cuda:
            table: Tensor = rotary(length, packed_seq=x.cu_seqlens is not None)
            return table
        # on a CPU: get_emb's own lines (rotary_pos_embedding.py:164-174), without its move to CUDA
        freqs = rotary.get_freqs_non_repeated(length)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def output_weight(self) -> Tensor:
        if self.shape.tied and self.groups.pp.world == 1:
            shared: Tensor = self.gpt.shared_embedding_or_output_weight()
            return shared
        weight: Tensor = self.gpt.output_layer.weight  # a tied model's last stage: its copy of the embedding
        return weight

    def response_logprobs(
        self, x: MicroInputs, *, temperature: float, entropy_grad: bool = False, fused: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(logp_bT, entropy_bT), as trainer/torch/logprobs.py's `response_logprobs` returns them; in a 1F1B training
        step, placeholders on every stage but the last (pipeline.py)."""
        later = self.sends if self.sends is not None and torch.is_grad_enabled() else None
        h_LbH = self.hidden(x, later)
        g = self.groups
        out_shape = tuple(x.targets_bT.shape)
        if not g.last_stage and later is not None:
            return to_next_later(h_LbH, out_shape, peer=self.peers[1], lanes=self.lanes, sends=later)
        if not g.last_stage:  # the last stage's logprobs come back through the hand-off (pipeline.py)
            return to_next(h_LbH, out_shape, peer=self.peers[1], last=self.peers[2], lanes=self.lanes)
        if self.sequence_parallel:  # every position (padded to a multiple of TP), for the vocab-split output layer
            h_LbH = gather_sequence(h_LbH, g.tp_group)
        h_bLH = h_LbH.transpose(0, 1)
        b, t = x.targets_bT.shape
        row_b = torch.arange(h_bLH.shape[0], device=h_bLH.device) if x.row_b is None else x.row_b
        rows_bT = row_b[:, None].expand(b, t)  # packed: every sample's row is the one row
        at_bT, held = x.positions_bT, None
        if g.cp.world > 1:  # only the response tokens predicted from this rank's positions (context.py)
            at_bT = ContextSplit(g.cp.world, g.cp.rank, x.input_ids.shape[1]).local_index(h_bLH.device)[at_bT]
            held = at_bT >= 0
            rows, at, targets = rows_bT[held], at_bT[held], x.targets_bT[held]
        else:
            rows, at, targets = rows_bT.reshape(-1), at_bT.reshape(-1), x.targets_bT.reshape(-1)
        h_nH = h_bLH[rows, at]
        weight = self.output_weight()
        if torch.is_autocast_enabled(h_nH.device.type):  # the kernel is not autocast's: cast as it would
            dtype = torch.get_autocast_dtype(h_nH.device.type)
            h_nH, weight = h_nH.to(dtype), weight.to(dtype)
        logp, entropy = output_logprobs(
            h_nH, weight, targets, temperature=temperature, vocab_start=g.tp_rank * weight.shape[0],
            tp_group=g.tp_group, tp=g.tp, entropy_grad=entropy_grad, fused=fused, gathered=self.sequence_parallel,
        )  # fmt: skip
        if held is not None:  # zeros at the other ranks' tokens, then every rank's summed
            cells = torch.nonzero(held, as_tuple=True)
            logp = sum_over_cp(logp.new_zeros(b, t).index_put(cells, logp), g.cp.group)
            entropy = sum_over_cp(entropy.new_zeros(b, t).index_put(cells, entropy), g.cp.group)
        logp, entropy = logp.view(b, t), entropy.view(b, t)
        if g.pp.world > 1 and later is None:
            share_last(logp, entropy, last=self.peers[2], group=g.pp.group)
        return logp, entropy
