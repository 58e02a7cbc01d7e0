"""trainer.megatron.pipeline_parallel with Qwen3-MoE on CPU: each pipeline stage holds its layers' routers and
experts (split again over the stage's expert-parallel ranks with expert_parallel > 1), over gloo ranks.

The conversion split by stage and then by expert is exact both ways (reassembled through `convert.home`, as the
layout publishes, it gives the HF tensors back bit for bit). PP=2 over two spawned gloo ranks (and, slow, PP=2 x
EP=2 over four), with R3 replaying a trace that differs from the model's own routing in a first-stage layer for
some samples, in a last-stage layer for others and in both for others still, a frozen reference and an entropy
bonus, against one rank on the whole batch: replayed logprobs and the forward's (differing, recorded) token counts
on every stage, loss, KL, entropy, gradient norm, routing_mismatch and the published weights agree within float32
tolerance; each stage holds its half of the layers (and with EP, half of their experts); a checkpoint written per
(TP, PP, EP) rank resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import (
    assert_joins,
    assert_weights_close,
    fixed_batch,
    join_ranks,
    leave_ranks,
    own_routes,
    resume_check,
    spawn_ranks,
)

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, by_expert, by_stage, home, to_megatron
from miles_stream.trainer.megatron.parallel import init_groups, release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs
from miles_stream.trainer.torch.routing_replay import replay_inputs

EXPERTS, TOPK, LAYERS = 8, 2, 4  # two layers a stage at PP=2
TRACE = (EXPERTS, LAYERS, TOPK)
ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a frozen reference (pipelined and replayed too), entropy
CHANGED = {0: [0], 1: [LAYERS - 1], 3: [0, LAYERS - 1]}  # group -> the layers its trace is not the model's own in


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build_tiny_model(tmp_path_factory.mktemp("megatron-moe-pp"), TinyModelConfig(kind="moe", num_layers=LAYERS))
    release_groups()  # the one-rank process group the backend made in this process


def config(model_dir: Path, **megatron: int) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         routing_replay=True, megatron=MegatronConfig(**megatron))  # fmt: skip


def share(rank: int, world: int) -> list[int]:
    """This rank's rows: whole groups of four. PP=2: three groups and one (the PP group trains them all);
    PP=2 x EP=2: one group a rank, so each DP rank of a stage trains two groups (its PP group's), unequal lengths."""
    groups = {2: [[0, 1, 2], [3]], 4: [[0], [1], [2], [3]]}[world][rank]
    return [4 * g + i for g in groups for i in range(4)]


def traced_batch(model_dir: Path, seed: int) -> RolloutBatch:
    """`fixed_batch` whose traces are the HF routers' own top-k (what a rollout engine records), except in the
    layers `CHANGED` names for each group, where they are random experts; the third group carries none. A token
    then differs in a first-stage layer, a last-stage layer or both: a stage alone sees only some of them."""
    batch = fixed_batch(model_dir, seed, trace=TRACE)
    own = own_routes(load_causal_lm(str(model_dir), dtype="float32", device="cpu"), batch)
    routing: list[np.ndarray | None] = []
    for i, (n, random) in enumerate(zip(batch.lengths, batch.routing, strict=True)):
        if random is None:
            routing.append(None)
            continue
        trace = own[i, : n - 1].copy()
        for layer in CHANGED[i // 4]:
            trace[:, layer] = random[:, layer]
        routing.append(trace)
    return replace(batch, routing=routing)


def replayed(backend: Any, batch: RolloutBatch) -> tuple[torch.Tensor, int, int]:
    """(logprobs [B, T], differing tokens, recorded tokens) of one forward with the batch's traces replayed, as the
    train step drives the policy's replay."""
    replay = backend.policy.replays[id(backend.model)]
    replay.begin(replay_inputs(batch.routing, batch.lengths, packed=False, device="cpu"))
    with torch.no_grad():
        logp, _ = response_logprobs(backend.model, micro_inputs(batch, "cpu"), temperature=1.0)
    replay.end_forward()
    replay.end()
    differing, recorded = replay.take_counts()
    return logp, differing, recorded


def test_moe_conversion_split_by_stage_and_expert_is_exact_both_ways(moe_dir: Path) -> None:
    hf = load_causal_lm(str(moe_dir), dtype="float32", device="cpu")
    state, shape = hf.state_dict(), Qwen3Shape.of(hf.config)
    whole = to_megatron(state, shape)[0]
    for pp in (2, 4):
        for ep in (1, 2, 4):
            ranks = [by_expert(stage, shape, ep) if ep > 1 else [stage] for stage in by_stage(whole, shape, pp)]
            per = LAYERS // pp
            for s, stage in enumerate(ranks):
                for j, part in enumerate(stage):
                    assert {n.split(".")[2] for n in part if n.startswith("decoder.layers.")} == {
                        str(i) for i in range(per)
                    }  # local numbering from 0 on every stage
                    experts = [n for n in part if ".local_experts." in n]
                    assert len(experts) == per * EXPERTS // ep * 2  # fc1 and fc2 of its experts of its layers
                    i, e = s * per + per - 1, j * (EXPERTS // ep) + 1  # its last layer, its second expert
                    x = "mlp.experts.local_experts."
                    assert torch.equal(part[f"decoder.layers.{per - 1}.{x}1.linear_fc2.weight"],
                                       whole[f"decoder.layers.{i}.{x}{e}.linear_fc2.weight"])  # fmt: skip
                    assert torch.equal(part[f"decoder.layers.{per - 1}.mlp.router.weight"],
                                       whole[f"decoder.layers.{i}.mlp.router.weight"])  # fmt: skip

            def shards_of(name: str, ranks: list[list[dict[str, torch.Tensor]]] = ranks, pp: int = pp,
                          ep: int = ep) -> list[torch.Tensor]:  # fmt: skip
                stage, owner, local = home(name, shape, pp, ep)
                return [ranks[stage][max(owner, 0)][local]]

            assert_joins(shards_of, shape, state)  # as the layout reads them


def test_moe_pipeline_parallel_is_accepted_and_checks_its_sizes(moe_dir: Path) -> None:
    shape = Qwen3Shape.of(load_causal_lm(str(moe_dir), dtype="float32", device="cpu").config)
    shape.check_split(1, 2, 2)  # PP x EP
    shape.check_split(1, 1, 4)
    with pytest.raises(ConfigError, match=r"pipeline_parallel=3 must divide the model's num_hidden_layers \(4\)"):
        shape.check_split(1, 1, 3)
    with pytest.raises(ValueError, match=r"expert_parallel=4 must divide the 2 data-parallel ranks"):
        init_groups(DataParallel(rank=0, world=4), 1, 4, 2)


def _worker(rank: int, world: int, port: int, model_dir: str, out: str, ep: int) -> None:
    parallel = join_ranks(rank, world, port)
    cfg = config(Path(model_dir), pipeline_parallel=2, expert_parallel=ep)
    backend: Any = build_backend(cfg, ALGO, temperature=1.0, parallel=parallel)
    batch = traced_batch(Path(model_dir), seed=0)
    logp, differing, recorded = replayed(backend, batch)  # the whole batch on every rank: a collective of all
    rows = share(rank, world)
    metrics = backend.train(batch.rows(rows))
    published = {n: t.clone() for n, t in backend.weights()[0].items()}  # unsplit ones are the live parameters
    local = sorted(n for n, _ in backend.model.gpt.named_parameters())
    ckpt = Path(out).parent / "ckpt"
    second = traced_batch(Path(model_dir), seed=2).rows(rows)
    after, again, resumed_equal = resume_check(
        backend, lambda: build_backend(cfg, ALGO, temperature=1.0, parallel=parallel), ckpt, parallel, second
    )
    torch.save({"logp": logp, "counts": (differing, recorded), "metrics": metrics, "weights": published,
                "local": local, "after": after, "again": again, "resumed_equal": resumed_equal,
                "files": sorted(p.name for p in ckpt.iterdir())}, f"{out}.{rank}")  # fmt: skip
    leave_ranks(parallel)


# each process imports Megatron and builds the policy and its reference twice
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_moe_pipeline_parallel_over_gloo_ranks_takes_the_step_one_rank_takes(
    moe_dir: Path, tmp_path: Path, world: int
) -> None:
    ep = world // 2
    out = tmp_path / "rank"
    ranks = spawn_ranks(_worker, world, out, str(moe_dir), str(out), ep)
    single: Any = build_backend(config(moe_dir), ALGO, temperature=1.0, parallel=DataParallel())
    batch = traced_batch(moe_dir, seed=0)
    mask = batch.mask_BT.bool()
    logp, differing, recorded = replayed(single, batch)
    # tokens of groups 0, 1 and 3 differ (first stage, last stage, both), group 2 is not recorded
    assert 0 < differing < recorded and recorded == sum(n - 1 for n in batch.lengths[:8] + batch.lengths[12:])
    metrics = single.train(batch)
    published, _ = single.weights()
    for r, got in enumerate(ranks):
        stage = r // ep  # Megatron's order: EP (within DP) faster than PP
        layers = {n.split(".")[2] for n in got["local"] if n.startswith("decoder.layers.")}
        assert layers == {"0", "1"}  # each stage holds two of the four layers, their routers and experts
        assert sum(n.startswith("decoder.layers.0.mlp.router.") for n in got["local"]) == 1
        assert sum(".local_experts." in n for n in got["local"]) == 2 * EXPERTS // ep * 2
        assert ("embedding.word_embeddings.weight" in got["local"]) == (stage == 0)
        torch.testing.assert_close(got["logp"][mask], logp[mask], atol=1e-5, rtol=1e-5)
        assert got["counts"] == (differing, recorded)  # every stage counts what one rank counts
        for name in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens", "routing_mismatch"):
            assert got["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
        assert_weights_close(got["weights"], published)
        assert got["again"]["loss"] == got["after"]["loss"] and got["again"]["grad_norm"] == got["after"]["grad_norm"]
        assert got["resumed_equal"], r
    fresh = load_causal_lm(str(moe_dir), dtype="float32", device="cpu").state_dict()
    for name in ("model.layers.3.mlp.gate.weight", "model.layers.3.mlp.experts.gate_up_proj"):
        assert float((published[name] - fresh[name]).abs().max()) > 1e-4, name  # last stage's router, experts moved
    tail = [f"-ep{j:02d}" for j in range(ep)] if ep > 1 else [""]
    files = [f"megatron-tp00-pp{s:02d}{t}.{x}" for s in range(2) for t in tail for x in ("pt", "safetensors")]
    assert ranks[0]["files"] == sorted([*files, "megatron.json"])  # the sizes, for a resume on others (reshard.py)
