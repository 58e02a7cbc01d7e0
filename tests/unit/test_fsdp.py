"""trainer.fsdp on CPU with gloo, two spawned ranks against one replicated rank on the same batch: the same loss,
gradients and updated weights; publication gathers the full tensors; a checkpoint saved by the two ranks loads
back on two ranks to the same shards of weights and AdamW state (and the next step from it is the same); each
rank holds about half of one rank's parameter and optimizer bytes."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint_ranks
from miles_stream.trainer.config import FsdpConfig, TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.build import build_trainer
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

VOCAB = 50
GROUPS = 4  # 16 samples: 8 per rank


def config(model_dir: Path, *, fsdp: bool) -> TrainerConfig:
    # micro_batch_tokens=40: several micro-batches per rank, not as many on each (align pads the short rank)
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, fsdp=FsdpConfig(enabled=fsdp))


def fixed_batch(model_dir: Path, seed: int) -> RolloutBatch:
    """Random prompts and responses of varied lengths, behaviour logprobs the model's own, rewards 0/1."""
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(GROUPS):
        g = synthetic_group(rng, n_samples=4, prompt_len=int(rng.integers(2, 9)),
                            response_len=int(rng.integers(3, 12)), vocab=VOCAB)  # fmt: skip
        samples = tuple(replace(s, reward=r) for s, r in zip(g.samples, (0.0, 1.0, 0.0, 1.0), strict=True))
        made.append(replace(g, samples=samples))
    batch = collate(made)
    with torch.no_grad():
        logp, _ = response_logprobs(model, micro_inputs(batch, "cpu"), temperature=1.0)
    return RolloutBatch(batch.prompts, batch.responses, logp * batch.mask_BT, batch.mask_BT, batch.rewards_B,
                        batch.group_B)  # fmt: skip


def share(batch: RolloutBatch, rank: int, world: int) -> RolloutBatch:
    per = batch.size // world
    return batch.rows(list(range(rank * per, (rank + 1) * per)))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def state_bytes(trainer: Any) -> int:
    """Bytes of this rank's parameters and AdamW state (its shards under FSDP)."""
    params = sum(local(p).numel() * p.element_size() for p in trainer.model.parameters())
    optim = sum(local(v).numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))  # fmt: skip
    return int(params + optim)


def optimizer_shards(trainer: Any) -> list[torch.Tensor]:
    return [
        local(s[k]) for p in trainer.params for s in [trainer.optimizer.state[p]] for k in ("exp_avg", "exp_avg_sq")
    ]


def _fsdp_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel = DataParallel.from_env("cpu")
    cfg = config(Path(model_dir), fsdp=True)
    trainer = build_trainer(cfg, AlgoConfig(), temperature=1.0, parallel=parallel)
    batch = fixed_batch(Path(model_dir), seed=0)
    metrics = trainer.train(share(batch, rank, world))
    grads = {n: full(p.grad) for n, p in trainer.model.named_parameters()}  # the step's, clipped
    published, _ = trainer.weights()
    weights = {n: t.clone() for n, t in published.items()}  # every rank reads all (the gathers are collective)
    memory = state_bytes(trainer)
    # a checkpoint of this state, by both ranks; then a second step from it, here and in a fresh trainer
    root = Path(out).parent / "ckpt"
    save_checkpoint_ranks(root, TrainerState(step=1, version=1, claims=()), trainer.save, parallel)
    saved_params = [local(p) for p in trainer.params]
    saved_optim = optimizer_shards(trainer)
    second = share(fixed_batch(Path(model_dir), seed=1), rank, world)
    after = trainer.train(second)
    resumed = build_trainer(cfg, AlgoConfig(), temperature=1.0, parallel=parallel)
    state = load_checkpoint(root, resumed.load)
    loaded = {"params": [local(p) for p in resumed.params], "optim": optimizer_shards(resumed),
              "scheduler": resumed.scheduler.state_dict()["last_epoch"]}  # fmt: skip
    again = resumed.train(second)
    # bf16 compute over float32 shards (FSDP's MixedPrecisionPolicy), published in bf16
    mixed = build_trainer(replace(cfg, dtype="bfloat16"), AlgoConfig(), temperature=1.0, parallel=parallel)
    bf16 = mixed.train(share(batch, rank, world))
    bf16_published, bf16_dtype = mixed.weights()
    bf16_weights = {n: t.clone() for n, t in bf16_published.items()}
    torch.save({"metrics": metrics, "grads": grads, "weights": weights, "memory": memory, "step": state and state.step,
                "saved_params": saved_params, "saved_optim": saved_optim, "loaded": loaded,
                "after": after, "again": again, "after_params": [local(p) for p in trainer.params],
                "again_params": [local(p) for p in resumed.params],
                "bf16": bf16, "bf16_dtype": str(bf16_dtype), "bf16_weights": bf16_weights,
                "bf16_shard_dtype": str(next(mixed.model.parameters()).dtype)}, f"{out}.{rank}")  # fmt: skip
    parallel.barrier()  # neither rank leaves while the other still uses gloo
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown sometimes aborts (tests/unit/test_trainer.py says when)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("fsdp")
    model_dir = build_tiny_model(tmp / "model", TinyModelConfig(kind="dense"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "run" / "rank"
    out.parent.mkdir()
    mp.start_processes(_fsdp_worker, args=(2, port, str(model_dir), str(out)), nprocs=2, start_method="spawn")
    return model_dir, [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


def test_two_fsdp_ranks_take_the_step_one_replicated_rank_takes(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    model_dir, ranks = two_ranks
    single = build_trainer(config(model_dir, fsdp=False), AlgoConfig(), temperature=1.0, parallel=DataParallel())
    metrics = single.train(fixed_batch(model_dir, seed=0))
    for got in ranks:
        assert got["metrics"]["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
        assert got["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
        assert got["metrics"]["tokens"] == metrics["tokens"]
        for name, p in single.model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-6, rtol=1e-4)
        state = single.model.state_dict()
        assert list(got["weights"]) == list(state)  # every tensor published, under the HF names, in order
        for name, tensor in state.items():
            # atol 1% of lr: AdamW's first step is lr * g / (|g| + eps), which a gradient near eps turns from a
            # 1e-4 relative difference (the sums' order) into up to lr * 1e-2 (seen: 2.4e-6 on one of 8192)
            torch.testing.assert_close(got["weights"][name], tensor, atol=1e-5, rtol=1e-5)
    # (and the step did move them: this compares updated weights)
    fresh = load_causal_lm(str(model_dir), dtype="float32", device="cpu").state_dict()
    assert max(float((fresh[n] - t).abs().max()) for n, t in ranks[0]["weights"].items()) > 1e-4


def test_fsdp_mixed_precision_computes_in_bf16_over_float32_shards_as_autocast_does(
    two_ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    model_dir, ranks = two_ranks
    cfg = replace(config(model_dir, fsdp=False), dtype="bfloat16")  # one rank: float32 params under autocast
    single = build_trainer(cfg, AlgoConfig(), temperature=1.0, parallel=DataParallel())
    metrics = single.train(fixed_batch(model_dir, seed=0))
    for got in ranks:
        assert got["bf16_shard_dtype"] == "torch.float32" and got["bf16_dtype"] == "torch.bfloat16"
        # bf16 rounding of weights and activations, applied at different points (autocast casts per op, FSDP
        # casts the gathered parameters): equal to bf16 precision, not to float32's
        assert got["bf16"]["loss"] == pytest.approx(metrics["loss"], rel=2e-2, abs=1e-3)
        assert got["bf16"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=2e-2)
        # AdamW moves an element by up to lr (1e-3) either way: where bf16 noise flips a near-zero gradient's
        # sign the two differ by up to 2 lr (seen: 13 of 3200 elements of a matrix past 1e-3, at most 2.1e-3;
        # 3 of a 16-element norm weight), plus bf16 rounding of the published weight
        past, elements = 0, 0
        for name, tensor in single.model.state_dict().items():
            assert got["bf16_weights"][name].dtype == torch.bfloat16  # gathered in bf16: half the bytes moved
            diff = (got["bf16_weights"][name].float() - tensor).abs()
            assert float(diff.max()) < 2.5e-3 + 4e-3 * float(tensor.abs().max()), name
            past, elements = past + int((diff > 1e-3).sum()), elements + diff.numel()
        assert past / elements < 0.01, (past, elements)


def test_a_checkpoint_of_two_fsdp_ranks_resumes_on_two_ranks_exactly(
    two_ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    for got in two_ranks[1]:
        assert got["step"] == 1
        assert got["loaded"]["scheduler"] == 1
        for saved, loaded in zip(got["saved_params"], got["loaded"]["params"], strict=True):
            assert torch.equal(saved, loaded)
        assert len(got["saved_optim"]) == len(got["loaded"]["optim"]) > 0
        for saved, loaded in zip(got["saved_optim"], got["loaded"]["optim"], strict=True):
            assert torch.equal(saved, loaded)
        assert got["again"]["loss"] == got["after"]["loss"]  # the next step from the checkpoint: the same step
        for a, b in zip(got["after_params"], got["again_params"], strict=True):
            assert torch.equal(a, b)


def test_each_fsdp_rank_holds_about_half_the_parameter_and_optimizer_bytes(
    two_ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    model_dir, ranks = two_ranks
    single = build_trainer(config(model_dir, fsdp=False), AlgoConfig(), temperature=1.0, parallel=DataParallel())
    single.train(fixed_batch(model_dir, seed=0))  # AdamW's state exists after a step
    whole = state_bytes(single)
    for got in ranks:
        assert 0.45 < got["memory"] / whole < 0.55, (got["memory"], whole)
    assert sum(got["memory"] for got in ranks) >= whole  # nothing is left out (rows split unevenly are padded)


def test_fsdp_settings_it_cannot_honour_are_refused_with_what_to_change(tmp_path: Path) -> None:
    on = FsdpConfig(enabled=True)
    with pytest.raises(ConfigError, match=r"trainer\.fsdp\.enabled: not tried with trainer.compile"):
        TrainerConfig(fsdp=on, compile=True)
    with pytest.raises(ConfigError, match=r"trainer\.fsdp\.cpu_offload: .* needs trainer.device cuda"):
        TrainerConfig(fsdp=replace(on, cpu_offload=True))
    with pytest.raises(ConfigError, match=r"trainer\.fsdp\.enabled: FSDP keeps float32"):
        TrainerConfig(fsdp=on, dtype="bfloat16", main_params_dtype="bfloat16")
    model_dir = build_tiny_model(tmp_path / "model", TinyModelConfig(kind="dense"))
    with pytest.raises(ConfigError, match="does not shard PPO's critic"):
        build_trainer(config(model_dir, fsdp=True), AlgoConfig(advantage_estimator="ppo"), temperature=1.0,
                      parallel=DataParallel())  # fmt: skip
