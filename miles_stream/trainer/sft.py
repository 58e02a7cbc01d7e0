"""`miles-stream train --sft DATA`: supervised fine-tuning on given answers, the warm start before RL.

    DATA (.jsonl | .parquet: prompt, response) ─► tokenize (prompt as the producer does; response + EOS)
        ─► per epoch a permutation fixed by (trainer.seed, epoch) ─► batches of sft.batch_size
        ─► TrainerBackend.train with SftObjective (mean NLL of the response tokens)
        ─► metrics.jsonl / TensorBoard, checkpoints every trainer.checkpoint_every steps, HF export at the end

No Redis: the data is a file. The model, optimizer, schedule, micro-batching, data parallelism (torchrun),
checkpoints (`--resume`) and export are the RL trainer's own, so the SFT model is what `train` then loads as
trainer.model and what the producer serves as rollout.model. Step s of the run reads rows
[k * batch_size, (k + 1) * batch_size) of epoch s // steps_per_epoch's order (k = s % steps_per_epoch): a
resumed run continues with exactly the examples it would have seen.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from miles_stream.config import check_model_dir
from miles_stream.errors import ConfigError
from miles_stream.feeder import Row, read_records, with_chat_template
from miles_stream.trainer.algo import SftObjective
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backend import TrainerBackend
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.batch import RolloutBatch, supervised
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint_ranks
from miles_stream.trainer.config import SftConfig, TrainerConfig
from miles_stream.trainer.metrics import MetricsSink
from miles_stream.trainer.parallel import DataParallel

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Examples:
    prompts: list[np.ndarray]
    responses: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)


def load_examples(cfg: SftConfig, model: str) -> Examples:
    """Every record of sft.path, tokenized with `model`'s tokenizer (trainer.model). A record without a prompt
    or a response string, or with an empty response, is a `ConfigError` naming its place."""
    from transformers import AutoTokenizer

    path = Path(cfg.path)
    if not cfg.path or not path.is_file():
        raise ConfigError(f"sft.path: {cfg.path!r} is not a file (train --sft DATA.jsonl)")
    rows = []
    for at, record in read_records(path):
        for key in (cfg.prompt_key, cfg.response_key):
            if not isinstance(record.get(key), str):
                raise ConfigError(f"{at}: {key!r} must be a string (fields: {sorted(record)})")
        if not record[cfg.response_key]:
            raise ConfigError(f"{at}: {cfg.response_key!r} is empty: nothing to learn")
        rows.append(Row(record[cfg.prompt_key], record[cfg.response_key]))
    if not rows:
        raise ConfigError(f"sft.path: {path} holds no records")
    if cfg.apply_chat_template:
        rows = with_chat_template(rows, model)
    tokenizer: Any = AutoTokenizer.from_pretrained(model)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompts = tokenizer([r.text for r in rows])["input_ids"]  # as the producer tokenizes a prompt
    responses = tokenizer([r.label for r in rows], add_special_tokens=False)["input_ids"]
    return Examples(
        prompts=[np.asarray(p, np.int32) for p in prompts],
        responses=[np.asarray([*r, *eos], np.int32) for r in responses],
    )


def batch_rows(cfg: SftConfig, seed: int, size: int, step: int, parallel: DataParallel) -> list[int]:
    """This rank's rows of step `step` (see the module docstring); `seed`: trainer.seed."""
    per_epoch = math.ceil(size / cfg.batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(size)
    rows = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
    return [int(i) for i in rows[parallel.rank :: parallel.world]]


def total_steps(cfg: SftConfig, max_steps: int, size: int) -> int:
    """Steps of `cfg.num_epochs` epochs over `size` examples, at most `max_steps` (trainer.max_steps; 0: no cap)."""
    steps = cfg.num_epochs * math.ceil(size / cfg.batch_size)
    return min(steps, max_steps) if max_steps else steps


def build_sft_trainer(cfg: TrainerConfig, algo: AlgoConfig, parallel: DataParallel) -> TrainerBackend:
    """The RL trainer's backend with the SFT objective: no reference, teacher or critic."""
    algo = replace(algo, kl_loss_coef=0.0, kl_coef=0.0, entropy_coef=0.0, use_opd=False, advantage_estimator="grpo")
    objective = SftObjective(token_mean=algo.loss_reduction == "token_mean")
    return build_backend(cfg, algo, temperature=1.0, parallel=parallel, objective=objective)


def main(sft: SftConfig, cfg: TrainerConfig, algo: AlgoConfig, *, resume: bool = False) -> int:
    check_model_dir(cfg.model, "trainer.model")
    examples = load_examples(sft, cfg.model)
    parallel = DataParallel.from_env(cfg.device)
    try:
        trainer = build_sft_trainer(cfg, algo, parallel)
        return _train(sft, cfg, trainer, examples, resume)
    finally:
        parallel.close()


def _train(sft: SftConfig, cfg: TrainerConfig, trainer: TrainerBackend, examples: Examples, resume: bool) -> int:
    parallel = trainer.parallel
    run_id = f"sft:{Path(sft.path).resolve()}"
    step = _restore(cfg, trainer, run_id) if resume else 0
    steps = total_steps(sft, cfg.max_steps, len(examples))
    metrics = MetricsSink(cfg.metrics_path, cfg.tensorboard_dir) if parallel.is_main else MetricsSink()
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda n, _: stopping.append(n))
    log.info("sft_started", examples=len(examples), steps=steps, from_step=step)
    try:
        while step < steps and not stopping:
            started = time.perf_counter()
            out = trainer.train(_batch(examples, batch_rows(sft, cfg.seed, len(examples), step, parallel)))
            step += 1
            elapsed = time.perf_counter() - started
            epoch = step / math.ceil(len(examples) / sft.batch_size)
            metrics.write(step, out | {"epoch": epoch, "step_s": elapsed, "tokens_per_s": out["tokens"] / elapsed})
            if cfg.checkpoint_dir and (step % cfg.checkpoint_every == 0 or step == steps or stopping):
                _save(cfg, trainer, step, run_id)
    finally:
        metrics.close()
    if step >= steps and cfg.export_dir:  # every rank: a sharded backend gathers; rank 0 writes
        trainer.export_hf(Path(cfg.export_dir))
        log.info("model_exported", path=cfg.export_dir)
    log.info("sft_stopped", step=step, of=steps, interrupted=bool(stopping))
    return 0


def _batch(examples: Examples, rows: list[int]) -> RolloutBatch:
    return supervised([examples.prompts[i] for i in rows], [examples.responses[i] for i in rows])


def _save(cfg: TrainerConfig, trainer: TrainerBackend, step: int, run_id: str) -> None:
    state = TrainerState(step=step, version=0, claims=(), run_id=run_id)
    path = save_checkpoint_ranks(cfg.checkpoint_dir, state, trainer.save, trainer.parallel, keep=cfg.keep_checkpoints)
    if trainer.parallel.is_main:
        log.info("checkpoint_saved", path=str(path), step=step)
    trainer.parallel.barrier()


def _restore(cfg: TrainerConfig, trainer: TrainerBackend, run_id: str) -> int:
    if not cfg.checkpoint_dir:
        raise ConfigError("--resume needs trainer.checkpoint_dir")
    state = load_checkpoint(cfg.checkpoint_dir, trainer.load)
    if state is None:
        log.info("no_checkpoint_starting_fresh", checkpoint_dir=cfg.checkpoint_dir)
        return 0
    if state.run_id != run_id:
        raise ConfigError(f"trainer.checkpoint_dir {cfg.checkpoint_dir} holds a checkpoint of "
                          f"{state.run_id or 'an RL run'!r}, not of {run_id!r}: use another directory")  # fmt: skip
    log.info("resumed", step=state.step)
    return state.step
