"""Hugging Face checkpoints in and out: the policy loads from a local directory and exports back to one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

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

    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(tmp)
    old = dest.with_name(f"{dest.name}.old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
