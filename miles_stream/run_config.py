"""The run's config: one section per component, each the component's own dataclass.

YAML files in `configs/` fill these; `--config FILE` plus dotted overrides (`bus.max_backlog_entries=64`)
on the command line. An unknown key or a bad value is a `ConfigError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from miles_stream.buffer.config import BufferConfig
from miles_stream.bus.connection import RedisConfig
from miles_stream.bus.keys import one_slot
from miles_stream.bus.streams import BusConfig
from miles_stream.codec import CodecConfig
from miles_stream.config import apply_overrides, build, check, load_yaml
from miles_stream.evaluation.config import EvalConfig
from miles_stream.feeder import FeederConfig
from miles_stream.metrics_http import MetricsConfig
from miles_stream.redis_server import EmbeddedRedisConfig
from miles_stream.rollout.config import RolloutConfig
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.config import SftConfig, TrainerConfig
from miles_stream.wandb_log import WandbConfig
from miles_stream.weights.group import WeightsGroupConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    redis: RedisConfig = field(default_factory=RedisConfig)
    redis_server: EmbeddedRedisConfig = field(default_factory=EmbeddedRedisConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    feeder: FeederConfig = field(default_factory=FeederConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SftConfig = field(default_factory=SftConfig)  # `train --sft` only
    weights_group: WeightsGroupConfig = field(default_factory=WeightsGroupConfig)  # the broadcast transport
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # this process's Prometheus endpoint
    eval: EvalConfig = field(default_factory=EvalConfig)  # `miles-stream eval` (docs/evaluation.md)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # the trainer's optional W&B run

    def __post_init__(self) -> None:
        ns = self.bus.namespace
        check(not self.redis.cluster or one_slot(ns), "bus.namespace",
              f"on a Redis Cluster a run's keys must share one slot: write the namespace as a hash tag, "
              f"{{{ns}}} (docs/redis.md, 'A Redis Cluster')")  # fmt: skip
        if self.redis.cluster and not self.redis.slot_of:  # the control client goes to the run's slot
            object.__setattr__(self, "redis", replace(self.redis, slot_of=ns))

    @property
    def trainer_temperature(self) -> float:
        """The temperature the trainer divides logits by: its own if set, else the rollout's (1 for greedy)."""
        return self.trainer.temperature or self.rollout.sampling.temperature or 1.0


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    data = load_yaml(path) if path else {}
    return build(RunConfig, apply_overrides(data, overrides))
