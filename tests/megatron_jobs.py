"""Save-and-resume jobs on spawned gloo ranks, shared by the resharding and distributed-optimizer tests
(tests/unit/test_megatron_reshard.py, test_megatron_zero.py): a run saves after one step (or loads a checkpoint),
then takes one step on the next batch; what it holds after that step is compared across layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from megatron_helpers import fixed_batch, join_ranks, leave_ranks, spawn_ranks
from torch import Tensor

from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint_ranks
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, expert_home, iter_hf, stage_home
from miles_stream.trainer.megatron.reshard import Sizes
from miles_stream.trainer.megatron.zero import ShardedAdamW
from miles_stream.trainer.parallel import DataParallel

TRACE = (8, 2, 2)  # the tiny Qwen3-MoE's experts, layers, top-k: a routing trace on its samples (R3)
# (result name, model, trainer.megatron settings, load from, save to)
Job = tuple[str, str, dict[str, Any], str, str]


def config(model_dir: Path, moe: bool, **megatron: Any) -> TrainerConfig:
    # warm-up: the learning rate changes every step, so a schedule not carried over shows in the weights; weight
    # decay: a hyperparameter a split optimizer's parts must take from the schedule's group too
    return TrainerConfig(model=str(model_dir), lr=1e-3, warmup_steps=4, micro_batch_tokens=40, backend="megatron",
                         weight_decay=0.1, routing_replay=moe, megatron=MegatronConfig(**megatron))  # fmt: skip


def run(job: Job, dirs: dict[str, str], parallel: DataParallel) -> dict[str, Any]:
    """Save after one step (or load), then one step on the next batch: what a never-restarted run and a resumed
    one hold after it. Each rank reads its own share of the batch (TP x PP groups train their union, EP's DP
    ranks their own part). "moments": the AdamW state this rank holds (a distributed optimizer's: its own share)."""
    _, model, sizes, load_from, save_to = job
    model_dir, moe = Path(dirs[model]), model == "moe"
    per = 16 // parallel.world  # rows: four groups of four
    rows = list(range(parallel.rank * per, (parallel.rank + 1) * per))
    backend: Any = build_backend(config(model_dir, moe, **sizes), AlgoConfig(), temperature=1.0, parallel=parallel)
    if load_from:
        assert load_checkpoint(Path(load_from), backend.load) is not None
    else:
        backend.train(fixed_batch(model_dir, seed=0, trace=TRACE if moe else None).rows(rows))
        save_checkpoint_ranks(Path(save_to), TrainerState(step=1, version=1, claims=()), backend.save, parallel)
    metrics = backend.train(fixed_batch(model_dir, seed=2, trace=TRACE if moe else None).rows(rows))
    gpt, policy, groups = backend.model.gpt, backend.policy, backend.groups
    names = {id(p): n for n, p in gpt.named_parameters()}
    opt = policy.optimizer
    held = opt.owned_state() if isinstance(opt, ShardedAdamW) else opt.state
    return {"metrics": metrics, "weights": {n: t.clone() for n, t in backend.weights()[0].items()},
            "moments": {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in held.items()},
            "coords": (groups.tp_rank, groups.pp.rank, groups.ep.rank),
            "sizes": (groups.tp, groups.pp.world, groups.ep.world),
            "lr": policy.scheduler.get_last_lr()[0], "last_epoch": policy.scheduler.last_epoch}  # fmt: skip


def _worker(rank: int, world: int, port: int, jobs: list[Job], dirs: dict[str, str], out: str) -> None:
    parallel = join_ranks(rank, world, port)
    torch.save({job[0]: run(job, dirs, parallel) for job in jobs}, f"{out}.{rank}")
    leave_ranks(parallel)


def spawn(world: int, jobs: list[Job], dirs: dict[str, str], out: Path) -> dict[str, list[dict[str, Any]]]:
    """{result name: every rank's} of `jobs` run one after the other on `world` spawned gloo ranks."""
    ranks = spawn_ranks(_worker, world, out, jobs, dirs, str(out))
    return {job[0]: [r[job[0]] for r in ranks] for job in jobs}


def gathered(results: list[dict[str, Any]], shape: Qwen3Shape, field: str) -> dict[str, Tensor]:
    """One AdamW moment of every parameter under its Hugging Face name, read from the ranks that hold it (with a
    distributed optimizer, each rank of a parameter's replicas holds its own share: their union; with EP, the
    replicas of what is not an expert are every EP rank's)."""
    sizes = Sizes(*results[0]["sizes"])
    held: dict[tuple[int, int, int], dict[str, Any]] = {}
    for r in results:
        held.setdefault(r["coords"], {}).update(r["moments"])

    def shards_of(name: str) -> list[Tensor]:
        s, local = stage_home(name, shape, sizes.pp) if sizes.pp > 1 else (0, name)
        expert = expert_home(local, shape, sizes.ep) if sizes.ep > 1 else None
        if expert is not None:
            j, local = expert
            return [held[(k, s, j)][local][field] for k in range(sizes.tp)]
        return [next(held[(k, s, j)][local] for j in range(sizes.ep) if local in held[(k, s, j)])[field]
                for k in range(sizes.tp)]  # fmt: skip

    return dict(iter_hf(shards_of, shape))


def assert_same_step(never_restarted: list[dict[str, Any]], resumed: list[dict[str, Any]], shape: Qwen3Shape) -> None:
    """The resumed run's step is the never-restarted run's (float32 sums in another order): weights within 1e-6
    (seen: 6e-8), each moment within 1e-5 of its largest value (seen: 9e-7 of it, under 3e-9 absolute), step
    counts, learning rate and schedule equal."""
    want, got = never_restarted[0], resumed[0]
    for name in ("loss", "grad_norm", "tokens"):
        assert got["metrics"][name] == pytest.approx(want["metrics"][name], rel=1e-5, abs=1e-7), name
    assert (got["lr"], got["last_epoch"]) == (want["lr"], want["last_epoch"]) == (pytest.approx(7.5e-4), 2)
    assert list(got["weights"]) == list(want["weights"])
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, atol=1e-6, rtol=0, msg=name)
    for field in ("exp_avg", "exp_avg_sq"):
        a, b = gathered(never_restarted, shape, field), gathered(resumed, shape, field)
        scale = max(float(t.abs().max()) for t in a.values())
        assert scale > 1e-5  # two steps' gradients, not zeros (exp_avg_sq: about 1e-4)
        for name, tensor in a.items():
            torch.testing.assert_close(b[name], tensor, atol=1e-5 * scale, rtol=0, msg=f"{field} {name}")
    steps = {float(m["step"]) for r in never_restarted + resumed for m in r["moments"].values()}
    assert steps == {2.0}
