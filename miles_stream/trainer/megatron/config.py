"""trainer.megatron: the Megatron-core backend's parallel sizes (no torch or Megatron here: the run config loads
without them). Read only when trainer.backend is megatron."""

from __future__ import annotations

from dataclasses import dataclass

from miles_stream.config import check


@dataclass(frozen=True, slots=True, kw_only=True)
class MegatronConfig:
    """Tensor, pipeline, expert and context parallel sizes, sequence parallel, the pipeline split and the
    distributed optimizer (docs/parallelism.md)."""

    tensor_parallel: int = 1  # ranks one model's layers are split over (heads, MLP columns, vocabulary)
    pipeline_parallel: int = 1  # stages one model's layers are cut into (Qwen3 and Qwen3-MoE; pipeline.py)
    expert_parallel: int = 1  # ranks an MoE layer's experts are split over (within the data-parallel ranks)
    context_parallel: int = 1  # ranks each sequence is split over (context.py)
    # sequence parallel (sequence.py): with tensor_parallel > 1, the norms, residual stream and MoE routers hold
    # 1/tp of each row's positions (activations / tp outside the split matmuls; the TP all-reduces become
    # all-gathers and reduce-scatters). Off unless set: Qwen3-MoE with tensor_parallel > 1 requires it (Megatron's
    # MoE layer does) and is refused without it, naming this key, rather than switched on behind the config's back
    sequence_parallel: bool = False
    # uneven stages (Megatron's num_layers_in_first/last_pipeline_stage): the first / last stage's layer count,
    # the middle stages share the rest evenly (convert.StageSplit; None: every stage num_layers / pipeline_parallel)
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    # AdamW's moments split over the ranks that hold the same parameters (ZeRO-1, zero.py): 16 B a parameter
    # becomes 8 + 8/N
    distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        check(self.tensor_parallel >= 1, "trainer.megatron.tensor_parallel", "must be >= 1")
        check(self.pipeline_parallel >= 1, "trainer.megatron.pipeline_parallel", "must be >= 1")
        check(self.expert_parallel >= 1, "trainer.megatron.expert_parallel", "must be >= 1")
        check(self.context_parallel >= 1, "trainer.megatron.context_parallel", "must be >= 1")
        for key, n in (("first_stage_layers", self.first_stage_layers), ("last_stage_layers", self.last_stage_layers)):
            if n is None:
                continue
            check(n >= 1, f"trainer.megatron.{key}", f"must be >= 1 (it is {n})")
            check(self.pipeline_parallel > 1, f"trainer.megatron.{key}", "sets a pipeline stage's layers: only with "
                  f"pipeline_parallel > 1 (it is {self.pipeline_parallel})")  # fmt: skip
        if self.sequence_parallel:
            check(self.tensor_parallel > 1, "trainer.megatron.sequence_parallel", "splits each row over the "
                  f"tensor-parallel ranks: only with tensor_parallel > 1 (it is {self.tensor_parallel})")  # fmt: skip
            check(self.context_parallel == 1, "trainer.megatron.sequence_parallel", "is not built with "
                  f"context_parallel > 1 (it is {self.context_parallel}): set sequence_parallel false or "
                  "context_parallel 1")  # fmt: skip
        # whether the middle stages get a whole number of layers each needs the model's num_hidden_layers: checked
        # when the model is built (convert.StageSplit.layers, from Qwen3Shape.check_split)
