"""Tiny checkpoints are real Hugging Face checkpoints, built here, loadable offline, deterministic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model, build_tokenizer


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("moe"), TinyModelConfig(kind="moe", num_experts=8, experts_per_token=2)
    )


def test_tokenizer_is_character_level_with_fixed_special_ids() -> None:
    tok = build_tokenizer("0123456789+=")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("12+34=46")["input_ids"]
    assert len(ids) == 8 and tok.decode(ids) == "12+34=46"
    assert tok("7x")["input_ids"] == [tok.convert_tokens_to_ids("7"), tok.unk_token_id]


@pytest.mark.parametrize("kind,model_type", [("dense", "qwen3"), ("moe", "qwen3_moe")])
def test_checkpoint_loads_back_through_auto_classes(tmp_path: Path, kind: str, model_type: str) -> None:
    path = build_tiny_model(tmp_path, TinyModelConfig(kind=kind))  # type: ignore[arg-type]
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    assert (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("1+1=2")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, 5, len(tok)) and torch.isfinite(logits).all()
    assert tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False) == "1+1="


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    def digest(seed: int, name: str) -> str:
        path = build_tiny_model(tmp_path / name, TinyModelConfig(seed=seed))
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    assert digest(0, "a") == digest(0, "b") != digest(1, "c")


def test_moe_routing_depends_on_the_token(moe_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    chosen: list[torch.Tensor] = []
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    assert len(gates) == 2
    handles = [g.register_forward_hook(lambda mod, inp, out: chosen.append(out[2])) for g in gates]
    tok = AutoTokenizer.from_pretrained(moe_dir)
    model(torch.tensor([tok("0123456789+=()")["input_ids"]]))
    for h in handles:
        h.remove()
    for experts in chosen:  # [tokens, top-k] per layer
        assert experts.shape == (14, 2)
        assert len({tuple(sorted(row.tolist())) for row in experts}) > 1


def test_bad_tiny_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.num_kv_heads"):
        TinyModelConfig(num_heads=4, num_kv_heads=3)
