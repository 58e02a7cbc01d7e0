"""Tiny random-initialised Hugging Face checkpoints, dense and MoE, with a character-level tokenizer built
locally. For tests, benchmarks and the demo: nothing is downloaded from a model hub.

`build_tiny_model(path, TinyModelConfig(kind="moe"))` writes config.json, model.safetensors and the tokenizer
files into `path`; `transformers.AutoModelForCausalLM.from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)` load them back. Dense models are Qwen3, MoE models Qwen3-MoE (their
routers' top-k choices are what rollout routing traces record).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from miles_stream.config import check

DEFAULT_CHARSET = "0123456789+-*=()., ?abcdefghijklmnopqrstuvwxyz"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}{% endif %}"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TinyModelConfig:
    kind: Literal["dense", "moe"] = "dense"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    num_experts: int = 8
    experts_per_token: int = 2
    max_position: int = 256
    charset: str = DEFAULT_CHARSET
    init_std: float = 0.02
    seed: int = 0
    tie_embeddings: bool = True  # False: an output head of its own (vLLM reloads a tied head wrongly: docs/vllm.md)

    def __post_init__(self) -> None:
        check(self.kind in ("dense", "moe"), "model.kind", "allowed: dense, moe")
        check(self.hidden_size % self.num_heads == 0, "model.hidden_size", "must be a multiple of num_heads")
        check(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", "must divide num_heads")
        check(1 <= self.experts_per_token <= self.num_experts, "model.experts_per_token", "must be in [1, num_experts]")
        check(len(set(self.charset)) == len(self.charset) > 0, "model.charset", "must be non-empty, no repeats")
        check(not any(c.isspace() and c != " " for c in self.charset), "model.charset", "only ' ' as whitespace")


def build_tokenizer(charset: str = DEFAULT_CHARSET) -> Any:
    """A character-level `PreTrainedTokenizerFast`: ids 0-3 are <pad> <s> </s> <unk>, then one id a character."""
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in charset:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(path: str | Path, config: TinyModelConfig | None = None) -> Path:
    """Write a random-initialised checkpoint and its tokenizer to `path`; the same seed gives the same bytes."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = config or TinyModelConfig()
    path = Path(path)
    tokenizer = build_tokenizer(config.charset)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.hidden_size // config.num_heads,
        "max_position_embeddings": config.max_position,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(config.seed)
    model: Any
    if config.kind == "moe":
        hf_config = Qwen3MoeConfig(
            **common,
            intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.intermediate_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.experts_per_token,
            norm_topk_prob=True,
        )
        model = Qwen3MoeForCausalLM(hf_config)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, intermediate_size=config.intermediate_size))
    _randomise_zero_parameters(model, config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "miles_tiny.json").write_text(_describe(config))
    return path


def _randomise_zero_parameters(model: Any, config: TinyModelConfig) -> None:
    """Routers start at zero in transformers (every expert ties); give them, and any other all-zero matrix,
    small random values so that routing depends on the token."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * config.init_std)


def _describe(config: TinyModelConfig) -> str:
    import json

    return json.dumps(dataclasses.asdict(config), indent=2) + "\n"
