"""trainer.megatron.expert_parallel on CPU: Qwen3-MoE's experts split over expert-parallel (EP) gloo ranks.

The conversion split by expert is exact both ways (each EP rank holds its experts under Megatron's local
numbering; reassembled they give the HF tensors back bit for bit), and what is not supported is refused in one
line. EP=2 over two spawned gloo ranks (and, slow, EP=2 x expert-DP 2 over four), each rank training
its own, unequal share (so the ranks run different numbers of micro-batches and tokens), with R3 and a frozen
reference, against one rank on the whole batch: logprobs, loss, gradient norm, routing_mismatch and the
published weights agree within float32 tolerance; each rank holds half the experts and half their AdamW state;
a checkpoint written per EP rank resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import (
    assert_joins,
    assert_weights_close,
    fixed_batch,
    join_ranks,
    leave_ranks,
    resume_check,
    spawn_ranks,
)

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, by_expert, expert_home, to_megatron
from miles_stream.trainer.megatron.parallel import init_groups, release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

EXPERTS, TOPK, LAYERS = 8, 2, 2
TRACE = (EXPERTS, LAYERS, TOPK)  # a routing trace for every sample (but the third group's)
ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a frozen reference (its experts split too) and entropy


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build_tiny_model(tmp_path_factory.mktemp("megatron-ep"), TinyModelConfig(kind="moe"))
    release_groups()  # the one-rank process group the backend made in this process


def config(model_dir: Path, ep: int = 1) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         routing_replay=True, megatron=MegatronConfig(expert_parallel=ep))  # fmt: skip


def share(rank: int, world: int) -> list[int]:
    """This rank's rows: whole groups of four, unequal over two ranks (three groups and one)."""
    groups = {2: [[0, 1, 2], [3]], 4: [[0], [1], [2], [3]]}[world][rank]
    return [4 * g + i for g in groups for i in range(4)]


def test_conversion_split_by_expert_is_exact_both_ways(moe_dir: Path) -> None:
    hf = load_causal_lm(str(moe_dir), dtype="float32", device="cpu")
    state, shape = hf.state_dict(), Qwen3Shape.of(hf.config)
    whole = to_megatron(state, shape)[0]
    for ep in (2, 4, 8):
        ranks = by_expert(whole, shape, ep)
        local = EXPERTS // ep
        for j, part in enumerate(ranks):  # rank j: experts j*E/ep.. under local indices 0..E/ep-1
            names = [n for n in part if ".local_experts." in n]
            assert len(names) == LAYERS * local * 2
            for e in range(local):
                for fc in ("linear_fc1", "linear_fc2"):
                    x = "decoder.layers.1.mlp.experts.local_experts."
                    assert torch.equal(part[f"{x}{e}.{fc}.weight"], whole[f"{x}{j * local + e}.{fc}.weight"])
            assert torch.equal(part["decoder.layers.0.mlp.router.weight"], whole["decoder.layers.0.mlp.router.weight"])

        def shards_of(name: str, ranks: list[dict[str, torch.Tensor]] = ranks, ep: int = ep) -> list[torch.Tensor]:
            home = expert_home(name, shape, ep)
            return [ranks[0][name]] if home is None else [ranks[home[0]][home[1]]]

        assert_joins(shards_of, shape, state)  # as the layout reads them


def test_expert_parallel_refuses_what_it_cannot_split(moe_dir: Path, tmp_path: Path) -> None:
    shape = Qwen3Shape.of(load_causal_lm(str(moe_dir), dtype="float32", device="cpu").config)
    with pytest.raises(ConfigError, match=r"expert_parallel=3 must divide the model's num_experts \(8\)"):
        shape.check_split(1, 3)
    dense = Qwen3Shape.of(load_causal_lm(str(build_tiny_model(tmp_path / "dense")), dtype="float32",
                                         device="cpu").config)  # fmt: skip
    with pytest.raises(ConfigError, match=r"expert_parallel=2: this model is dense"):
        dense.check_split(1, 2)
    with pytest.raises(ValueError, match=r"expert_parallel=2 must divide the 3 data-parallel ranks"):
        init_groups(DataParallel(rank=0, world=3), 1, 2)
    with pytest.raises(ConfigError, match=r"trainer\.megatron\.expert_parallel: must be >= 1"):
        MegatronConfig(expert_parallel=0)


def _optimizer_bytes(backend: Any, params: list[torch.nn.Parameter]) -> int:
    state = backend.policy.optimizer.state
    return sum(t.numel() * t.element_size() for p in params for t in state[p].values() if torch.is_tensor(t))


def expert_bytes(backend: Any) -> dict[str, int]:
    """Bytes of this rank's expert parameters and of their AdamW state (after a step)."""
    experts = [p for n, p in backend.model.gpt.named_parameters() if ".local_experts." in n]
    return {"params": sum(p.numel() * p.element_size() for p in experts),
            "optimizer": _optimizer_bytes(backend, experts)}  # fmt: skip


def _ep_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    parallel = join_ranks(rank, world, port)
    backend: Any = build_backend(config(Path(model_dir), ep=2), ALGO, temperature=1.0, parallel=parallel)
    rows = share(rank, world)
    mine = fixed_batch(Path(model_dir), seed=0, trace=TRACE).rows(rows)
    with torch.no_grad():  # a forward is a collective of the EP group: every rank runs one
        logp, _ = response_logprobs(backend.model, micro_inputs(mine, "cpu"), temperature=1.0)
    metrics = backend.train(mine)
    published = {n: t.clone() for n, t in backend.weights()[0].items()}  # unsplit ones are the live parameters
    names = [n for n, _ in backend.model.gpt.named_parameters() if ".local_experts." in n]
    memory = expert_bytes(backend)
    ckpt = Path(out).parent / "ckpt"
    second = fixed_batch(Path(model_dir), seed=2, trace=TRACE).rows(rows)
    after, again, resumed_equal = resume_check(
        backend, lambda: build_backend(config(Path(model_dir), ep=2), ALGO, temperature=1.0, parallel=parallel),
        ckpt, parallel, second)  # fmt: skip
    torch.save({"rows": rows, "logp": logp, "metrics": metrics, "weights": published,
                "expert_names": names, "memory": memory, "after": after, "again": again,
                "resumed_equal": resumed_equal,
                "files": sorted(p.name for p in ckpt.iterdir())}, f"{out}.{rank}")  # fmt: skip
    leave_ranks(parallel)


# each process imports Megatron and builds two models twice: 6 s on two ranks (default tier, as the TP test), 13 s
# on four (slow) on this 2-core machine
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_expert_parallel_over_gloo_ranks_takes_the_step_one_rank_takes(
    moe_dir: Path, tmp_path: Path, world: int
) -> None:
    out = tmp_path / "rank"
    ranks = spawn_ranks(_ep_worker, world, out, str(moe_dir), str(out))
    single: Any = build_backend(config(moe_dir), ALGO, temperature=1.0, parallel=DataParallel())
    batch = fixed_batch(moe_dir, seed=0, trace=TRACE)
    with torch.no_grad():
        logp, _ = response_logprobs(single.model, micro_inputs(batch, "cpu"), temperature=1.0)
    metrics = single.train(batch)
    published, _ = single.weights()
    whole = expert_bytes(single)
    for r, got in enumerate(ranks):
        local = [n for n in got["expert_names"] if n.startswith("decoder.layers.0.")]
        assert len(local) == EXPERTS // 2 * 2  # fc1 and fc2 of 4 of the 8 experts
        assert got["memory"] == {k: v // 2 for k, v in whole.items()}  # half the expert bytes, half their AdamW
        mask = batch.mask_BT[got["rows"]].bool()
        t = got["logp"].shape[1]
        torch.testing.assert_close(got["logp"][mask[:, :t]], logp[got["rows"], :t][mask[:, :t]], atol=1e-5, rtol=1e-5)
        for name in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens", "routing_mismatch"):
            assert got["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
        assert_weights_close(got["weights"], published)
        assert got["again"]["loss"] == got["after"]["loss"] and got["again"]["grad_norm"] == got["after"]["grad_norm"]
        assert got["resumed_equal"], r
    assert metrics["routing_mismatch"] > 0.5  # random traces: most recorded tokens' own routing differs
    assert ranks[0]["files"] == [*(f"megatron-tp00-ep{j:02d}.{x}" for j in range(2) for x in ("pt", "safetensors")),
                                 "megatron.json"]  # fmt: skip
