"""trainer.megatron.sequence_parallel on CPU (gloo): with tensor parallel, each rank holds 1/tp of every row's
positions outside the split matmuls (trainer/megatron/sequence.py); Qwen3-MoE trains with TP only so, its experts
split over the TP ranks as the dense MLP is.

Conversion of Qwen3-MoE at TP 2 is exact both ways. Over two spawned gloo ranks at TP 2 with SP, each against one
rank on the same batch (float32): the logprobs and entropy of a forward, a GRPO step's loss, gradient norm and
(R3 on, random traces) routing_mismatch, and the weights it publishes under HF names: Qwen3-MoE padded and packed,
dense Qwen3 padded and packed (rows of lengths no multiple of 2: the padding to a multiple of TP is exercised).
The MoE run's checkpoint resumes on one rank (resharded, AdamW's moments with it) and takes the step the TP 2 run
takes next. Slow tier, four ranks: TP 2 x EP 2 and TP 2 x PP 2 with Qwen3-MoE. What is not built is refused
naming the key to change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import assert_weights_close, fixed_batch, join_ranks, leave_ranks, spawn_ranks

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint_ranks
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, to_hf, to_megatron
from miles_stream.trainer.megatron.model import build_gpt
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs, packed_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a frozen reference (sequence-parallel too), the entropy
TRACE = (8, 2, 2)  # the tiny Qwen3-MoE's experts, layers, top-k: a routing trace for every group but the third
METRICS = ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens")
# (name, model, trainer.megatron sizes, packed, checkpoint the step and take one more)
Job = tuple[str, str, dict[str, int], bool, bool]
TWO_RANKS: list[Job] = [("moe", "moe", {}, False, True), ("dense-packed", "dense", {}, True, False)]
TWO_RANKS_SLOW: list[Job] = [("moe-packed", "moe", {}, True, False), ("dense", "dense", {}, False, False)]
FOUR_RANKS: list[Job] = [("tp2-ep2", "moe", {"expert_parallel": 2}, False, True),
                         ("tp2-pp2", "moe", {"pipeline_parallel": 2}, True, False)]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron-sp")
    yield {"dense": build_tiny_model(tmp / "dense"), "moe": build_tiny_model(tmp / "moe", TinyModelConfig(kind="moe"))}
    release_groups()  # the one-rank process group the backend made in this process


def config(model_dir: Path, *, packed: bool = False, **megatron: Any) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         pack_sequences=packed, routing_replay=True,  # (R3: MoE only)
                         megatron=MegatronConfig(**megatron))  # fmt: skip


def batch_of(model_dir: Path, kind: str, seed: int = 0) -> RolloutBatch:
    return fixed_batch(model_dir, seed=seed, trace=TRACE if kind == "moe" else None)


def outcome(backend: Any, batch: RolloutBatch, train: RolloutBatch, *, packed: bool) -> dict[str, Any]:
    """The logprobs and entropy of one forward on `batch`, then the metrics of a step on `train` and the weights
    published after it."""
    x = packed_inputs(batch, "cpu") if packed else micro_inputs(batch, "cpu")
    with torch.no_grad():
        logp, entropy = response_logprobs(backend.model, x, temperature=1.0)
    metrics = backend.train(train)
    return {"logp": logp, "entropy": entropy, "metrics": metrics,
            "weights": {n: t.clone() for n, t in backend.weights()[0].items()}}  # fmt: skip


def run(job: Job, dirs: dict[str, str], parallel: DataParallel, ckpt: Path) -> dict[str, Any]:
    """A spawned rank's job: TP 2 with SP (and the job's other sizes); each rank reads its own half of the batch
    (the model-parallel group trains the union; with EP, each TP group its own half)."""
    name, kind, sizes, packed, resume = job
    model_dir = Path(dirs[kind])
    backend: Any = build_backend(config(model_dir, packed=packed, tensor_parallel=2, sequence_parallel=True, **sizes),
                                 ALGO, temperature=1.0, parallel=parallel)  # fmt: skip
    per = 16 // parallel.world
    rows = list(range(parallel.rank * per, (parallel.rank + 1) * per))
    batch = batch_of(model_dir, kind)
    ep = sizes.get("expert_parallel", 1)
    # the forward: the whole batch on a TP group (its ranks run it together); with EP, each TP group its half
    forward = batch.rows(list(range(8 * (parallel.rank // 2), 8 * (parallel.rank // 2 + 1)))) if ep > 1 else batch
    seen: list[int] = []  # the positions the first layer's norm sees in the forward: this rank's chunk
    norm = backend.model.gpt.decoder.layers[0].input_layernorm if backend.groups.first_stage else None
    hook = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0])) if norm else None
    out = outcome(backend, forward, batch.rows(rows), packed=packed)
    x = packed_inputs(forward, "cpu") if packed else micro_inputs(forward, "cpu")
    out["positions"] = (seen[0] if seen else None, x.input_ids.shape[1])  # (seen, the rows' length)
    if hook is not None:
        hook.remove()
    out["local"] = {n: tuple(p.shape) for n, p in backend.model.gpt.named_parameters()}
    if resume:
        save_checkpoint_ranks(ckpt / name, TrainerState(step=1, version=1, claims=()), backend.save, parallel)
        out["next"] = backend.train(batch_of(model_dir, kind, seed=2).rows(rows))
        out["next_weights"] = {n: t.clone() for n, t in backend.weights()[0].items()}
    return out


def _worker(rank: int, world: int, port: int, jobs: list[Job], dirs: dict[str, str], out: str) -> None:
    parallel = join_ranks(rank, world, port)
    torch.save({job[0]: run(job, dirs, parallel, Path(out).parent / "ckpt") for job in jobs}, f"{out}.{rank}")
    leave_ranks(parallel)


def one_rank(model_dir: Path, kind: str, packed: bool) -> dict[str, Any]:
    backend = build_backend(config(model_dir, packed=packed), ALGO, temperature=1.0, parallel=DataParallel())
    batch = batch_of(model_dir, kind)
    return outcome(backend, batch, batch, packed=packed)


def assert_same(got: dict[str, Any], want: dict[str, Any], mask: torch.Tensor, *, rows: list[int] | None = None,
                routed: bool) -> None:  # fmt: skip
    logp, entropy = (want[k] if rows is None else want[k][rows] for k in ("logp", "entropy"))
    mask = mask if rows is None else mask[rows]
    t = got["logp"].shape[1]  # (a share's rows may be shorter than the batch's longest)
    torch.testing.assert_close(got["logp"][mask[:, :t]], logp[:, :t][mask[:, :t]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["entropy"][mask[:, :t]], entropy[:, :t][mask[:, :t]], atol=1e-5, rtol=1e-5)
    for name in METRICS + (("routing_mismatch",) if routed else ()):
        assert got["metrics"][name] == pytest.approx(want["metrics"][name], rel=1e-5, abs=1e-7), name
    assert_weights_close(got["weights"], want["weights"])


def assert_resumes_on_one_rank(got: dict[str, Any], model_dir: Path, ckpt: Path) -> None:
    """The checkpoint of a TP 2 (SP) step loaded on one rank (resharded) takes the step the TP 2 run took next."""
    single: Any = build_backend(config(model_dir), ALGO, temperature=1.0, parallel=DataParallel())
    assert load_checkpoint(ckpt, single.load) is not None
    metrics = single.train(batch_of(model_dir, "moe", seed=2))
    for name in (*METRICS, "routing_mismatch"):
        assert metrics[name] == pytest.approx(got["next"][name], rel=1e-5, abs=1e-7), name
    assert_weights_close(dict(single.weights()[0]), got["next_weights"])


def test_qwen3_moe_conversion_at_tp2_is_exact_both_ways(models: dict[str, Path]) -> None:
    hf = load_causal_lm(str(models["moe"]), dtype="float32", device="cpu")
    state, shape = hf.state_dict(), Qwen3Shape.of(hf.config)
    shards = to_megatron(state, shape, tp=2)
    fc1 = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    fc2 = fc1.replace("fc1", "fc2")
    assert shards[0][fc1].shape == (shape.expert_ffn, shape.hidden)  # half the gate rows, then half the up rows
    assert shards[1][fc2].shape == (shape.hidden, shape.expert_ffn // 2)
    gate, up = state["model.layers.1.mlp.experts.gate_up_proj"][3].chunk(2)
    assert torch.equal(shards[1][fc1], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    back = to_hf(shards, shape)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_sequence_parallel_refuses_what_is_not_built_naming_the_key(models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.megatron\.sequence_parallel: .*only with tensor_parallel > 1"):
        MegatronConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"trainer\.megatron\.sequence_parallel: is not built with context_par"):
        MegatronConfig(tensor_parallel=2, context_parallel=2, sequence_parallel=True)
    moe = load_causal_lm(str(models["moe"]), dtype="float32", device="cpu").config
    with pytest.raises(ConfigError, match=r"tensor_parallel=2 with Qwen3-MoE needs sequence parallelism.*"
                                          r"trainer\.megatron\.sequence_parallel true"):  # fmt: skip
        build_gpt(moe, tp=2, device="cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"tensor_parallel=3 must divide the model's num_key_value_heads"):
        Qwen3Shape.of(moe).check_split(3)


def check_two_ranks(jobs: list[Job], models: dict[str, Path], tmp_path: Path) -> list[dict[str, Any]]:
    """Run `jobs` on two spawned ranks at TP 2 with SP and hold each to one rank's outcome; every rank's results."""
    out = tmp_path / "rank"
    ranks = spawn_ranks(_worker, 2, out, jobs, {k: str(v) for k, v in models.items()}, str(out))
    for name, kind, _, packed, _ in jobs:
        want = one_rank(models[kind], kind, packed)
        mask = batch_of(models[kind], kind).mask_BT.bool()
        for r, got in enumerate(ranks):
            try:
                assert_same(got[name], want, mask, routed=kind == "moe")
            except AssertionError as e:
                raise AssertionError(f"{name}, rank {r}: {e}") from e
            seen, length = got[name]["positions"]
            assert seen == -(-length // 2), name  # the rows padded to a multiple of 2, then halved
    return ranks


# two processes each import Megatron and build four models (a policy and a frozen reference a job): about 30 s on
# this 2-core machine with the one-rank references and the resume
def test_tp2_with_sequence_parallel_takes_the_step_one_rank_takes(models: dict[str, Path], tmp_path: Path) -> None:
    ranks = check_two_ranks(TWO_RANKS, models, tmp_path)
    assert any(r[name]["positions"][1] % 2 for r in ranks for name, *_ in TWO_RANKS)  # a row length padded
    moe = ranks[0]["moe"]
    assert moe["metrics"]["routing_mismatch"] > 0.5  # random traces, replayed: the one rank's count, over 2 ranks
    h, fe = 64, 128  # the tiny Qwen3-MoE: each rank holds half of every expert, the router whole
    assert moe["local"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"] == (fe, h)
    assert moe["local"]["decoder.layers.0.mlp.router.weight"] == (8, h)
    assert_resumes_on_one_rank(moe, models["moe"], tmp_path / "ckpt" / "moe")


@pytest.mark.slow
def test_tp2_with_sequence_parallel_packed_moe_and_padded_dense_take_the_one_rank_step(
    models: dict[str, Path], tmp_path: Path
) -> None:
    check_two_ranks(TWO_RANKS_SLOW, models, tmp_path)


@pytest.mark.slow
def test_tp2_sp_with_expert_or_pipeline_parallel_takes_the_step_one_rank_takes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "rank"
    ranks = spawn_ranks(_worker, 4, out, FOUR_RANKS, {k: str(v) for k, v in models.items()}, str(out))
    for name, kind, sizes, packed, resume in FOUR_RANKS:
        want = one_rank(models[kind], kind, packed)
        mask = batch_of(models[kind], kind).mask_BT.bool()
        ep = sizes.get("expert_parallel", 1) > 1
        for r, got in enumerate(ranks):
            rows = list(range(8 * (r // 2), 8 * (r // 2 + 1))) if ep else None
            try:
                assert_same(got[name], want, mask, rows=rows, routed=True)
            except AssertionError as e:
                raise AssertionError(f"{name}, rank {r}: {e}") from e
        if resume:
            assert_resumes_on_one_rank(ranks[0][name], models[kind], tmp_path / "ckpt" / name)
