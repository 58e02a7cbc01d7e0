"""One quantization of a Hugging Face model's linear layers, for the rollout engine and the trainer alike.

    for_inference(model, scheme) -> QuantizedWeights    the engine: weights held quantized, no full copy
    for_training(model, scheme)                         the trainer: master weights, quantized in each forward

Schemes (kernels/): "fp8" quantizes weights (128x128 blocks) and activations (1x128 tiles) to e4m3 and
multiplies them (`kernels.fp8`); "int4" quantizes weights only, per group of 128, and multiplies the
dequantized weight by unquantized activations (W4A16, `kernels.int4`). What is quantized: every nn.Linear
except the output layer, and Qwen3-MoE's experts (`Qwen3MoeExperts`: 3-D gate_up_proj / down_proj, each
expert's matrix on its own). What is not: the embeddings, the output layer (lm_head), norms, rotary tables
and the MoE routers, which keep their dtype.

Both sides run the same functions on the same values, so they compute the same thing: the engine quantizes
the weight it holds in its dtype (`rollout.dtype`) once, on load and on each update; the trainer quantizes
its master weight cast to its compute dtype (`trainer.dtype`), every forward. With the two dtypes equal (and
the trainer publishing in that dtype, as it does), the quantized weights are bit-identical. Activations are
quantized from the values each side has; the trainer's backward is straight-through (`kernels.fp8`,
`kernels.int4`).

Weights keep their Hugging Face names: an engine's FP8 layer holds `x.weight` as e4m3 [N, K] with
`x.weight_scale` beside it; an INT4 one `x.weight` as packed uint8 [N, K/2] and `x.weight_scale` [N, K/128].
`QuantizedWeights.encode` turns a published full-precision tensor into those buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miles_stream.errors import ConfigError, MilesStreamError
from miles_stream.kernels.fp8 import fp8_linear, fp8_linear_ste, quantize_weight
from miles_stream.kernels.int4 import fake_quantize_int4, int4_linear, quantize_int4

Scheme = Literal["fp8", "int4"]
EXPERTS = frozenset({"Qwen3MoeExperts"})  # whose forward QuantExperts reproduces (transformers 5.25)
ENCODERS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {"fp8": quantize_weight, "int4": quantize_int4}


def _compute_dtype(x: Tensor) -> torch.dtype:
    """What a linear layer computes in: autocast's dtype where autocast is on, else its input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def quantized_linear(scheme: str, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The engine's product of x and a weight held quantized, in x's dtype."""
    return fp8_linear(x, q, scale) if scheme == "fp8" else int4_linear(x, q, scale)


def training_linear(scheme: str, x: Tensor, w: Tensor) -> Tensor:
    """The trainer's product of x and the master weight w, quantized as the engine quantizes them."""
    dtype = _compute_dtype(x)
    if scheme == "fp8":
        return fp8_linear_ste(x, w, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), fake_quantize_int4(w.to(dtype)))


class QuantLinear(nn.Module):
    """The engine's linear layer: weight and scale as buffers, no full-precision copy."""

    weight: Tensor
    weight_scale: Tensor

    def __init__(self, linear: nn.Linear, scheme: Scheme) -> None:
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, linear.in_features, linear.out_features
        q, scale = ENCODERS[scheme](linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        out = quantized_linear(self.scheme, x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class FakeQuantLinear(nn.Linear):
    """The trainer's linear layer: the same parameters as the nn.Linear it replaces, quantized in forward."""

    def __init__(self, linear: nn.Linear, scheme: Scheme) -> None:
        nn.Module.__init__(self)
        self.scheme, self.in_features, self.out_features = scheme, linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        out = training_linear(self.scheme, x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class QuantExperts(nn.Module):
    """Qwen3-MoE's experts with every expert's two matmuls quantized (engine: buffers; trainer: the original
    parameters). The routing arithmetic is Qwen3MoeExperts.forward's (transformers 5.25,
    models/qwen3_moe/modeling_qwen3_moe.py:223-247): for each expert in index order, its tokens through
    act(gate) * up, then down, times the token's routing weight, added into the output."""

    def __init__(self, experts: Any, scheme: Scheme, *, train: bool) -> None:
        super().__init__()
        self.scheme, self.train_mode = scheme, train
        self.num_experts = int(experts.num_experts)
        self.act: Callable[[Tensor], Tensor] = experts.act_fn
        for name in ("gate_up_proj", "down_proj"):
            param: nn.Parameter = getattr(experts, name)
            if train:
                setattr(self, name, param)
            else:
                q, scale = ENCODERS[scheme](param.detach())
                self.register_buffer(name, q)
                self.register_buffer(f"{name}_scale", scale)

    def _linear(self, x: Tensor, name: str, expert: int) -> Tensor:
        if self.train_mode:
            return training_linear(self.scheme, x, getattr(self, name)[expert])
        q: Tensor = getattr(self, name)[expert]
        return quantized_linear(self.scheme, x, q, getattr(self, f"{name}_scale")[expert])

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # transformers' slot for a token no local expert takes
                continue
            token, slot = torch.where(top_k_index == expert)
            gate, up = self._linear(hidden[token], "gate_up_proj", expert).chunk(2, dim=-1)
            y = self._linear(self.act(gate) * up, "down_proj", expert)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class QuantizedWeights:
    """What an engine needs to take published full-precision weights into its quantized layers."""

    def __init__(self, scheme: Scheme, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
        self.scheme, self.shapes, self.dtype = scheme, shapes, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def encode(self, name: str, tensor: Tensor) -> dict[str, Tensor]:
        """{name: quantized, name + "_scale": scale} of a published tensor, quantized from its value in the
        engine's dtype (where the trainer quantizes from its compute dtype's)."""
        if tuple(tensor.shape) != self.shapes[name]:
            want, got = self.shapes[name], tuple(tensor.shape)
            raise MilesStreamError(f"weight update {name!r} has shape {got}, the model {want}")
        q, scale = ENCODERS[self.scheme](tensor.to(self.dtype))
        return {name: q, f"{name}_scale": scale}


def _targets(model: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every layer to quantize; refuses an experts module of a kind not built."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            out.append((name, module))
        elif type(module).__name__.endswith("Experts"):
            if type(module).__name__ not in EXPERTS:
                raise ConfigError(f"precision fp8/int4: experts of {type(module).__name__} are not supported "
                                  f"(built for {', '.join(sorted(EXPERTS))})")  # fmt: skip
            out.append((name, module))
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _check(scheme: str, name: str, module: Any) -> None:
    width = module.in_features if isinstance(module, nn.Linear) else int(module.gate_up_proj.shape[-1])
    if scheme not in ENCODERS:
        raise ConfigError(f"precision {scheme!r} is not a quantization scheme (fp8, int4)")
    if scheme == "int4" and width % 2:
        raise ConfigError(f"precision int4 packs two weights a byte: {name} has an odd input width {width}")


def for_inference(model: nn.Module, scheme: Scheme) -> QuantizedWeights:
    """Swap `model`'s layers for engine-side quantized ones, in place (weights quantized from their current
    values and dtype); returns how to quantize published tensors into them."""
    dtype = next(model.parameters()).dtype
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in _targets(model):
        _check(scheme, name, module)
        if isinstance(module, nn.Linear):
            shapes[f"{name}.weight"] = tuple(module.weight.shape)
            _replace(model, name, QuantLinear(module, scheme))
        else:
            for p in ("gate_up_proj", "down_proj"):
                shapes[f"{name}.{p}"] = tuple(getattr(module, p).shape)
            _replace(model, name, QuantExperts(module, scheme, train=False))
    return QuantizedWeights(scheme, shapes, dtype)


def for_training(model: nn.Module, scheme: Scheme) -> int:
    """Swap `model`'s layers for trainer-side fake-quantized ones that keep the same parameters (names, objects,
    values: the optimizer, checkpoints and publication see no change); returns how many were swapped."""
    targets = _targets(model)
    for name, module in targets:
        _check(scheme, name, module)
        new: Any = FakeQuantLinear(module, scheme) if isinstance(module, nn.Linear) else None
        _replace(model, name, new or QuantExperts(module, scheme, train=True))
    return len(targets)
