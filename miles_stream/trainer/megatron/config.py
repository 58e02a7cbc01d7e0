"""trainer.megatron: the Megatron-core backend's parallel sizes (no torch or Megatron here: the run config loads
without them). Read only when trainer.backend is megatron."""

from __future__ import annotations

from dataclasses import dataclass

from miles_stream.config import check


@dataclass(frozen=True, slots=True, kw_only=True)
class MegatronConfig:
    """Tensor, pipeline, expert and context parallel sizes (docs/parallelism.md)."""

    tensor_parallel: int = 1  # ranks one model's layers are split over (heads, MLP columns, vocabulary)
    pipeline_parallel: int = 1  # stages one model's layers are cut into (Qwen3 and Qwen3-MoE; pipeline.py)
    expert_parallel: int = 1  # ranks an MoE layer's experts are split over (within the data-parallel ranks)
    context_parallel: int = 1  # ranks each sequence is split over (context.py)

    def __post_init__(self) -> None:
        check(self.tensor_parallel >= 1, "trainer.megatron.tensor_parallel", "must be >= 1")
        check(self.pipeline_parallel >= 1, "trainer.megatron.pipeline_parallel", "must be >= 1")
        check(self.expert_parallel >= 1, "trainer.megatron.expert_parallel", "must be >= 1")
        check(self.context_parallel >= 1, "trainer.megatron.context_parallel", "must be >= 1")
