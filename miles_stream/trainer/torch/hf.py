"""Hugging Face checkpoints in and out: the policy loads from a local directory and exports back to one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from miles_stream.errors import ConfigError


def load_causal_lm(path: str, *, dtype: str, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    if not Path(path, "config.json").is_file():
        raise ConfigError(f"model directory {path!r} holds no config.json (a local Hugging Face checkpoint)")
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device)


def export_hf(model: Any, source: str | Path, dest: Path) -> None:
    """Save `model` as a Hugging Face checkpoint in `dest`, with the tokenizer of `source`; written beside
    `dest` and renamed into place, so `dest` is never half-written."""
    from transformers import AutoTokenizer

    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(tmp)
    old = dest.with_name(f"{dest.name}.old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
