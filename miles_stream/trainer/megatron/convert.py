"""Qwen3 (dense) and Qwen3-MoE weights between Hugging Face names and Megatron-core's GPTModel, split over
tensor-parallel ranks (a MoE layer's experts too, each as a dense MLP), by layer over pipeline stages (`by_stage`,
`stage_home`, each stage's layers from `StageSplit`: a MoE layer's router and experts go with it) and, for MoE,
by expert over the expert-parallel ranks of a stage (`by_expert`, `expert_home`, applied to a stage's names: `home`).

Pure functions of tensors: no process group, no Megatron import. Legend: H hidden, nh query heads, ng key/value
groups (r = nh / ng heads a group), d head dim, F MLP width, V vocabulary, tp tensor-parallel ranks.

    HF (Qwen3ForCausalLM)                              Megatron (GPTModel, local spec), on TP rank k of tp
    model.embed_tokens.weight        [V, H]            embedding.word_embeddings.weight     [V/tp, H] rows k
    model.layers.i.input_layernorm   [H]               decoder.layers.i.input_layernorm     [H] (every rank)
    self_attn.q_proj [nh*d, H] k_proj, v_proj [ng*d, H] self_attention.linear_qkv  [(nh+2ng)*d/tp, H]: per
                                                        group g: its r query heads, its key, its value (q k v
                                                        interleaved by group); rank k holds groups k*ng/tp..
    self_attn.o_proj                 [H, nh*d]         self_attention.linear_proj           [H, nh*d/tp] cols k
    self_attn.q_norm / k_norm        [d]               self_attention.q_layernorm / k_layernorm  [d]
    post_attention_layernorm         [H]               pre_mlp_layernorm                    [H]
    mlp.gate_proj, mlp.up_proj       [F, H] each       mlp.linear_fc1  [2F/tp, H]: rank k's gate rows, then its
                                                        up rows (each rank fuses its own shards)
    mlp.down_proj                    [H, F]            mlp.linear_fc2                       [H, F/tp] cols k
    model.norm.weight                [H]               decoder.final_layernorm.weight       [H]
    lm_head.weight                   [V, H]            output_layer.weight [V/tp, H]; tied: the embedding's

Qwen3-MoE (every layer sparse; E experts, each of width Fe; Megatron's SequentialMLP; names below for expert
parallel 1: with ep ranks, rank j holds experts j*E/ep .. (j+1)*E/ep-1 as local_experts.0 .. E/ep-1, as Megatron's
SequentialMLP numbers them, experts.py:294-299; each expert split over the TP ranks as the dense MLP is, Megatron's
expert_tensor_parallel_size left at its default, TP, parallel_state.py:786-787):
    model.layers.i.mlp.gate.weight   [E, H]            decoder.layers.i.mlp.router.weight   [E, H] (every rank)
    mlp.experts.gate_up_proj [E, 2Fe, H] (in memory;   mlp.experts.local_experts.e.linear_fc1.weight [2Fe/tp, H]:
      on disk mlp.experts.e.gate_proj / up_proj)         rank k's gate rows of expert e, then its up rows
    mlp.experts.down_proj    [E, H, Fe] (on disk       mlp.experts.local_experts.e.linear_fc2.weight [H, Fe/tp]
      mlp.experts.e.down_proj)                           cols k
Either HF form is read; the in-memory (fused) form is what `to_hf` gives, as the torch backend's
`model.state_dict()` names it.

A tied checkpoint's HF state dict names `lm_head.weight` too (the same tensor): it is published under both names,
as the torch backend publishes `model.state_dict()`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from miles_stream.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StageSplit:
    """How many of a model's layers each pipeline stage holds, in Megatron's terms (trainer.megatron.
    first_stage_layers / last_stage_layers; TransformerConfig's num_layers_in_first_pipeline_stage /
    num_layers_in_last_pipeline_stage, transformer_config.py:62-66): the first and the last stage hold the counts
    given (None: no count of their own), the other stages share the rest evenly. Neither given: every stage
    holds num_layers / pp."""

    first: int | None = None
    last: int | None = None

    def layers(self, num_layers: int, pp: int) -> tuple[int, ...]:
        """Each stage's layer count, stage order, as megatron-core 0.16.1 builds them (get_num_layers_to_build,
        transformer_block.py:103-145: the middle stages get (L - first - last) / (stages left) each); a split
        that leaves a stage no whole number of layers, or none, is a ConfigError naming the key."""
        if self.first is None and self.last is None:
            if num_layers % pp:
                raise ConfigError(f"trainer.megatron.pipeline_parallel={pp} must divide the model's "
                                  f"num_hidden_layers ({num_layers}); or set trainer.megatron.first_stage_layers / "
                                  "last_stage_layers")  # fmt: skip
            return (num_layers // pp,) * pp
        if pp < 2:
            raise ConfigError("trainer.megatron.first_stage_layers / last_stage_layers cut layers over pipeline "
                              f"stages: set them only with pipeline_parallel > 1 (it is {pp})")  # fmt: skip
        given = [n for n in (self.first, self.last) if n is not None]
        rest, left = num_layers - sum(given), pp - len(given)
        named = (("first_stage_layers", self.first), ("last_stage_layers", self.last))
        keys = "trainer.megatron." + " + ".join(k for k, n in named if n is not None)
        if left == 0 and rest != 0:
            raise ConfigError(f"{keys} ({sum(given)}) must equal the model's num_hidden_layers ({num_layers}) over "
                              f"pipeline_parallel={pp} stages")  # fmt: skip
        if left > 0 and (rest < left or rest % left):
            raise ConfigError(f"{keys} ({sum(given)}) must leave the model's other {rest} layers (of "
                              f"{num_layers}) a whole number >= 1 each over the {left} middle stages of "
                              f"pipeline_parallel={pp}")  # fmt: skip
        middle = rest // left if left else 0
        counts = [middle] * pp
        if self.first is not None:
            counts[0] = self.first
        if self.last is not None:
            counts[-1] = self.last
        return tuple(counts)

    def starts(self, num_layers: int, pp: int) -> tuple[int, ...]:
        """Each stage's first global layer (Megatron's layer offset, get_transformer_layer_offset,
        transformer_layer.py:54-152: a stage's layer_number counts from it + 1)."""
        counts = self.layers(num_layers, pp)
        return tuple(sum(counts[:s]) for s in range(pp))


@dataclass(frozen=True, slots=True)
class Qwen3Shape:
    num_layers: int
    hidden: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    experts: int = 0  # Qwen3-MoE: experts a layer (0: dense)
    topk: int = 0  # experts a token
    expert_ffn: int = 0  # each expert's MLP width
    norm_topk: bool = True  # gate weights renormalised over the chosen experts (norm_topk_prob)

    @classmethod
    def of(cls, hf_config: Any) -> Qwen3Shape:
        """The shape of a Hugging Face Qwen3 config; a config this conversion does not cover is a ConfigError."""
        kind = getattr(hf_config, "model_type", "")
        if kind not in ("qwen3", "qwen3_moe"):
            raise ConfigError(f"the megatron backend converts Qwen3 and Qwen3-MoE checkpoints; this one is {kind!r}")
        if getattr(hf_config, "attention_bias", False):
            raise ConfigError("the megatron backend's Qwen3 conversion has no attention biases (attention_bias)")
        if getattr(hf_config, "use_sliding_window", False):
            raise ConfigError("the megatron backend does not build sliding-window attention (use_sliding_window)")
        heads = int(hf_config.num_attention_heads)
        return cls(num_layers=int(hf_config.num_hidden_layers), hidden=int(hf_config.hidden_size), num_heads=heads,
                   num_groups=int(hf_config.num_key_value_heads),
                   head_dim=int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads),
                   ffn=int(hf_config.intermediate_size), vocab=int(hf_config.vocab_size),
                   tied=bool(hf_config.tie_word_embeddings),
                   **(_moe_shape(hf_config) if kind == "qwen3_moe" else {}))  # fmt: skip

    def check_split(self, tp: int, ep: int = 1, pp: int = 1, split: StageSplit | None = None) -> None:
        """Refuse a tensor-, expert- or pipeline-parallel size that does not divide what it splits, or a stage
        split that leaves no whole number of layers to a stage (Megatron asserts it deep inside)."""
        (split or StageSplit()).layers(self.num_layers, pp)
        if ep > 1 and not self.experts:
            raise ConfigError(f"trainer.megatron.expert_parallel={ep}: this model is dense (no experts to split): "
                              "set 1")  # fmt: skip
        if ep > 1 and self.experts % ep:
            raise ConfigError(f"trainer.megatron.expert_parallel={ep} must divide the model's num_experts "
                              f"({self.experts})")  # fmt: skip
        for what, n in (("num_key_value_heads", self.num_groups), ("num_attention_heads", self.num_heads),
                        ("intermediate_size", self.ffn), ("vocab_size", self.vocab),
                        ("moe_intermediate_size", self.expert_ffn)):  # fmt: skip
            if n % tp:
                raise ConfigError(f"trainer.megatron.tensor_parallel={tp} must divide the model's {what} ({n})")


def _moe_shape(hf_config: Any) -> dict[str, Any]:
    """Qwen3-MoE's expert fields; a layout the backend does not build (dense layers among sparse) is refused."""
    if int(getattr(hf_config, "decoder_sparse_step", 1)) != 1 or list(getattr(hf_config, "mlp_only_layers", []) or []):
        raise ConfigError("the megatron backend builds Qwen3-MoE with every layer sparse "
                          "(decoder_sparse_step 1, mlp_only_layers [])")  # fmt: skip
    return {"experts": int(hf_config.num_experts), "topk": int(hf_config.num_experts_per_tok),
            "expert_ffn": int(hf_config.moe_intermediate_size),
            "norm_topk": bool(hf_config.norm_topk_prob)}  # fmt: skip


def _layer(i: int) -> tuple[str, str]:
    return f"model.layers.{i}.", f"decoder.layers.{i}."


# 1:1 tensors: (HF suffix, Megatron suffix, the dim tensor parallel splits or None for replicated)
_PLAIN = (
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", 1),
    ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", None),
    ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", None),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", None),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight", 1),  # dense only
)


def _plain(shape: Qwen3Shape) -> tuple[tuple[str, str, int | None], ...]:
    return _PLAIN[:-1] if shape.experts else _PLAIN


def to_megatron(hf: Mapping[str, Tensor], shape: Qwen3Shape, tp: int = 1) -> list[dict[str, Tensor]]:
    """One Megatron state dict (parameters only) per tensor-parallel rank, from a Hugging Face state dict."""
    return [dict(rank_params(hf, shape, tp, rank)) for rank in range(tp)]


def rank_params(hf: Mapping[str, Tensor], shape: Qwen3Shape, tp: int, rank: int,
                keep: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    """(Megatron name, tensor-parallel rank `rank`'s part, a tensor of its own) of every parameter `keep` accepts,
    in `megatron_names` order, reading from `hf` only the tensors those parameters are made of: over a lazy `hf`
    (build.py's `Checkpoint`) a rank reads its own share of a checkpoint, one tensor at a time."""
    shape.check_split(tp)

    def part(tensor: Tensor, dim: int | None) -> Tensor:
        return (tensor if dim is None else tensor.chunk(tp, dim=dim)[rank]).contiguous().clone()

    if keep(name := "embedding.word_embeddings.weight"):
        yield name, part(hf["model.embed_tokens.weight"], 0)
    r, d = shape.num_heads // shape.num_groups, shape.head_dim
    for i in range(shape.num_layers):
        h, m = _layer(i)
        if keep(name := m + "self_attention.linear_qkv.weight"):
            q = hf[h + "self_attn.q_proj.weight"].view(shape.num_groups, r * d, -1)
            k = hf[h + "self_attn.k_proj.weight"].view(shape.num_groups, d, -1)
            v = hf[h + "self_attn.v_proj.weight"].view(shape.num_groups, d, -1)
            yield name, part(torch.cat([q, k, v], dim=1).reshape(-1, shape.hidden), 0)
        for hf_name, mg_name, dim in _plain(shape):
            if keep(m + mg_name):
                yield m + mg_name, part(hf[h + hf_name], dim)
        if shape.experts:
            if keep(name := m + "mlp.router.weight"):
                yield name, part(hf[h + "mlp.gate.weight"], None)
            yield from _rank_experts(hf, h, m, shape, keep, tp, rank)
        elif keep(name := m + "mlp.linear_fc1.weight"):  # this rank's gate rows, then its up rows
            gate = hf[h + "mlp.gate_proj.weight"].chunk(tp, dim=0)[rank]
            yield name, torch.cat([gate, hf[h + "mlp.up_proj.weight"].chunk(tp, dim=0)[rank]], dim=0)
    if keep(name := "decoder.final_layernorm.weight"):
        yield name, part(hf["model.norm.weight"], None)
    if not shape.tied and keep(name := "output_layer.weight"):
        yield name, part(hf["lm_head.weight"], 0)


def _rank_experts(hf: Mapping[str, Tensor], h: str, m: str, shape: Qwen3Shape, keep: Callable[[str], bool],
                  tp: int = 1, rank: int = 0) -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    """Layer `h`'s experts that `keep` accepts, TP rank `rank`'s part of each (fc1 [2Fe/tp, H]: its gate rows then
    its up rows, as a dense fc1; fc2 [H, Fe/tp]: its columns), from the fused in-memory form (each fused tensor
    read once) or the per-expert on-disk form (only the experts kept read)."""
    names = [(m + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
              m + f"mlp.experts.local_experts.{e}.linear_fc2.weight") for e in range(shape.experts)]  # fmt: skip
    wanted = [(e, fc1, fc2) for e, (fc1, fc2) in enumerate(names) if keep(fc1) or keep(fc2)]
    if not wanted:
        return

    def fc1_part(gate: Tensor, up: Tensor) -> Tensor:
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)

    def fc2_part(down: Tensor) -> Tensor:
        return down.chunk(tp, dim=1)[rank].contiguous().clone()

    x = h + "mlp.experts."
    if x + "gate_up_proj" in hf:
        gate_up, down = hf[x + "gate_up_proj"], hf[x + "down_proj"]
        for e, fc1, fc2 in wanted:
            yield fc1, fc1_part(*gate_up[e].chunk(2, dim=0))
            yield fc2, fc2_part(down[e])
        return
    for e, fc1, fc2 in wanted:
        yield fc1, fc1_part(hf[f"{x}{e}.gate_proj.weight"], hf[f"{x}{e}.up_proj.weight"])
        yield fc2, fc2_part(hf[f"{x}{e}.down_proj.weight"])


def rank_name(name: str, shape: Qwen3Shape, *, pp: int = 1, stage: int = 0, ep: int = 1, ep_rank: int = 0,
              split: StageSplit | None = None) -> str | None:  # fmt: skip
    """The name a Megatron parameter (named as in a one-stage, one-EP-rank model) has on pipeline stage `stage`'s
    expert-parallel rank `ep_rank`, or None when that rank holds none of it (`by_stage` then `by_expert`, for one
    name). A tied model's last stage (pp > 1) holds the embedding as its `output_layer.weight` (see `by_stage`)."""
    held_on, owner, local = home(name, shape, pp, ep, split)
    if held_on != stage:
        tied_copy = shape.tied and pp > 1 and stage == pp - 1 and name == "embedding.word_embeddings.weight"
        return "output_layer.weight" if tied_copy else None
    return local if owner in (-1, ep_rank) else None


_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def expert_home(name: str, shape: Qwen3Shape, ep: int) -> tuple[int, str] | None:
    """(the expert-parallel rank that holds it, its name there) of a Megatron expert parameter named by its
    global expert index; None for every other parameter (whole on every expert-parallel rank)."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    rank, local = divmod(int(match[2]), shape.experts // ep)
    return rank, f"{match[1]}{local}{match[3]}"


def by_expert(shard: Mapping[str, Tensor], shape: Qwen3Shape, ep: int) -> list[dict[str, Tensor]]:
    """One TP rank's state dict (global expert names) as each expert-parallel rank's: the other parameters on
    every rank, each expert on its rank only, under its local index."""
    shape.check_split(1, ep)
    out: list[dict[str, Tensor]] = [{} for _ in range(ep)]
    for name, tensor in shard.items():
        home = expert_home(name, shape, ep)
        if home is None:
            for part in out:
                part[name] = tensor
        else:
            out[home[0]][home[1]] = tensor
    return out


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def stage_home(name: str, shape: Qwen3Shape, pp: int, split: StageSplit | None = None) -> tuple[int, str]:
    """(the pipeline stage that holds it, its name there) of a Megatron parameter named as in a one-stage model:
    the embedding on the first stage, layer i on the stage s whose layers (`StageSplit.starts`, `layers`) hold it,
    as its layer i - start(s) (a stage's ModuleList counts from 0; only layer_number is global,
    transformer_layer.py:39), the final norm and output layer on the last."""
    match = _LAYER.match(name)
    if match is not None:
        split = split or StageSplit()
        layer, starts = int(match[1]), split.starts(shape.num_layers, pp)
        stage = max(s for s in range(pp) if starts[s] <= layer)
        return stage, f"decoder.layers.{layer - starts[stage]}.{match[2]}"
    return (0 if name.startswith("embedding.") else pp - 1), name


def home(name: str, shape: Qwen3Shape, pp: int, ep: int, split: StageSplit | None = None) -> tuple[int, int, str]:
    """(pipeline stage, expert-parallel rank inside it, name there) of a Megatron parameter named as in a one-rank
    model: its stage from `stage_home`, then, for an expert, its EP rank from `expert_home` on the stage's name
    (expert indices are per layer, so a stage keeps every expert of its layers); -1 for a parameter every EP rank
    of the stage holds."""
    stage, local = stage_home(name, shape, pp, split)
    expert = expert_home(local, shape, ep) if ep > 1 else None
    return (stage, -1, local) if expert is None else (stage, *expert)


def by_stage(shard: Mapping[str, Tensor], shape: Qwen3Shape, pp: int,
             split: StageSplit | None = None) -> list[dict[str, Tensor]]:  # fmt: skip
    """One TP rank's state dict (one-stage names) as each pipeline stage's. A tied model's last stage (pp > 1)
    holds a copy of the embedding as its `output_layer.weight`, as Megatron keeps one (language_module.py:187-
    237): the two copies' gradients are summed so they stay equal (layout.py)."""
    shape.check_split(1, 1, pp, split)
    out: list[dict[str, Tensor]] = [{} for _ in range(pp)]
    for stage, part in enumerate(out):
        for name, tensor in shard.items():
            local = rank_name(name, shape, pp=pp, stage=stage, split=split)
            if local is not None:  # the tied copy a tensor of its own, as the last stage's parameter is
                part[local] = tensor.clone() if local == "output_layer.weight" and shape.tied else tensor
    return out


def to_hf(shards: Sequence[Mapping[str, Tensor]], shape: Qwen3Shape) -> dict[str, Tensor]:
    """The Hugging Face state dict (in the order transformers lists it) from every tensor-parallel rank's
    Megatron parameters (rank order)."""
    return dict(iter_hf(lambda name: [s[name] for s in shards], shape))


def megatron_names(shape: Qwen3Shape) -> list[str]:
    """The Megatron parameter names a Qwen3 GPTModel of `shape` holds, in `to_hf`'s reading order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(shape.num_layers):
        m = _layer(i)[1]
        names += [m + "self_attention.linear_qkv.weight", *(m + mg for _, mg, _ in _plain(shape))]
        if shape.experts:
            names.append(m + "mlp.router.weight")
            for e in range(shape.experts):
                names += [m + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                          m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]  # fmt: skip
        else:
            names.append(m + "mlp.linear_fc1.weight")
    names.append("decoder.final_layernorm.weight")
    return names if shape.tied else [*names, "output_layer.weight"]


def iter_hf(shards_of: Callable[[str], Sequence[Tensor]], shape: Qwen3Shape,
            fused_experts: bool = True) -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    """(HF name, full tensor) pairs, reading each Megatron parameter's rank shards through `shards_of(name)`
    once, in `megatron_names` order (a sharded reader gathers there: every rank reads alike), in transformers'
    order; a tied embedding is read again for lm_head, so that no tensor stays held while the layers stream
    (a 151,936 x 4,096 embedding is 1.2 GB in bf16). `fused_experts` False: a MoE layer's experts in the on-disk
    form, one tensor an expert, never stacked (reshard.py: held experts beside meta stand-ins of the others)."""

    def full(name: str, dim: int | None) -> Tensor:
        parts = shards_of(name)
        return parts[0] if dim is None else torch.cat(list(parts), dim=dim)

    yield "model.embed_tokens.weight", full("embedding.word_embeddings.weight", 0)
    r, d = shape.num_heads // shape.num_groups, shape.head_dim
    for i in range(shape.num_layers):
        h, m = _layer(i)
        qkv = full(m + "self_attention.linear_qkv.weight", 0).view(shape.num_groups, (r + 2) * d, -1)
        q, k, v = torch.split(qkv, [r * d, d, d], dim=1)
        yield h + "self_attn.q_proj.weight", q.reshape(-1, shape.hidden).contiguous()
        yield h + "self_attn.k_proj.weight", k.reshape(-1, shape.hidden).contiguous()
        yield h + "self_attn.v_proj.weight", v.reshape(-1, shape.hidden).contiguous()
        plain = {mg: full(m + mg, dim) for _, mg, dim in _plain(shape)}
        yield h + "self_attn.o_proj.weight", plain["self_attention.linear_proj.weight"]
        yield h + "self_attn.q_norm.weight", plain["self_attention.q_layernorm.weight"]
        yield h + "self_attn.k_norm.weight", plain["self_attention.k_layernorm.weight"]
        if shape.experts:
            yield from _iter_hf_experts(full, shards_of, h, m, shape, fused_experts)
        else:
            fc1 = [part.chunk(2, dim=0) for part in shards_of(m + "mlp.linear_fc1.weight")]
            yield h + "mlp.gate_proj.weight", torch.cat([g for g, _ in fc1], dim=0)
            yield h + "mlp.up_proj.weight", torch.cat([u for _, u in fc1], dim=0)
            yield h + "mlp.down_proj.weight", plain["mlp.linear_fc2.weight"]
            del fc1
        yield h + "input_layernorm.weight", plain["input_layernorm.weight"]
        yield h + "post_attention_layernorm.weight", plain["pre_mlp_layernorm.weight"]
        del qkv, q, k, v, plain  # a streamed reader has had them: nothing of this layer stays held
    yield "model.norm.weight", full("decoder.final_layernorm.weight", None)
    yield "lm_head.weight", full("embedding.word_embeddings.weight" if shape.tied else "output_layer.weight", 0)


def _iter_hf_experts(
    full: Callable[[str, int | None], Tensor],
    shards_of: Callable[[str], Sequence[Tensor]],
    h: str,
    m: str,
    shape: Qwen3Shape,
    fused: bool = True,
) -> Iterator[tuple[str, Tensor]]:
    """One MoE layer's HF tensors (transformers' in-memory names and order; `fused` False: the on-disk form, one
    tensor an expert) from its Megatron experts (TP shards joined: fc1 each rank's gate rows then up rows, fc2 by
    columns) and router; each Megatron parameter read once, in `megatron_names` order."""
    router = full(m + "mlp.router.weight", None)
    fc1, fc2 = [], []
    for e in range(shape.experts):
        parts = [part.chunk(2, dim=0) for part in shards_of(m + f"mlp.experts.local_experts.{e}.linear_fc1.weight")]
        down = full(m + f"mlp.experts.local_experts.{e}.linear_fc2.weight", 1)
        if not fused:
            gate, up = torch.cat([g for g, _ in parts], dim=0), torch.cat([u for _, u in parts], dim=0)
            yield from ((f"{h}mlp.experts.{e}.{kind}_proj.weight", t) for kind, t in
                        (("gate", gate), ("up", up), ("down", down)))  # fmt: skip
            continue
        fc1.append(torch.cat([g for g, _ in parts] + [u for _, u in parts], dim=0))
        fc2.append(down)
    if fused:
        yield h + "mlp.experts.gate_up_proj", torch.stack(fc1)
        yield h + "mlp.experts.down_proj", torch.stack(fc2)
    yield h + "mlp.gate.weight", router
