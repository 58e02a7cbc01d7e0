"""`miles-stream train --sft DATA`: supervised fine-tuning on given answers, the warm start before RL.

    DATA (.jsonl | .parquet: prompt, response) ─► tokenize (prompt as the producer does; response + EOS)
        ─► per epoch a permutation fixed by (trainer.seed, epoch) ─► batches of sft.batch_size
        ─► PolicyTrainer.train with SftObjective (mean NLL of the response tokens)
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
from miles_stream.run_config import RunConfig
from miles_stream.trainer.algo import SftObjective
from miles_stream.trainer.assemble import load_policy
from miles_stream.trainer.batch import RolloutBatch, supervised
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from miles_stream.trainer.hf import export_hf
from miles_stream.trainer.metrics import MetricsSink
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.step import PolicyTrainer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Examples:
    prompts: list[np.ndarray]
    responses: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)


def load_examples(config: RunConfig) -> Examples:
    """Every record of sft.path, tokenized with trainer.model's tokenizer. A record without a prompt or a
    response string, or with an empty response, is a `ConfigError` naming its place."""
    from transformers import AutoTokenizer

    cfg = config.sft
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
        rows = with_chat_template(rows, config.trainer.model)
    tokenizer: Any = AutoTokenizer.from_pretrained(config.trainer.model)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompts = tokenizer([r.text for r in rows])["input_ids"]  # as the producer tokenizes a prompt
    responses = tokenizer([r.label for r in rows], add_special_tokens=False)["input_ids"]
    return Examples(
        prompts=[np.asarray(p, np.int32) for p in prompts],
        responses=[np.asarray([*r, *eos], np.int32) for r in responses],
    )


def batch_rows(config: RunConfig, size: int, step: int, parallel: DataParallel) -> list[int]:
    """This rank's rows of step `step` (see the module docstring)."""
    per_epoch = math.ceil(size / config.sft.batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([config.trainer.seed, epoch]).permutation(size)
    rows = order[k * config.sft.batch_size : (k + 1) * config.sft.batch_size]
    return [int(i) for i in rows[parallel.rank :: parallel.world]]


def total_steps(config: RunConfig, size: int) -> int:
    steps = config.sft.num_epochs * math.ceil(size / config.sft.batch_size)
    return min(steps, config.trainer.max_steps) if config.trainer.max_steps else steps


def build_sft_trainer(config: RunConfig, parallel: DataParallel) -> PolicyTrainer:
    model = load_policy(config)
    algo = replace(config.algo, kl_loss_coef=0.0, kl_coef=0.0, entropy_coef=0.0)  # no reference model
    objective = SftObjective(token_mean=config.algo.loss_reduction == "token_mean")
    return PolicyTrainer(model, config.trainer, algo, temperature=1.0, parallel=parallel, objective=objective)


def main(config: RunConfig, *, resume: bool = False) -> int:
    cfg = config.trainer
    check_model_dir(cfg.model, "trainer.model")
    examples = load_examples(config)
    parallel = DataParallel.from_env(cfg.device)
    try:
        trainer = build_sft_trainer(config, parallel)
        return _train(config, trainer, examples, resume)
    finally:
        parallel.close()


def _train(config: RunConfig, trainer: PolicyTrainer, examples: Examples, resume: bool) -> int:
    cfg, parallel = config.trainer, trainer.parallel
    run_id = f"sft:{Path(config.sft.path).resolve()}"
    step = _restore(config, trainer, run_id) if resume else 0
    steps = total_steps(config, len(examples))
    metrics = MetricsSink(cfg.metrics_path, cfg.tensorboard_dir) if parallel.is_main else MetricsSink()
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda n, _: stopping.append(n))
    log.info("sft_started", examples=len(examples), steps=steps, from_step=step)
    try:
        while step < steps and not stopping:
            started = time.perf_counter()
            out = trainer.train(_batch(examples, batch_rows(config, len(examples), step, parallel)))
            step += 1
            elapsed = time.perf_counter() - started
            epoch = step / math.ceil(len(examples) / config.sft.batch_size)
            metrics.write(step, out | {"epoch": epoch, "step_s": elapsed, "tokens_per_s": out["tokens"] / elapsed})
            if cfg.checkpoint_dir and (step % cfg.checkpoint_every == 0 or step == steps or stopping):
                _save(config, trainer, step, run_id)
    finally:
        metrics.close()
    if step >= steps and cfg.export_dir and parallel.is_main:
        export_hf(trainer.model, cfg.model, Path(cfg.export_dir))
        log.info("model_exported", path=cfg.export_dir)
    log.info("sft_stopped", step=step, of=steps, interrupted=bool(stopping))
    return 0


def _batch(examples: Examples, rows: list[int]) -> RolloutBatch:
    return supervised([examples.prompts[i] for i in rows], [examples.responses[i] for i in rows])


def _save(config: RunConfig, trainer: PolicyTrainer, step: int, run_id: str) -> None:
    if trainer.parallel.is_main:
        state = TrainerState(step=step, version=0, claims=(), run_id=run_id)
        path = save_checkpoint(config.trainer.checkpoint_dir, state, trainer.model, trainer.optimizer,
                               trainer.scheduler, keep=config.trainer.keep_checkpoints)  # fmt: skip
        log.info("checkpoint_saved", path=str(path), step=step)
    trainer.parallel.barrier()


def _restore(config: RunConfig, trainer: PolicyTrainer, run_id: str) -> int:
    if not config.trainer.checkpoint_dir:
        raise ConfigError("--resume needs trainer.checkpoint_dir")
    state = load_checkpoint(config.trainer.checkpoint_dir, trainer.model, trainer.optimizer, trainer.scheduler)
    if state is None:
        log.info("no_checkpoint_starting_fresh", checkpoint_dir=config.trainer.checkpoint_dir)
        return 0
    if state.run_id != run_id:
        raise ConfigError(f"trainer.checkpoint_dir {config.trainer.checkpoint_dir} holds a checkpoint of "
                          f"{state.run_id or 'an RL run'!r}, not of {run_id!r}: use another directory")  # fmt: skip
    log.info("resumed", step=state.step)
    return state.step
