"""Hugging Face checkpoints in and out: the policy loads from a local directory and exports back to one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from miles_stream.errors import ConfigError


def load_causal_lm(path: str, *, dtype: str, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    if not Path(path, "config.json").is_file():
        raise ConfigError(f"model directory {path!r} holds no config.json (a local Hugging Face checkpoint)")
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (modules whose class ends in "DecoderLayer")."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def export_hf(model: Any, source: str | Path, dest: Path, *, state_dict: dict[str, Any] | None = None) -> None:
    """Save `model` (or `state_dict` under its config: a sharded model's gathered tensors) as a Hugging Face
    checkpoint in `dest`, with the tokenizer of `source`; written beside `dest` and renamed into place, so
    `dest` is never half-written."""
    from transformers import AutoTokenizer

    tmp = _beside(dest)
    model.save_pretrained(tmp, state_dict=state_dict)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(tmp)
    _swap_into(tmp, Path(dest))


def export_streamed(skeleton: Any, source: str | Path, dest: Path, tensors: Iterable[tuple[str, Tensor]], *,
                    write: bool, shard_bytes: int = 5 * 2**30) -> None:  # fmt: skip
    """A Hugging Face checkpoint in `dest` from (name, tensor) pairs that arrive one at a time (a sharded model's,
    gathered as they are read: every rank must read them all, `write` on one): each tensor turned into its
    on-disk names as save_pretrained turns it (transformers' `revert_weight_conversion`: a Qwen3-MoE layer's fused
    experts into one tensor an expert), copied to host memory and written into shards of at most `shard_bytes`
    (`model.safetensors`, or `model-0000k-of-0000n.safetensors` with their index), beside the config of
    `skeleton` (a model on the meta device) and the tokenizer of `source`. A tied output layer is the embedding
    under a second name: not written, as save_pretrained leaves it out. The writing rank holds one shard at a
    time, not the model (a 235B model is 470 GB in bf16)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from transformers.core_model_loading import revert_weight_conversion

    if not write:
        for _ in tensors:  # the others' gathers need this rank's part
            pass
        return
    tmp = _beside(dest)
    tmp.mkdir(parents=True)
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    shards: list[list[str]] = []  # the names each written shard holds
    shard: dict[str, Tensor] = {}
    held = 0

    def flush() -> None:
        save_file(shard, str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        if tied and name == "lm_head.weight":
            continue
        for disk_name, part in revert_weight_conversion(skeleton, {name: tensor}).items():
            part = part.detach().to("cpu", copy=True).contiguous()  # its own storage: safetensors refuses views
            if shard and held + part.nbytes > shard_bytes:
                flush()
                held = 0
            shard[disk_name] = part
            held += part.nbytes
    flush()
    n = len(shards)
    finals = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for k, final in enumerate(finals):
        (tmp / f"part-{k}.safetensors").rename(tmp / final)
    if n > 1:
        weight_map = {key: final for final, keys in zip(finals, shards, strict=True) for key in keys}
        total = sum((tmp / final).stat().st_size for final in finals)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    skeleton.config.save_pretrained(tmp)
    if getattr(skeleton, "generation_config", None) is not None:
        skeleton.generation_config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(tmp)
    _swap_into(tmp, Path(dest))


def _beside(dest: Path) -> Path:
    tmp = Path(dest).with_name(f"{Path(dest).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _swap_into(tmp: Path, dest: Path) -> None:
    """`tmp` renamed to `dest`, the old `dest` (if any) out of the way first and removed after."""
    old = dest.with_name(f"{dest.name}.old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
