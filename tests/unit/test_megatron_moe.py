"""trainer.backend megatron with Qwen3-MoE on CPU: Megatron's GPTModel (SequentialMLP experts, top-k routers)
built from the tiny Qwen3-MoE checkpoint against the Hugging Face model and the torch backend on the same weights
and batch. Conversion both ways is exact (either HF expert layout in, transformers' in-memory layout out); with
Rollout Routing Replay (R3) the forward routes recorded tokens as recorded and its logprobs are the HF model's
under the torch backend's replay; a GRPO step with replay gives the torch backend's loss, gradient norm,
routing_mismatch and updated weights (routers included), on one rank and over two data-parallel gloo ranks.
Tensor parallel with MoE (sequence parallel): tests/unit/test_megatron_sp.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import assert_weights_close, fixed_batch, join_ranks, leave_ranks, own_routes, spawn_ranks
from safetensors.torch import load_file

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, to_hf, to_megatron
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs
from miles_stream.trainer.torch.routing_replay import RoutingReplay, replay_inputs

EXPERTS, TOPK, LAYERS = 8, 2, 2
TRACE = (EXPERTS, LAYERS, TOPK)  # a routing trace for every sample (but the third group's)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build_tiny_model(tmp_path_factory.mktemp("megatron-moe"), TinyModelConfig(kind="moe"))
    release_groups()  # the one-rank process group the backend made in this process


def config(model_dir: Path, **overrides: Any) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         megatron=MegatronConfig(), **overrides)  # fmt: skip


def replayed(replay: Any, model: Any, batch: RolloutBatch) -> tuple[torch.Tensor, int, int]:
    """(logprobs [B, T], differing tokens, recorded tokens) of one forward of `model` with the batch's traces
    given to `replay` (either backend's), as the train step drives it."""
    replay.begin(replay_inputs(batch.routing, batch.lengths, packed=False, device="cpu"))
    with torch.no_grad():
        logp, _ = response_logprobs(model, micro_inputs(batch, "cpu"), temperature=0.7)
    replay.end_forward()
    replay.end()
    differing, recorded = replay.take_counts()
    return logp, differing, recorded


def hf_logprobs(model_dir: Path, batch: RolloutBatch, *, replay: bool) -> tuple[torch.Tensor, float]:
    """(logprobs [B, T], fraction of recorded tokens whose own routing differs) of the HF model, replayed through
    the torch backend's RoutingReplay (or only counted)."""
    hf = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    logp, differing, recorded = replayed(RoutingReplay(hf, replace=replay), hf, batch)
    return logp, differing / recorded


def test_moe_conversion_hf_to_megatron_and_back_is_exact(moe_dir: Path) -> None:
    hf = load_causal_lm(str(moe_dir), dtype="float32", device="cpu")
    state, shape = hf.state_dict(), Qwen3Shape.of(hf.config)
    assert (shape.experts, shape.topk, shape.expert_ffn, shape.norm_topk) == (EXPERTS, TOPK, 128, True)
    shard = to_megatron(state, shape)[0]
    p, m = "model.layers.1.", "decoder.layers.1.mlp."
    assert torch.equal(shard[m + "router.weight"], state[p + "mlp.gate.weight"])
    gate_up, down = state[p + "mlp.experts.gate_up_proj"], state[p + "mlp.experts.down_proj"]
    for e in range(EXPERTS):  # Megatron's fc1: expert e's gate rows, then its up rows; fc2 its down projection
        assert torch.equal(shard[m + f"experts.local_experts.{e}.linear_fc1.weight"], gate_up[e])
        assert torch.equal(shard[m + f"experts.local_experts.{e}.linear_fc2.weight"], down[e])
    back = to_hf([shard], shape)
    assert list(back) == list(state)  # transformers' in-memory names and order (what the torch backend publishes)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    on_disk = load_file(str(moe_dir / "model.safetensors"))  # per-expert gate_proj / up_proj / down_proj names
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in on_disk
    from_disk = to_megatron(on_disk, shape)[0]
    assert set(from_disk) == set(shard)
    for name, tensor in shard.items():
        assert torch.equal(from_disk[name], tensor), name


def test_megatron_moe_logprobs_with_and_without_replay_are_the_hf_models(moe_dir: Path) -> None:
    backend: Any = build_backend(config(moe_dir, routing_replay=True), AlgoConfig(), temperature=0.7,
                                 parallel=DataParallel())  # fmt: skip
    batch = fixed_batch(moe_dir, seed=1, trace=TRACE)
    mask = batch.mask_BT.bool()
    replay = backend.policy.replays[id(backend.model)]
    results = {}
    for replace_ in (False, True):
        want, want_differs = hf_logprobs(moe_dir, batch, replay=replace_)
        replay.replace = replace_
        got, differing, recorded = replayed(replay, backend.model, batch)
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
        assert differing / recorded == want_differs > 0.5  # random traces: most tokens' own top-k differs
        results[replace_] = got
    assert float((results[True] - results[False])[mask].abs().max()) > 1e-3  # the replay changed the routing


def test_replaying_the_models_own_routing_has_no_mismatch_and_changes_nothing(moe_dir: Path) -> None:
    """The trace the rollout engine would record (the HF routers' own top-k): routing_mismatch 0, same logprobs."""
    hf = load_causal_lm(str(moe_dir), dtype="float32", device="cpu")
    batch = fixed_batch(moe_dir, seed=2, trace=TRACE)
    x = micro_inputs(batch, "cpu")
    own = own_routes(hf, batch)
    batch = replace(batch, routing=[own[i, : n - 1] for i, n in enumerate(batch.lengths)])
    backend: Any = build_backend(config(moe_dir, routing_replay=True), AlgoConfig(), temperature=0.7,
                                 parallel=DataParallel())  # fmt: skip
    got, differing, recorded = replayed(backend.policy.replays[id(backend.model)], backend.model, batch)
    assert (differing, recorded) == (0, sum(n - 1 for n in batch.lengths))
    with torch.no_grad():
        want, _ = response_logprobs(hf, x, temperature=0.7)
    mask = batch.mask_BT.bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing_replay", [True, False])
def test_one_megatron_moe_step_is_the_torch_backends_step(moe_dir: Path, routing_replay: bool) -> None:
    batch = fixed_batch(moe_dir, seed=0, trace=TRACE)
    algo = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a reference model (replayed too) and the entropy
    cfg = config(moe_dir, routing_replay=routing_replay)
    torch_backend: Any = build_backend(replace(cfg, backend="torch"), algo, temperature=1.0, parallel=DataParallel())
    megatron: Any = build_backend(cfg, algo, temperature=1.0, parallel=DataParallel())
    want, got = torch_backend.train(batch), megatron.train(batch)
    for name in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens", "routing_mismatch"):
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name
    assert got["routing_mismatch"] > 0.5
    published, dtype = megatron.weights()
    expected, want_dtype = torch_backend.weights()
    assert dtype == want_dtype and list(published) == list(expected)
    fresh = load_causal_lm(str(moe_dir), dtype="float32", device="cpu").state_dict()
    assert_weights_close(published, expected)
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj"):
        assert float((published[name] - fresh[name]).abs().max()) > 1e-4, name  # routers and experts trained


def test_moe_publication_and_hf_export_carry_the_torch_backends_names(moe_dir: Path, tmp_path: Path) -> None:
    megatron: Any = build_backend(config(moe_dir), AlgoConfig(), temperature=1.0, parallel=DataParallel())
    published, _ = megatron.weights()
    hf = load_causal_lm(str(moe_dir), dtype="float32", device="cpu").state_dict()
    assert list(published) == list(hf)
    for name, tensor in hf.items():
        assert published[name].dtype == tensor.dtype and torch.equal(published[name], tensor), name
    megatron.export_hf(tmp_path / "export")
    exported = load_causal_lm(str(tmp_path / "export"), dtype="float32", device="cpu").state_dict()
    for name, tensor in hf.items():
        assert torch.equal(exported[name], tensor), name


def test_megatron_moe_refuses_what_is_not_built(moe_dir: Path, tmp_path: Path) -> None:
    # (MoE with tensor parallel but without sequence parallel: tests/unit/test_megatron_sp.py)
    mixed = build_tiny_model(tmp_path / "mixed", TinyModelConfig(kind="moe"))
    text = (mixed / "config.json").read_text().replace('"mlp_only_layers": []', '"mlp_only_layers": [1]')
    (mixed / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="every layer sparse"):
        build_backend(config(mixed), AlgoConfig(), temperature=1.0, parallel=DataParallel())


def _dp_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    parallel = join_ranks(rank, world, port)
    backend: Any = build_backend(config(Path(model_dir), routing_replay=True), AlgoConfig(entropy_coef=0.01),
                                 temperature=1.0, parallel=parallel)  # fmt: skip
    batch = fixed_batch(Path(model_dir), seed=0, trace=TRACE)
    half = batch.size // world  # each data-parallel rank trains its own share
    metrics = backend.train(batch.rows(list(range(rank * half, (rank + 1) * half))))
    published, _ = backend.weights()
    torch.save({"metrics": metrics, "weights": {n: t.clone() for n, t in published.items()}}, f"{out}.{rank}")
    leave_ranks(parallel)


@pytest.mark.slow  # ~20 s: two spawned processes each import Megatron and build the model
def test_two_data_parallel_gloo_ranks_with_replay_take_the_step_one_rank_takes(moe_dir: Path, tmp_path: Path) -> None:
    """Each rank replays its own share's traces; the loss, gradient norm and routing_mismatch are summed over the
    ranks, and both end with one rank's weights after the whole batch."""
    out = tmp_path / "rank"
    ranks = spawn_ranks(_dp_worker, 2, out, str(moe_dir), str(out))
    single: Any = build_backend(config(moe_dir, routing_replay=True), AlgoConfig(entropy_coef=0.01),
                                temperature=1.0, parallel=DataParallel())  # fmt: skip
    metrics = single.train(fixed_batch(moe_dir, seed=0, trace=TRACE))
    published, _ = single.weights()
    for got in ranks:
        for name in ("loss", "pg_loss", "entropy", "grad_norm", "tokens", "routing_mismatch"):
            assert got["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
        assert_weights_close(got["weights"], published)
