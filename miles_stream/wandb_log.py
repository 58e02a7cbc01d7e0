"""Weights & Biases as an optional logger next to TensorBoard (`pip install 'miles-stream[wandb]'`; off by default).

One W&B run per trainer: its id is `{namespace}-{run id}` (the run identity of bus/run.py), opened with
`resume="allow"`, so a trainer restarted with --resume continues the same W&B run. Only the trainer writes to it:
evaluation results reach it over `{ns}:eval` and producers' summaries over their heartbeats
(`evaluation/follow.py`), so one run holds training, eval and producer curves without several processes
writing one run. `wandb.mode: offline` (the default) writes under `wandb.dir` for `wandb sync` later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from miles_stream.errors import ConfigError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class WandbConfig:
    enabled: bool = False
    project: str = "miles-stream"
    entity: str = ""  # empty: the account's default
    mode: Literal["offline", "online"] = "offline"
    dir: str = ""  # where the run's files go (empty: wandb's default, ./wandb)
    name: str = ""  # the run's display name (empty: the namespace)
    run_id: str = ""  # empty: {namespace}-{run identity}; set it to log into a run of your choosing

    def __post_init__(self) -> None:
        if self.enabled and not self.project:
            raise ConfigError("wandb.project is empty: name the W&B project to log into")


class WandbRun:
    """One W&B run, or nothing when `config.enabled` is false; `close()` is idempotent."""

    def __init__(self, config: WandbConfig, *, run_id: str, name: str, settings: Mapping[str, Any]) -> None:
        self.run: Any = None
        if not config.enabled:
            return
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError("wandb.enabled: the wandb package is not installed (pip install "
                              "'miles-stream[wandb]')") from exc  # fmt: skip
        self.run = wandb.init(project=config.project, entity=config.entity or None, mode=config.mode,
                              dir=config.dir or None, id=config.run_id or run_id, name=config.name or name,
                              resume="allow", config=dict(settings), job_type="trainer")  # fmt: skip
        log.info("wandb_run", id=self.run.id, mode=config.mode, dir=config.dir or "./wandb")

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish()
