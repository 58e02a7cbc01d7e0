"""trainer.megatron.context_parallel on CPU: every sequence of a micro-batch split over gloo ranks.

The split is Megatron's (2*cp chunks, rank r holding chunks r and 2cp-1-r, every position on one rank once). CP=2
over two spawned gloo ranks, dense Qwen3 and Qwen3-MoE with R3 (and, slow, TP=2 x CP=2, PP=2 x CP=2, and for the
MoE EP=2 x CP=2 and PP=2 x CP=2, over four), each rank reading its own share of the batch, with a frozen reference
and an entropy bonus, against one rank on the whole batch: logprobs and entropy (on every rank; MoE: the replayed
forward's logprobs and its differing/recorded token counts), loss, gradient norm, routing_mismatch and the
published weights agree within float32 tolerance; a checkpoint written by the first CP rank resumes exactly; what
is not built is refused in one line."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import assert_weights_close, fixed_batch, join_ranks, leave_ranks, resume_check, spawn_ranks
from test_megatron_moe_pp import replayed, traced_batch

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.context import ContextSplit
from miles_stream.trainer.megatron.parallel import init_groups, release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a frozen reference (split too) and entropy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build_tiny_model(tmp_path_factory.mktemp("megatron-cp"), TinyModelConfig(num_layers=4))
    release_groups()  # the one-rank process group the backend made in this process


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("megatron-cp-moe"), TinyModelConfig(kind="moe", num_layers=4))


def config(model_dir: Path, **megatron: int) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         megatron=MegatronConfig(**megatron))  # fmt: skip


def test_the_split_is_megatrons_and_covers_every_position_once() -> None:
    ranks = [ContextSplit(2, r, 10) for r in range(2)]  # 10 tokens: padded to 12, chunks of 3
    assert ranks[0].positions("cpu").tolist() == [0, 1, 2, 9, 10, 11]
    assert ranks[1].positions("cpu").tolist() == [3, 4, 5, 6, 7, 8]
    assert ranks[1].local_index("cpu").tolist() == [-1, -1, -1, 0, 1, 2, 3, 4, 5, -1, -1, -1]
    for cp, length in ((2, 13), (4, 40), (3, 7)):
        held = torch.cat([ContextSplit(cp, r, length).positions("cpu") for r in range(cp)])
        assert sorted(held.tolist()) == list(range(ContextSplit(cp, 0, length).padded))
    ids = torch.arange(10)[None] + 1
    assert ranks[0].take(ids, pad=0).tolist() == [[1, 2, 3, 10, 0, 0]]


def test_context_parallel_refuses_what_it_cannot_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.megatron\.context_parallel: must be >= 1"):
        MegatronConfig(context_parallel=0)
    with pytest.raises(ValueError, match=r"x context_parallel=2 must divide the 3 ranks"):
        init_groups(DataParallel(rank=0, world=3), 1, 1, 1, 2)
    with pytest.raises(ConfigError, match=r"not packed ones: set trainer\.pack_sequences false"):
        build_backend(replace(config(tmp_path), pack_sequences=True, megatron=MegatronConfig(context_parallel=2)),
                      AlgoConfig(), temperature=1.0, parallel=DataParallel())  # fmt: skip


def share(rank: int, world: int) -> list[int]:
    per = 16 // world
    return list(range(rank * per, (rank + 1) * per))


def _cp_worker(rank: int, world: int, port: int, model_dir: str, out: str, sizes: dict[str, int], moe: bool) -> None:
    parallel = join_ranks(rank, world, port)
    cfg = replace(config(Path(model_dir), **sizes), routing_replay=moe)
    backend: Any = build_backend(cfg, ALGO, temperature=1.0, parallel=parallel)
    make = traced_batch if moe else fixed_batch
    batch = make(Path(model_dir), seed=0)
    counts = None
    if moe:  # R3: the replayed forward's logprobs and (differing, recorded) token counts
        logp, *counts = replayed(backend, batch)
        entropy = logp
    else:
        with torch.no_grad():  # every rank returns the whole micro-batch's logprobs
            logp, entropy = response_logprobs(backend.model, micro_inputs(batch, "cpu"), temperature=1.0)
    rows = share(rank, world)
    metrics = backend.train(batch.rows(rows))
    published = {n: t.clone() for n, t in backend.weights()[0].items()}
    ckpt = Path(out).parent / "ckpt"
    second = make(Path(model_dir), seed=2).rows(rows)
    after, again, resumed_equal = resume_check(
        backend, lambda: build_backend(cfg, ALGO, temperature=1.0, parallel=parallel), ckpt, parallel, second
    )
    torch.save({"logp": logp, "entropy": entropy, "counts": counts, "metrics": metrics, "weights": published,
                "after": after, "again": again, "resumed_equal": resumed_equal,
                "files": sorted(p.name for p in ckpt.iterdir())}, f"{out}.{rank}")  # fmt: skip
    leave_ranks(parallel)


@pytest.mark.parametrize(("world", "sizes", "moe"), [
    (2, {"context_parallel": 2}, False),
    (2, {"context_parallel": 2}, True),  # Qwen3-MoE with R3: the recording cut as the rows are
    pytest.param(4, {"context_parallel": 2, "tensor_parallel": 2}, False, marks=pytest.mark.slow),
    pytest.param(4, {"context_parallel": 2, "pipeline_parallel": 2}, False, marks=pytest.mark.slow),
    pytest.param(4, {"context_parallel": 2, "expert_parallel": 2}, True, marks=pytest.mark.slow),
    # the EP group is the two CP ranks of one model (Megatron's expert groups fold CP in); dense CP with DP 2
    pytest.param(2, {"context_parallel": 2, "expert_parallel": 2}, True, marks=pytest.mark.slow),
    pytest.param(4, {"context_parallel": 2}, False, marks=pytest.mark.slow),
    pytest.param(4, {"context_parallel": 2, "pipeline_parallel": 2}, True, marks=pytest.mark.slow),
])  # fmt: skip
def test_context_parallel_over_gloo_ranks_takes_the_step_one_rank_takes(
    model_dir: Path, moe_dir: Path, tmp_path: Path, world: int, sizes: dict[str, int], moe: bool
) -> None:
    path = moe_dir if moe else model_dir
    out = tmp_path / "rank"
    ranks = spawn_ranks(_cp_worker, world, out, str(path), str(out), sizes, moe)
    single: Any = build_backend(replace(config(path), routing_replay=moe), ALGO, temperature=1.0,
                                parallel=DataParallel())  # fmt: skip
    batch = (traced_batch if moe else fixed_batch)(path, seed=0)
    mask = batch.mask_BT.bool()
    if moe:
        logp, *counts = replayed(single, batch)
        entropy = logp
        assert 0 < counts[0] < counts[1]  # some recorded tokens differ from the model's own routing
    else:
        with torch.no_grad():
            logp, entropy = response_logprobs(single.model, micro_inputs(batch, "cpu"), temperature=1.0)
    metrics = single.train(batch)
    published, _ = single.weights()
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["logp"][mask], logp[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["entropy"][mask], entropy[mask], atol=1e-5, rtol=1e-5)
        if moe:  # each CP rank counted its own tokens; summed, one rank's counts
            assert got["counts"] == counts, r
        for name in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens", *(("routing_mismatch",) if moe
                                                                                      else ())):  # fmt: skip
            assert got["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), (r, name)
        assert_weights_close(got["weights"], published)
        assert got["again"]["loss"] == got["after"]["loss"] and got["again"]["grad_norm"] == got["after"]["grad_norm"]
        assert got["resumed_equal"], r
    # the step moved the weights (a test that compared untouched weights could not fail)
    moved = "model.layers.3.mlp.experts.down_proj" if moe else "model.layers.3.mlp.down_proj.weight"
    assert not torch.equal(
        published[moved], load_causal_lm(str(path), dtype="float32", device="cpu").state_dict()[moved]
    )
    tp, pp, ep = sizes.get("tensor_parallel", 1), sizes.get("pipeline_parallel", 1), sizes.get("expert_parallel", 1)
    stems = [f"megatron-tp{k:02d}" + (f"-pp{s:02d}" if pp > 1 else "") + (f"-ep{j:02d}" if ep > 1 else "")
             for k in range(tp) for s in range(pp) for j in range(ep)]  # fmt: skip
    assert ranks[0]["files"] == sorted(
        [*(f"{stem}.{x}" for stem in stems for x in ("pt", "safetensors")), "megatron.json"]
    )
