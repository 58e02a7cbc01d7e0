"""`RolloutConfig`: the producer's settings, the `rollout` section (no torch here, so configs load fast)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

from miles_stream.config import check
from miles_stream.engines.base import SamplingParams
from miles_stream.engines.sglang.config import SGLangConfig
from miles_stream.engines.vllm.config import VLLMConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutConfig:
    model: str = ""  # a local Hugging Face model directory (its tokenizer and config; the native engine's weights)
    engine: Literal["native", "sglang", "vllm"] = "native"  # sglang / vllm: the servers of rollout.sglang / .vllm
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # engines/vllm/engine.py, docs/vllm.md
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # the native engine's linear layers and MoE experts: "dtype" unquantized in `dtype`; "fp8" blockwise e4m3
    # weights and activations; "int4" packed INT4 weights (W4A16). Same quantizer as trainer.precision /
    # trainer.qat (models/quantized.py, docs/precision.md)
    precision: Literal["dtype", "fp8", "int4"] = "dtype"
    max_batch: int = 32
    kv_cache: Literal["auto", "static", "dynamic"] = "auto"  # auto: static + CUDA graphs on CUDA for dense models
    max_seq_len: int = 2048  # static cache: prompt + response positions per row (memory: rows x this)
    cuda_graphs: bool = True
    compile_decode: bool = True  # torch.compile the decode step's elementwise work (static cache on CUDA)
    n_samples_per_prompt: int = 4
    sampling: SamplingParams = field(default_factory=SamplingParams)
    turns: Literal["single", "calculator"] = "single"  # calculator: the multi-turn tool example (turns.py)
    max_turns: int = 4
    reward: str = "toy_addition"
    reward_timeout_s: float = 30.0
    max_inflight_prompts: int = 8
    on_update: Literal["continue", "recycle"] = "continue"  # samples in flight at a weight update
    over_sampling: float = 1.0  # admit this many times the staleness budget (admission.py)
    producer_id: str = ""  # empty: host-pid
    weights_rank: int = 0  # > 0: this producer's rank in the trainer's weight-broadcast group (weights_group)
    seed: int = 0
    torch_threads: int = 0  # intra-op threads of the engine; 0 = torch's default (all cores). With several
    # processes on one machine, 1 each avoids oversubscription (docs/benchmarks.md, attaching producers)

    def __post_init__(self) -> None:
        check(self.torch_threads >= 0, "rollout.torch_threads", "must be >= 0 (0 = torch's default)")
        check(self.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt", "must be >= 1")
        check(self.max_inflight_prompts >= 1, "rollout.max_inflight_prompts", "must be >= 1")
        check(self.reward_timeout_s > 0, "rollout.reward_timeout_s", "must be positive")
        check(self.max_turns >= 1, "rollout.max_turns", "must be >= 1")
        check(self.max_seq_len >= 2, "rollout.max_seq_len", "must be >= 2")
        check(self.over_sampling >= 1.0, "rollout.over_sampling", "must be >= 1 (1 = the staleness budget)")
        check(self.engine != "sglang" or bool(self.sglang.urls or self.sglang.router_url), "rollout.sglang.urls",
              "the sglang engine needs at least one server URL")  # fmt: skip
        check(self.precision == "dtype" or self.engine == "native", "rollout.precision",
              f"{self.precision} is built for the native engine only (SGLang's and vLLM's own FP8 are not wired "
              "here): use rollout.engine native or rollout.precision dtype")  # fmt: skip
        check(self.engine != "vllm" or bool(self.vllm.urls), "rollout.vllm.urls", "the vllm engine needs a server URL")

    def resolved_producer_id(self) -> str:
        return self.producer_id or f"{socket.gethostname()}-{os.getpid()}"
