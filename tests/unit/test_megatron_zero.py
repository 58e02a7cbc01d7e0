"""The distributed optimizer (`trainer.megatron.distributed_optimizer`, trainer/megatron/zero.py) on spawned gloo
ranks, against AdamW whole on every rank.

Two ranks at DP 2 (dense Qwen3) and at EP 2 (Qwen3-MoE: its attention and routers split over DP 2, its experts
whole on their EP rank), each with and without it: the same metrics and published weights after two steps, every
AdamW moment held by exactly one rank of the group (their union equal to the whole optimizer's), about half of the
elements each. Its checkpoints: resumed on two ranks with it, on two ranks without it and on one rank; a checkpoint
of the whole optimizer resumed with it; each takes the same next step as the run that never stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

import torch.distributed as dist
from megatron_helpers import join_ranks, leave_ranks, spawn_ranks
from megatron_jobs import Job, assert_same_step, gathered, run, spawn

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.megatron.convert import Qwen3Shape
from miles_stream.trainer.megatron.parallel import GroupParallel, release_groups
from miles_stream.trainer.megatron.zero import ShardedAdamW, greedy_shares
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm

ZERO = {"distributed_optimizer": True}
EP2 = {"expert_parallel": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron-zero")
    yield {"dense": build_tiny_model(tmp / "dense", TinyModelConfig(tie_embeddings=False, seed=3)),
           "tied": build_tiny_model(tmp / "tied", TinyModelConfig(num_layers=4)),
           "moe": build_tiny_model(tmp / "moe", TinyModelConfig(kind="moe"))}  # fmt: skip
    release_groups()  # the one-rank process group the backend made in this process


def shape_of(model_dir: Path) -> Qwen3Shape:
    return Qwen3Shape.of(load_causal_lm(str(model_dir), dtype="float32", device="cpu").config)


@pytest.fixture(scope="module")
def runs(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("runs")
    dirs = {k: str(v) for k, v in models.items()}
    jobs: list[Job] = [
        ("whole", "dense", {}, "", str(tmp / "whole")),
        ("zero", "dense", ZERO, "", str(tmp / "zero")),
        ("zero-on-zero", "dense", ZERO, str(tmp / "zero"), ""),
        ("zero-on-whole", "dense", {}, str(tmp / "zero"), ""),
        ("whole-on-zero", "dense", ZERO, str(tmp / "whole"), ""),
        ("moe-whole", "moe", EP2, "", str(tmp / "moe-whole")),
        ("moe-zero", "moe", EP2 | ZERO, "", str(tmp / "moe-zero")),
        ("moe-zero-on-zero", "moe", EP2 | ZERO, str(tmp / "moe-zero"), ""),
    ]  # fmt: skip
    out = spawn(2, jobs, dirs, tmp / "rank")
    out["zero-on-one"] = [run(("", "dense", {}, str(tmp / "zero"), ""), dirs, DataParallel())]
    out["moe-zero-on-one"] = [run(("", "moe", {}, str(tmp / "moe-zero"), ""), dirs, DataParallel())]
    out["dir"] = tmp
    return out


def elements(moments: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(m["exp_avg"].numel() for m in moments.values())


@pytest.mark.parametrize(("whole", "zero", "model"), [("whole", "zero", "dense"), ("moe-whole", "moe-zero", "moe")])
def test_the_split_state_steps_as_the_whole_one_and_each_rank_holds_about_half(
    runs: dict[str, Any], models: dict[str, Path], whole: str, zero: str, model: str
) -> None:
    shape = shape_of(models[model])
    want, got = runs[whole], runs[zero]
    for a, b in zip(want, got, strict=True):
        for name in ("loss", "grad_norm", "tokens"):
            assert b["metrics"][name] == pytest.approx(a["metrics"][name], rel=1e-6), name
        assert list(b["weights"]) == list(a["weights"])
        for name, tensor in a["weights"].items():  # the same AdamW arithmetic on the same summed gradients
            torch.testing.assert_close(b["weights"][name], tensor, atol=1e-7, rtol=0, msg=name)
    for field in ("exp_avg", "exp_avg_sq"):
        assert gathered(got, shape, field).keys() == gathered(want, shape, field).keys()
        for name, tensor in gathered(want, shape, field).items():
            torch.testing.assert_close(gathered(got, shape, field)[name], tensor, atol=1e-9, rtol=1e-6, msg=name)
    mine = [set(r["moments"]) for r in got]
    numels = {n: m["exp_avg"].numel() for n, m in want[0]["moments"].items()}
    if model == "dense":  # DP 2: every parameter's state on one rank of the two, placed as torch's ZeRO places it
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(numels)
        assert [elements(r["moments"]) for r in got] == greedy_shares(list(numels.values()), 2)
    else:  # EP 2: the experts' group is one rank (their state whole there), the rest split over DP 2
        experts = [{n for n in m if "local_experts" in n} for m in mine]
        assert all(e == {n for n in r["moments"] if "local_experts" in n} for e, r in zip(experts, want, strict=True))
        rest = [m - e for m, e in zip(mine, experts, strict=True)]
        assert not rest[0] & rest[1] and rest[0] | rest[1] == set(numels) - experts[0]
        assert [sum(numels[n] for n in r) for r in rest] == greedy_shares([numels[n] for n in rest[0] | rest[1]], 2)
    total = elements(want[0]["moments"])
    shares = [elements(r["moments"]) / total for r in got]
    assert all(0.4 < s < 0.6 for s in shares) if model == "dense" else all(0.9 < s < 0.95 for s in shares), shares


def test_greedy_shares_gives_the_235b_embedding_whole_to_one_rank() -> None:
    """docs/parallelism.md's largest rank: Qwen3-235B-A22B's first stage at PP 2 (the embedding, 47 layers'
    attention, routers and norms) over a DP group of 32: the rank given the 151,936 x 4,096 embedding owns its
    moments, five times the mean share."""
    hidden, heads, groups, head_dim, experts, vocab = 4096, 64, 4, 128, 128, 151_936
    layer = [(heads + 2 * groups) * head_dim * hidden, hidden * heads * head_dim, experts * hidden, hidden, hidden,
             head_dim, head_dim]  # fmt: skip
    numels = [vocab * hidden] + layer * 47
    shares = greedy_shares(numels, 32)
    assert sum(numels) == pytest.approx(4.00e9, rel=1e-3) and sum(shares) == sum(numels)
    assert max(shares) == vocab * hidden == 622_329_856  # 4.98 GB of float32 moments, against 1.0 GB a rank mean
    assert max(shares[1:]) < 0.14e9  # the others: 0.109e9 on average, whole tensors of 34-38e6 each


def _own_nothing(rank: int, world: int, port: int, out: str) -> None:
    parallel = join_ranks(rank, world, port)
    weight = torch.nn.Parameter(torch.ones(4))
    opt = ShardedAdamW([([weight], GroupParallel(rank=rank, world=world, group=dist.group.WORLD))],
                       {"lr": 0.1, "weight_decay": 0.1, "foreach": True})  # fmt: skip
    weight.grad = torch.full((4,), float(rank + 1))  # as if summed: every rank steps with its own gradient
    opt.step()
    state = opt.owned_state()
    again = ShardedAdamW([([weight], GroupParallel(rank=rank, world=world, group=dist.group.WORLD))],
                         {"lr": 0.1, "weight_decay": 0.1, "foreach": True})  # fmt: skip
    again.load_owned(opt.hyperparameters(), state)
    torch.save({"weight": weight.detach().clone(), "owned": len(opt.owned()), "state": len(state),
                "reloaded": len(again.owned_state())}, f"{out}.{rank}")  # fmt: skip
    leave_ranks(parallel)


def test_a_rank_that_owns_nothing_steps_receives_and_saves_an_empty_share(tmp_path: Path) -> None:
    """One parameter over two ranks: rank 0 owns it and steps it with its gradient; rank 1 owns nothing, still takes
    part in the broadcast and ends with rank 0's values; its saved share is empty and loads back empty."""
    ranks = spawn_ranks(_own_nothing, 2, tmp_path / "rank", str(tmp_path / "rank"))
    assert [(r["owned"], r["state"], r["reloaded"]) for r in ranks] == [(1, 1, 1), (0, 0, 0)]
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert not torch.equal(ranks[0]["weight"], torch.ones(4))  # it moved


def test_a_split_checkpoint_resumes_with_and_without_it_and_on_one_rank(
    runs: dict[str, Any], models: dict[str, Path]
) -> None:
    step = sorted(p.name for p in (runs["dir"] / "zero").glob("step-*/megatron*"))
    assert step == ["megatron-tp00-zero000.pt", "megatron-tp00-zero001.pt", "megatron-tp00.pt",
                    "megatron-tp00.safetensors", "megatron.json"]  # fmt: skip
    dense, moe = shape_of(models["dense"]), shape_of(models["moe"])
    assert_same_step(runs["zero"], runs["zero-on-zero"], dense)
    assert_same_step(runs["zero"], runs["zero-on-whole"], dense)
    assert_same_step(runs["zero"], runs["zero-on-one"], dense)
    assert_same_step(runs["moe-zero"], runs["moe-zero-on-zero"], moe)
    assert_same_step(runs["moe-zero"], runs["moe-zero-on-one"], moe)


def test_a_whole_checkpoint_resumes_into_the_split_optimizer(runs: dict[str, Any], models: dict[str, Path]) -> None:
    assert_same_step(runs["whole"], runs["whole-on-zero"], shape_of(models["dense"]))


@pytest.mark.slow
def test_four_ranks_split_experts_over_expert_dp_and_tp_pp_shards_over_dp(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """EP 2 on four ranks (each expert on two ranks of an expert-DP group: its moments split there, the rest over
    DP 4), TP 2 x DP 2, PP 2 x DP 2 (tied) and CP 2 x DP 2 (the moments split over DP x CP): each as without it;
    the EP, PP and TP checkpoints resume on one rank, and the TP one on two ranks with it (another TP and DP size,
    split to split)."""
    dirs = {k: str(v) for k, v in models.items()}
    kinds = (("moe", "moe", EP2), ("tp2", "dense", {"tensor_parallel": 2}), ("pp2", "tied", {"pipeline_parallel": 2}),
             ("cp2", "dense", {"context_parallel": 2}))  # fmt: skip
    jobs: list[Job] = [(f"{kind}-{how}", model, sizes | extra, "", str(tmp_path / f"{kind}-{how}"))
                       for kind, model, sizes in kinds for how, extra in (("whole", {}), ("zero", ZERO))]  # fmt: skip
    four = spawn(4, jobs, dirs, tmp_path / "rank")
    for kind, model, _ in kinds:
        whole, zero = four[f"{kind}-whole"], four[f"{kind}-zero"]
        shape = shape_of(models[model])
        for a, b in zip(whole, zero, strict=True):
            for name, tensor in a["weights"].items():
                torch.testing.assert_close(b["weights"][name], tensor, atol=1e-7, rtol=0, msg=f"{kind} {name}")
        for field in ("exp_avg", "exp_avg_sq"):
            want, got = gathered(whole, shape, field), gathered(zero, shape, field)
            for name, tensor in want.items():
                torch.testing.assert_close(got[name], tensor, atol=1e-9, rtol=1e-6, msg=f"{kind} {field} {name}")
        held = [elements(r["moments"]) / elements(w["moments"]) for r, w in zip(zero, whole, strict=True)]
        assert all(s < 0.75 for s in held), (kind, held)  # every rank holds a share, not the whole
    experts = [{n for n in r["moments"] if "local_experts" in n} for r in four["moe-zero"]]
    assert experts[0] and not experts[0] & experts[2]  # ranks 0 and 2: one expert-DP group (EP rank 0)
    for kind, model in (("moe", "moe"), ("pp2", "tied"), ("tp2", "dense")):  # PP 2: the tied embedding's copies
        resumed = [run(("", model, {}, str(tmp_path / f"{kind}-zero"), ""), dirs, DataParallel())]
        assert_same_step(four[f"{kind}-zero"], resumed, shape_of(models[model]))
    two = spawn(2, [("dp2", "dense", ZERO, str(tmp_path / "tp2-zero"), "")], dirs, tmp_path / "two")
    assert_same_step(four["tp2-zero"], two["dp2"], shape_of(models["dense"]))
