"""Resuming a Megatron checkpoint on other (TP, PP, EP) sizes (trainer/megatron/reshard.py).

Written directly (one process, the tiny Qwen3 and Qwen3-MoE, whose experts split over TP too): a checkpoint of
random parameters and AdamW moments at one layout, its optimizer's parameters in a shuffled order, is rebuilt at
every other layout, rank by rank, into exactly the shards that layout's own split of the same tensors holds
(parameters, both moments, step), reading only the files that rank needs; what cannot be resharded is refused in
one line.

Trained (spawned gloo ranks): a run saves after one step at TP=2, PP=2 or EP=2 on two ranks (or TP=1 on one) and
takes a second; a fresh backend on one rank (or two at TP=2) loads that checkpoint and takes the same second step:
the published weights and every AdamW moment (gathered to Hugging Face names) agree within 1e-6, the step counts,
the learning rate and the schedule's position are equal."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_jobs import Job, assert_same_step, run, spawn
from safetensors.torch import save_file
from torch import Tensor

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.megatron.convert import (
    Qwen3Shape,
    by_expert,
    by_stage,
    to_megatron,
)
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.megatron.reshard import Sizes, rebuild, saved_sizes, stem, write_sizes
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm

FIELDS = ("param", "exp_avg", "exp_avg_sq")
Coords = tuple[int, int, int]  # (TP, PP, EP) rank


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron-reshard")
    yield {"tied": build_tiny_model(tmp / "tied", TinyModelConfig(num_layers=4)),
           "untied": build_tiny_model(tmp / "untied", TinyModelConfig(tie_embeddings=False, seed=3)),
           "moe": build_tiny_model(tmp / "moe", TinyModelConfig(kind="moe"))}  # fmt: skip
    release_groups()  # the one-rank process group the backend made in this process


def shape_of(model_dir: Path) -> Qwen3Shape:
    return Qwen3Shape.of(load_causal_lm(str(model_dir), dtype="float32", device="cpu").config)


# -- written directly -------------------------------------------------------------------------------------------


def split(hf: Mapping[str, Tensor], shape: Qwen3Shape, sizes: Sizes) -> dict[Coords, dict[str, Tensor]]:
    """Every (TP, PP, EP) rank's local tensors of an HF-named state, split as build.load_policy splits a checkpoint."""
    out = {}
    for k, shard in enumerate(to_megatron(hf, shape, sizes.tp)):
        for s, stage in enumerate(by_stage(shard, shape, sizes.pp) if sizes.pp > 1 else [shard]):
            for j, part in enumerate(by_expert(stage, shape, sizes.ep) if sizes.ep > 1 else [stage]):
                out[(k, s, j)] = part
    return out


def random_state(model_dir: Path, seed: int) -> dict[str, dict[str, Tensor]]:
    """{field: HF-named tensors}: the model's parameters and random moments (exp_avg_sq positive)."""
    params = load_causal_lm(str(model_dir), dtype="float32", device="cpu").state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {"param": params,
            "exp_avg": {n: torch.randn(t.shape, generator=gen) for n, t in params.items()},
            "exp_avg_sq": {n: torch.rand(t.shape, generator=gen) for n, t in params.items()}}  # fmt: skip


def write(directory: Path, state: dict[str, dict[str, Tensor]], shape: Qwen3Shape, sizes: Sizes, *,
          record: bool = True) -> None:  # fmt: skip
    """A checkpoint as MegatronLayout.save writes one (record=False: as it did before sizes and names were kept),
    each rank's optimizer holding its parameters in a shuffled order, step 3."""
    directory.mkdir(parents=True)
    fields = {f: split(state[f], shape, sizes) for f in FIELDS}
    group = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3).state_dict()["param_groups"][0]
    for (k, s, j), params in fields["param"].items():
        name = stem(sizes, k, s, j)
        save_file(params, str(directory / f"{name}.safetensors"))
        order = [list(params)[i] for i in torch.randperm(len(params)).tolist()]
        moments = {i: {"step": torch.tensor(3.0), **{f: fields[f][(k, s, j)][n] for f in FIELDS[1:]}}
                   for i, n in enumerate(order)}  # fmt: skip
        optimizer = {"state": moments, "param_groups": [{**group, "params": list(range(len(order)))}]}
        extra = {"optimizer": optimizer, "scheduler": {"last_epoch": 3}, "torch_rng": torch.get_rng_state()}
        torch.save({**extra, "param_names": order} if record else extra, directory / f"{name}.pt")
    if record:
        write_sizes(directory, sizes)


def layouts(shape: Qwen3Shape) -> list[Sizes]:
    if shape.experts:  # TP 2: each expert split over the TP ranks as well (sequence parallel's layout)
        return [*(Sizes(ep=ep) for ep in (1, 2, 4, 8)), Sizes(2), Sizes(2, ep=2)]
    return [Sizes(tp, pp) for tp in (1, 2) for pp in (1, 2, 4) if shape.num_layers % pp == 0]


def check_rebuilt(directory: Path, state: dict[str, dict[str, Tensor]], shape: Qwen3Shape, saved: Sizes,
                  here: Sizes) -> dict[Coords, frozenset[str]]:  # fmt: skip
    """Every rank of `here` rebuilt from `directory` holds exactly its own split of `state`; the files each read."""
    want = {f: split(state[f], shape, here) for f in FIELDS}
    read = {}
    for coords, params in want["param"].items():
        got = rebuild(directory, shape, saved, here, *coords)
        assert set(got.params) == set(params)
        for name, tensor in params.items():
            assert torch.equal(got.params[name], tensor), (here, coords, name)
            assert float(got.moments[name]["step"]) == 3.0
            for f in FIELDS[1:]:
                assert torch.equal(got.moments[name][f], want[f][coords][name]), (here, coords, name, f)
        assert got.extra["scheduler"] == {"last_epoch": 3}
        read[coords] = got.read
    return read


SAVED = [("tied", Sizes(2, 2)), ("tied", Sizes(1, 4)), ("tied", Sizes(1, 1)), ("untied", Sizes(2, 2)),
         ("moe", Sizes(ep=2)), ("moe", Sizes(ep=8)), ("moe", Sizes(2, ep=2))]  # fmt: skip


@pytest.mark.parametrize(("kind", "saved"), SAVED)
def test_every_rank_of_another_layout_rebuilds_its_shards_and_moments_exactly(
    models: dict[str, Path], tmp_path: Path, kind: str, saved: Sizes
) -> None:
    shape = shape_of(models[kind])
    state = random_state(models[kind], seed=1)
    write(tmp_path / "ckpt", state, shape, saved)
    assert saved_sizes(tmp_path / "ckpt") == saved
    for here in layouts(shape):
        if here != saved:
            check_rebuilt(tmp_path / "ckpt", state, shape, saved, here)


def test_a_rank_reads_only_the_files_that_hold_what_it_needs(models: dict[str, Path], tmp_path: Path) -> None:
    tied, moe = shape_of(models["tied"]), shape_of(models["moe"])
    dense = random_state(models["tied"], seed=2)
    write(tmp_path / "tp2pp2", dense, tied, Sizes(2, 2))
    read = check_rebuilt(tmp_path / "tp2pp2", dense, tied, Sizes(2, 2), Sizes(1, 4))
    assert read[(0, 0, 0)] == {"megatron-tp00-pp00", "megatron-tp01-pp00"}  # layer 0 and the embedding
    # layer 3, the final norm and the tied embedding's copy: from the saved last stage's own copy
    assert read[(0, 3, 0)] == {"megatron-tp00-pp01", "megatron-tp01-pp01"}
    read = check_rebuilt(tmp_path / "tp2pp2", dense, tied, Sizes(2, 2), Sizes(2, 1))
    assert read[(1, 0, 0)] == {f"megatron-tp{k:02d}-pp{s:02d}" for k in (0, 1) for s in (0, 1)}
    experts = random_state(models["moe"], seed=3)
    write(tmp_path / "ep2", experts, moe, Sizes(ep=2))
    read = check_rebuilt(tmp_path / "ep2", experts, moe, Sizes(ep=2), Sizes(ep=4))
    assert read[(0, 0, 3)] == {"megatron-tp00-ep01"}  # experts 6 and 7, and the rest, from EP rank 1
    write(tmp_path / "ep8", experts, moe, Sizes(ep=8))
    read = check_rebuilt(tmp_path / "ep8", experts, moe, Sizes(ep=8), Sizes(ep=2))
    assert read[(0, 0, 1)] == {f"megatron-tp00-ep{j:02d}" for j in (4, 5, 6, 7)}


def test_what_cannot_be_resharded_is_refused_in_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    tied, untied = shape_of(models["tied"]), shape_of(models["untied"])
    state = random_state(models["tied"], seed=4)
    write(tmp_path / "old", state, tied, Sizes(2), record=False)
    assert saved_sizes(tmp_path / "old") == Sizes(2)  # before megatron.json: from the file names
    old = r"^megatron-tp00\.pt was written before the megatron backend recorded its optimizer's parameter names: "
    with pytest.raises(ValueError, match=old + r"resume it on TP=2, PP=1, EP=1, the sizes it was saved at$"):
        rebuild(tmp_path / "old", tied, Sizes(2), Sizes(1), 0)
    write(tmp_path / "other", random_state(models["untied"], seed=4), untied, Sizes(2))
    with pytest.raises(ValueError, match=r"^megatron-tp00\.safetensors holds other parameters than this model's at "
                                         r"TP=2, PP=1, EP=1 .*: the checkpoint is of another model$"):  # fmt: skip
        rebuild(tmp_path / "other", tied, Sizes(2), Sizes(1), 0)
    write(tmp_path / "cut", state, tied, Sizes(2, 2))
    (tmp_path / "cut" / "megatron-tp01-pp01.safetensors").unlink()
    with pytest.raises(ValueError, match=r"^it holds no megatron-tp01-pp01\.safetensors \(saved at TP=2, PP=2, EP=1: "
                                         r"a file is missing\)$"):  # fmt: skip
        rebuild(tmp_path / "cut", tied, Sizes(2, 2), Sizes(1, 1), 0)
    write(tmp_path / "steps", state, tied, Sizes(2))
    extra = torch.load(tmp_path / "steps" / "megatron-tp01.pt", weights_only=True)
    extra["optimizer"]["state"][0]["step"] = torch.tensor(4.0)
    torch.save(extra, tmp_path / "steps" / "megatron-tp01.pt")
    with pytest.raises(ValueError, match=r"^\S+: its TP shards' optimizer steps differ \(\[3\.0, 4\.0\]\)$"):
        rebuild(tmp_path / "steps", tied, Sizes(2), Sizes(1), 0)


# -- trained ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two spawned ranks: TP=2, PP=2 and EP=2 runs that save after one step and take a second (never restarted),
    and TP=2 resuming the checkpoint this process saved at TP=1 on one rank (which took a second step too)."""
    tmp = tmp_path_factory.mktemp("trained")
    dirs = {k: str(v) for k, v in models.items()}
    one = run(("tp1", "untied", {}, "", str(tmp / "tp1")), dirs, DataParallel())
    jobs: list[Job] = [("tp2", "untied", {"tensor_parallel": 2}, "", str(tmp / "tp2")),
                       ("tp1-on-tp2", "untied", {"tensor_parallel": 2}, str(tmp / "tp1"), ""),
                       ("pp2", "tied", {"pipeline_parallel": 2}, "", str(tmp / "pp2")),
                       ("ep2", "moe", {"expert_parallel": 2}, "", str(tmp / "ep2"))]  # fmt: skip
    return {"tp1": [one], **spawn(2, jobs, dirs, tmp / "rank"), "dir": tmp, "dirs": dirs}


def resume_here(trained: dict[str, Any], saved: str, model: str) -> list[dict[str, Any]]:
    """One rank at TP = PP = EP = 1 resuming the checkpoint `saved`, and its next step."""
    return [run(("", model, {}, str(trained["dir"] / saved), ""), trained["dirs"], DataParallel())]


def test_a_tp2_checkpoint_resumes_on_one_rank_at_tp1(trained: dict[str, Any], models: dict[str, Path]) -> None:
    assert sorted(p.name for p in (trained["dir"] / "tp2").glob("step-*/megatron*")) == [
        "megatron-tp00.pt", "megatron-tp00.safetensors", "megatron-tp01.pt", "megatron-tp01.safetensors",
        "megatron.json"]  # fmt: skip
    assert_same_step(trained["tp2"], resume_here(trained, "tp2", "untied"), shape_of(models["untied"]))


def test_a_tp1_checkpoint_resumes_on_two_ranks_at_tp2(trained: dict[str, Any], models: dict[str, Path]) -> None:
    assert_same_step(trained["tp1"], trained["tp1-on-tp2"], shape_of(models["untied"]))


def test_a_pp2_checkpoint_resumes_on_one_rank_at_pp1(trained: dict[str, Any], models: dict[str, Path]) -> None:
    assert_same_step(trained["pp2"], resume_here(trained, "pp2", "tied"), shape_of(models["tied"]))


def test_an_ep2_checkpoint_resumes_on_one_rank_at_ep1(trained: dict[str, Any], models: dict[str, Path]) -> None:
    assert_same_step(trained["ep2"], resume_here(trained, "ep2", "moe"), shape_of(models["moe"]))


@pytest.mark.slow
def test_four_ranks_at_tp2_x_pp2_and_ep4_resume_on_one_and_one_on_four(models: dict[str, Path], tmp_path: Path) -> None:
    dirs = {k: str(v) for k, v in models.items()}
    one = run(("tp1", "tied", {}, "", str(tmp_path / "tp1")), dirs, DataParallel())
    mp_sizes = {"tensor_parallel": 2, "pipeline_parallel": 2}
    jobs: list[Job] = [("tp2pp2", "tied", mp_sizes, "", str(tmp_path / "tp2pp2")),
                       ("tp1-on-tp2pp2", "tied", mp_sizes, str(tmp_path / "tp1"), ""),
                       ("ep4", "moe", {"expert_parallel": 4}, "", str(tmp_path / "ep4"))]  # fmt: skip
    four = spawn(4, jobs, dirs, tmp_path / "rank")
    trained = {"dir": tmp_path, "dirs": dirs}
    assert_same_step(four["tp2pp2"], resume_here(trained, "tp2pp2", "tied"), shape_of(models["tied"]))
    assert_same_step([one], four["tp1-on-tp2pp2"], shape_of(models["tied"]))
    assert_same_step(four["ep4"], resume_here(trained, "ep4", "moe"), shape_of(models["moe"]))
