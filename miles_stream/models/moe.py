"""Finding the MoE routers of a Hugging Face model: the `...mlp.gate` modules with a `top_k` (Qwen3-MoE,
Mixtral), in layer order. The native engine records their choices, the trainer replays them (R3), and the
SGLang client picks the MoE layers out of a full-depth routing trace by their layer index."""

from __future__ import annotations

from torch import nn


def named_moe_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The routers in layer order (empty for a dense model)."""
    return [m for _, m in named_moe_routers(model)]


def moe_layer_indices(model: nn.Module) -> list[int]:
    """The decoder-layer index of each router (`model.layers.{i}.mlp.gate`)."""
    return [int(name.split(".")[-3]) for name, _ in named_moe_routers(model)]
