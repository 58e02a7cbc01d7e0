"""trainer.backend -> the backend that trains: the one place a config name meets a backend's code."""

from __future__ import annotations

from miles_stream.trainer.algo import Objective
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backend import TrainerBackend
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.build import build_trainer


def build_backend(cfg: TrainerConfig, algo: AlgoConfig, *, temperature: float, parallel: DataParallel,
                  objective: Objective | None = None) -> TrainerBackend:  # fmt: skip
    """The backend `cfg.backend` names (TrainerConfig validates the name). Megatron-core is an optional extra
    (`pip install miles-stream[megatron]`): its package is imported only when it is asked for."""
    if cfg.backend == "megatron":
        from miles_stream.trainer.megatron.build import build_megatron_trainer

        return build_megatron_trainer(cfg, algo, temperature=temperature, parallel=parallel, objective=objective)
    return build_trainer(cfg, algo, temperature=temperature, parallel=parallel, objective=objective)
