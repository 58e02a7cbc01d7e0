"""trainer.backend megatron on CPU (gloo): Megatron-core's GPTModel built from the tiny Qwen3 checkpoint against
the Hugging Face model and the torch backend on the same weights and batch: conversion both ways is exact, the
forward's logprobs and entropy are the HF model's, one training step gives the torch backend's loss, gradient
norm and updated weights, publication carries HF names and shapes, a checkpoint resumes exactly, the HF export
loads back; and tensor parallel over two spawned gloo ranks takes the step one rank takes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import assert_weights_close, fixed_batch, join_ranks, leave_ranks, one_rank_step, spawn_ranks

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint_ranks
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, to_hf, to_megatron
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron")
    yield {"tied": build_tiny_model(tmp / "tied"),
           "untied": build_tiny_model(tmp / "untied", TinyModelConfig(tie_embeddings=False, seed=3))}  # fmt: skip
    release_groups()  # the one-rank process group the backend made in this process


def config(model_dir: Path, **megatron: int) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         megatron=MegatronConfig(**megatron))  # fmt: skip


@pytest.mark.parametrize("kind", ["tied", "untied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_conversion_hf_to_megatron_and_back_is_exact(models: dict[str, Path], kind: str, tp: int) -> None:
    hf = load_causal_lm(str(models[kind]), dtype="float32", device="cpu")
    state = hf.state_dict()
    shape = Qwen3Shape.of(hf.config)
    shards = to_megatron(state, shape, tp)
    assert len(shards) == tp
    qkv = shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 16 // tp, 64)  # (heads + 2 groups) x head dim, split over ranks
    assert ("output_layer.weight" in shards[0]) == (kind == "untied")
    back = to_hf(shards, shape)
    assert list(back) == list(state)  # every HF name, in transformers' order (lm_head too when tied)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_and_fc1_are_fused_as_megatron_lays_them_out(models: dict[str, Path]) -> None:
    """Per query group: its heads' q rows, then k, then v; fc1: this rank's gate rows, then its up rows."""
    hf = load_causal_lm(str(models["tied"]), dtype="float32", device="cpu").state_dict()
    shards = to_megatron(
        hf, Qwen3Shape.of(load_causal_lm(str(models["tied"]), dtype="float32", device="cpu").config), 2
    )
    p = "model.layers.1."
    qkv = shards[1]["decoder.layers.1.self_attention.linear_qkv.weight"]  # rank 1: group 1 of 2
    assert torch.equal(qkv[:32], hf[p + "self_attn.q_proj.weight"][32:64])  # heads 2 and 3
    assert torch.equal(qkv[32:48], hf[p + "self_attn.k_proj.weight"][16:32])
    assert torch.equal(qkv[48:64], hf[p + "self_attn.v_proj.weight"][16:32])
    fc1 = shards[1]["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:64], hf[p + "mlp.gate_proj.weight"][64:])
    assert torch.equal(fc1[64:], hf[p + "mlp.up_proj.weight"][64:])


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_megatron_logprobs_and_entropy_are_the_hf_models(models: dict[str, Path], kind: str) -> None:
    backend: Any = build_backend(config(models[kind]), AlgoConfig(), temperature=0.7, parallel=DataParallel())
    hf = load_causal_lm(str(models[kind]), dtype="float32", device="cpu")
    batch = fixed_batch(models[kind], seed=1)
    x, mask = micro_inputs(batch, "cpu"), batch.mask_BT.bool()
    with torch.no_grad():
        want, want_h = response_logprobs(hf, x, temperature=0.7)
        for fused in (True, False):
            got, got_h = response_logprobs(backend.model, x, temperature=0.7, fused=fused)
            torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_h[mask], want_h[mask], atol=1e-5, rtol=1e-5)
        backend.model.gpt.decoder.layers[0].mlp.linear_fc2.weight.mul_(1.5)  # (the comparison can fail)
        moved, _ = response_logprobs(backend.model, x, temperature=0.7)
    assert float((moved - want)[mask].abs().max()) > 1e-3


def test_one_megatron_step_is_the_torch_backends_step(models: dict[str, Path]) -> None:
    model_dir = models["tied"]
    batch = fixed_batch(model_dir, seed=0)
    algo = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a reference model and the entropy's gradient too
    torch_backend: Any = build_backend(replace(config(model_dir), backend="torch"), algo, temperature=1.0,
                                       parallel=DataParallel())  # fmt: skip
    megatron: Any = build_backend(config(model_dir), algo, temperature=1.0, parallel=DataParallel())
    want, got = torch_backend.train(batch), megatron.train(batch)
    for name in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens"):
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name
    published, dtype = megatron.weights()
    expected, want_dtype = torch_backend.weights()
    assert dtype == want_dtype
    fresh = load_causal_lm(str(model_dir), dtype="float32", device="cpu").state_dict()
    assert_weights_close(published, expected)
    assert max(float((fresh[n] - t).abs().max()) for n, t in published.items()) > 1e-4  # the step moved them


def test_published_tensors_carry_hf_names_shapes_and_dtypes(models: dict[str, Path]) -> None:
    for kind in ("tied", "untied"):
        megatron: Any = build_backend(config(models[kind]), AlgoConfig(), temperature=1.0, parallel=DataParallel())
        published, _ = megatron.weights()
        hf = load_causal_lm(str(models[kind]), dtype="float32", device="cpu").state_dict()
        assert list(published) == list(hf)
        for name, tensor in hf.items():
            assert published[name].shape == tensor.shape and published[name].dtype == tensor.dtype, name
            assert torch.equal(published[name], tensor), name  # before any step: the checkpoint itself


def test_bf16_parameters_are_bf16_norms_included_and_publish_as_the_hf_bf16_model(models: dict[str, Path]) -> None:
    """trainer.main_params_dtype bfloat16: every parameter in bf16, the norms too (Megatron's local spec makes them
    float32 whatever params_dtype says, which made each norm's output float32 and unfused on CUDA)."""
    cfg = replace(config(models["untied"]), dtype="bfloat16", main_params_dtype="bfloat16")
    megatron: Any = build_backend(cfg, AlgoConfig(), temperature=1.0, parallel=DataParallel())
    assert {p.dtype for p in megatron.model.parameters()} == {torch.bfloat16}
    published, _ = megatron.weights()
    hf = load_causal_lm(str(models["untied"]), dtype="bfloat16", device="cpu").state_dict()
    assert {n: t.dtype for n, t in published.items()} == {n: t.dtype for n, t in hf.items()}


def test_a_megatron_checkpoint_resumes_exactly_and_exports_a_loadable_hf_model(
    models: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = models["tied"]
    cfg = config(model_dir)
    first: Any = build_backend(cfg, AlgoConfig(), temperature=1.0, parallel=DataParallel())
    first.train(fixed_batch(model_dir, seed=0))
    save_checkpoint_ranks(tmp_path / "ckpt", TrainerState(step=1, version=1, claims=()), first.save, DataParallel())
    second_batch = fixed_batch(model_dir, seed=2)
    after = first.train(second_batch)
    resumed: Any = build_backend(cfg, AlgoConfig(), temperature=1.0, parallel=DataParallel())
    assert load_checkpoint(tmp_path / "ckpt", resumed.load) is not None
    again = resumed.train(second_batch)
    assert again["loss"] == after["loss"] and again["grad_norm"] == after["grad_norm"]
    for (name, a), (_, b) in zip(first.weights()[0].items(), resumed.weights()[0].items(), strict=True):
        assert torch.equal(a, b), name
    resumed.export_hf(tmp_path / "export")
    exported = load_causal_lm(str(tmp_path / "export"), dtype="float32", device="cpu").state_dict()
    for name, tensor in resumed.weights()[0].items():
        assert torch.equal(exported[name], tensor), name


def test_megatron_config_refuses_what_is_not_built_with_what_to_change(models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.activation_checkpointing: not built in the megatron backend"):
        TrainerConfig(backend="megatron", activation_checkpointing=True)
    with pytest.raises(ConfigError, match="has no critic yet"):
        build_backend(config(models["tied"]), AlgoConfig(advantage_estimator="ppo"), temperature=1.0,
                      parallel=DataParallel())  # fmt: skip
    with pytest.raises(ConfigError, match="bf16 over float32 main params only on CUDA"):
        build_backend(replace(config(models["tied"]), dtype="bfloat16"), AlgoConfig(), temperature=1.0,
                      parallel=DataParallel())  # fmt: skip
    with pytest.raises(ConfigError, match=r"tensor_parallel=3 must divide the model's num_key_value_heads \(2\)"):
        Qwen3Shape.of(load_causal_lm(str(models["tied"]), dtype="float32", device="cpu").config).check_split(3)


def _tp_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    parallel = join_ranks(rank, world, port)
    backend: Any = build_backend(config(Path(model_dir), tensor_parallel=2), AlgoConfig(entropy_coef=0.01),
                                 temperature=1.0, parallel=parallel)  # fmt: skip
    batch = fixed_batch(Path(model_dir), seed=0)
    half = batch.size // world  # each rank reads its own share of the stream; the TP group trains both
    x = micro_inputs(batch, "cpu")
    with torch.no_grad():
        logp, entropy = response_logprobs(backend.model, x, temperature=1.0)
    metrics = backend.train(batch.rows(list(range(rank * half, (rank + 1) * half))))
    published, _ = backend.weights()  # every rank gathers (collective)
    local = {n: p.detach().clone() for n, p in backend.model.gpt.named_parameters()}
    torch.save({"metrics": metrics, "weights": {n: t.clone() for n, t in published.items()}, "logp": logp,
                "entropy": entropy, "local": local}, f"{out}.{rank}")  # fmt: skip
    leave_ranks(parallel)


def test_tensor_parallel_over_two_gloo_ranks_takes_the_step_one_rank_takes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = models["tied"]
    out = tmp_path / "rank"
    ranks = spawn_ranks(_tp_worker, 2, out, str(model_dir), str(out))
    single: Any = build_backend(config(model_dir), AlgoConfig(entropy_coef=0.01), temperature=1.0,
                                parallel=DataParallel())  # fmt: skip
    batch = fixed_batch(model_dir, seed=0)
    mask = batch.mask_BT.bool()
    logp, entropy, metrics, published = one_rank_step(single, batch)
    half = ranks[0]["local"]["decoder.layers.0.mlp.linear_fc2.weight"]
    assert half.shape == (64, 64)  # each rank holds half of the MLP's columns: the model is split
    for got in ranks:
        torch.testing.assert_close(got["logp"][mask], logp[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["entropy"][mask], entropy[mask], atol=1e-5, rtol=1e-5)
        for name in ("loss", "pg_loss", "entropy", "grad_norm", "tokens"):
            assert got["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
        assert_weights_close(got["weights"], published)
