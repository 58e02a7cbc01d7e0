"""The trainer process with trainer.backend=megatron and a real Redis: one rank, tensor, pipeline and context
parallel over two torchrun ranks, read the same stream as the torch backend, train each group once, publish,
checkpoint and export the model the torch backend exports; and Qwen3-MoE with routing traces on the stream,
replayed (R3), as the torch backend trains it, on one rank, with its experts split over two torchrun ranks
(expert parallel) and with its layers cut into two pipeline stages. Slow (several trainer processes, some of them
two ranks): opt-in."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis as sync_redis
import torch
from redis_groups import done_total, publish_groups
from safetensors.torch import load_file
from test_trainer_process import CLI, TORCHRUN_2, groups, metrics, train_cmd

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.schema import TrajectoryGroup

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")


@pytest.mark.slow
def test_megatron_trainer_processes_one_rank_tp2_and_pp2_export_the_torch_backends_model(
    redis_url: str, tmp_path: Path
) -> None:
    model_dir = build_tiny_model(tmp_path / "model", TinyModelConfig())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher, share, extra in (
        ("torch", CLI, 4, []),
        ("megatron", CLI, 4, ["trainer.backend=megatron"]),
        # each rank reads 2 groups; the TP group trains both ranks' 4, as one rank trains its 4
        ("tp2", TORCHRUN_2, 2, ["trainer.backend=megatron", "trainer.megatron.tensor_parallel=2"]),
        # the same with two pipeline stages (one layer each, the tied embedding's copy on the last)
        ("pp2", TORCHRUN_2, 2, ["trainer.backend=megatron", "trainer.megatron.pipeline_parallel=2"]),
        # and with every sequence split over two context-parallel ranks (the CP group trains both ranks' 4)
        ("cp2", TORCHRUN_2, 2, ["trainer.backend=megatron", "trainer.megatron.context_parallel=2"]),
    ):  # fmt: skip
        ns = f"{name}{uuid.uuid4().hex[:8]}"
        asyncio.run(publish_groups(redis_url, ns, groups(0, 8)))
        cmd = train_cmd(ns, model_dir, tmp_path / name, "trainer.max_steps=2", f"buffer.capacity={share}",
                        f"buffer.read_count={share}", *extra)  # fmt: skip
        run = subprocess.run([*launcher, *cmd[len(CLI) :]], env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "export" / "model.safetensors")
        with sync_redis.Redis.from_url(redis_url) as client:
            assert done_total(client, f"{ns}:done:trainer") == 8
            assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
            assert [int(f[b"version"]) for _, f in client.xrange(f"{ns}:weights")][-1] == 2
    saved = tmp_path / "tp2" / "ckpt" / "step-00000002"
    assert sorted(p.name for p in saved.glob("megatron-tp*")) == [
        "megatron-tp00.pt", "megatron-tp00.safetensors", "megatron-tp01.pt", "megatron-tp01.safetensors"]  # fmt: skip
    saved = tmp_path / "pp2" / "ckpt" / "step-00000002"
    assert sorted(p.name for p in saved.glob("megatron-tp*")) == [
        "megatron-tp00-pp00.pt", "megatron-tp00-pp00.safetensors", "megatron-tp00-pp01.pt",
        "megatron-tp00-pp01.safetensors"]  # fmt: skip
    saved = tmp_path / "cp2" / "ckpt" / "step-00000002"  # the CP ranks hold the same model: one pair of files
    assert sorted(p.name for p in saved.glob("megatron-tp*")) == ["megatron-tp00.pt", "megatron-tp00.safetensors"]
    for name in ("megatron", "tp2", "pp2", "cp2"):
        assert runs[name].keys() == runs["torch"].keys()
        for key, value in runs["torch"].items():
            assert torch.allclose(runs[name][key], value, atol=1e-5), (name, key)


def traced_groups(count: int) -> list[TrajectoryGroup]:
    """`groups` with a routing trace on every sample for the tiny MoE model (2 layers, top-2 of 8 experts,
    distinct experts a token), as a producer's engine records it."""
    out = []
    for g in groups(0, count):
        rng = np.random.default_rng(100 + int(g.group_id[1:]))
        samples = tuple(replace(s, routing=np.stack([[rng.permutation(8)[:2] for _ in range(2)] for _ in range(
            len(g.prompt_ids) + len(s.response_ids) - 1)]).astype(np.uint8)) for s in g.samples)  # fmt: skip
        out.append(replace(g, samples=samples))
    return out


@pytest.mark.slow
def test_megatron_trainer_process_trains_qwen3_moe_with_replay_as_the_torch_backend(
    redis_url: str, tmp_path: Path
) -> None:
    model_dir = build_tiny_model(tmp_path / "model", TinyModelConfig(kind="moe"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    runs, mismatch = {}, {}
    for name, launcher, share, extra in (
        ("torch", CLI, 4, []),
        ("megatron", CLI, 4, ["trainer.backend=megatron"]),
        # each rank reads and trains 2 groups (its own share), holding 4 of each layer's 8 experts
        ("ep2", TORCHRUN_2, 2, ["trainer.backend=megatron", "trainer.megatron.expert_parallel=2"]),
        # two pipeline stages of one MoE layer each (router and 8 experts), each replaying its layer of the trace;
        # the PP group trains both ranks' 2 groups
        ("pp2", TORCHRUN_2, 2, ["trainer.backend=megatron", "trainer.megatron.pipeline_parallel=2"]),
        # and with every sequence split over two context-parallel ranks, each replaying its tokens' routes (the CP
        # group trains both ranks' 4)
        ("cp2", TORCHRUN_2, 2, ["trainer.backend=megatron", "trainer.megatron.context_parallel=2"]),
    ):  # fmt: skip
        ns = f"{name}{uuid.uuid4().hex[:8]}"
        asyncio.run(publish_groups(redis_url, ns, traced_groups(8)))
        cmd = train_cmd(ns, model_dir, tmp_path / name, "trainer.max_steps=2", f"buffer.capacity={share}",
                        f"buffer.read_count={share}", "trainer.routing_replay=true", *extra)  # fmt: skip
        run = subprocess.run([*launcher, *cmd[len(CLI) :]], env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "export" / "model.safetensors")
        mismatch[name] = [m["routing_mismatch"] for m in metrics(tmp_path / name)]
        with sync_redis.Redis.from_url(redis_url) as client:
            assert done_total(client, f"{ns}:done:trainer") == 8
            assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
    assert len(mismatch["torch"]) == 2 and min(mismatch["torch"]) > 0.5  # random traces: replay changed routing
    saved = tmp_path / "ep2" / "ckpt" / "step-00000002"
    assert sorted(p.name for p in saved.glob("megatron-tp*")) == [
        "megatron-tp00-ep00.pt", "megatron-tp00-ep00.safetensors", "megatron-tp00-ep01.pt",
        "megatron-tp00-ep01.safetensors"]  # fmt: skip
    saved = tmp_path / "pp2" / "ckpt" / "step-00000002"
    assert sorted(p.name for p in saved.glob("megatron-tp*")) == [
        "megatron-tp00-pp00.pt", "megatron-tp00-pp00.safetensors", "megatron-tp00-pp01.pt",
        "megatron-tp00-pp01.safetensors"]  # fmt: skip
    saved = tmp_path / "cp2" / "ckpt" / "step-00000002"  # the CP ranks hold the same model: one pair of files
    assert sorted(p.name for p in saved.glob("megatron-tp*")) == ["megatron-tp00.pt", "megatron-tp00.safetensors"]
    for name in ("megatron", "ep2", "pp2", "cp2"):
        assert mismatch[name] == pytest.approx(mismatch["torch"], rel=1e-6), name
        assert runs[name].keys() == runs["torch"].keys()
        # two AdamW steps (lr 1e-3) divide by each element's own gradient scale: where an expert saw few tokens,
        # float noise between the two forwards moves a rare element by more than 1e-5 (seen: 2 of 422k, 1.1e-5
        # and 2.5e-5)
        far = 0
        for key, value in runs["torch"].items():
            assert torch.allclose(runs[name][key], value, atol=5e-5), (name, key)  # 5% of one step's size
            far += int(((runs[name][key] - value).abs() > 1e-5).sum())
        assert far <= 10, name


@pytest.mark.slow
@pytest.mark.parametrize("first", ["tp2", "zero2"])
def test_megatron_trainer_saved_on_two_ranks_resumes_on_one_rank(redis_url: str, tmp_path: Path, first: str) -> None:
    """Two steps on two torchrun ranks (TP=2, or DP=2 with AdamW's moments split over them: the distributed
    optimizer), then `train --resume` on one rank (TP=1, whole AdamW) for two more: every group trained and acked
    once, and the exported model the one a single rank trains in four steps without a restart."""
    model_dir = build_tiny_model(tmp_path / "model", TinyModelConfig())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    exports = {}
    for name, steps in (
        ("restarted", ((first, TORCHRUN_2, 2, 2), ("tp1", CLI, 4, 4))),
        ("once", (("tp1", CLI, 4, 4),)),
    ):
        ns = f"{name}{uuid.uuid4().hex[:8]}"
        asyncio.run(publish_groups(redis_url, ns, groups(0, 16)))
        for i, (layout, launcher, share, max_steps) in enumerate(steps):
            cmd = train_cmd(ns, model_dir, tmp_path / name, f"trainer.max_steps={max_steps}",
                            f"buffer.capacity={share}", f"buffer.read_count={share}", "trainer.backend=megatron",
                            f"trainer.megatron.tensor_parallel={2 if layout == 'tp2' else 1}",
                            f"trainer.megatron.distributed_optimizer={layout == 'zero2'}")  # fmt: skip
            cmd = [*launcher, *cmd[len(CLI) :], *(["--resume"] if i else [])]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
            assert run.returncode == 0, run.stderr[-3000:]
            if i:
                saved = "TP=2, PP=1, EP=1" if first == "tp2" else "TP=1, PP=1, EP=1"  # zero2: moments by name
                assert '"megatron_checkpoint_resharded"' in run.stderr and f'"{saved}"' in run.stderr
        exports[name] = load_file(tmp_path / name / "export" / "model.safetensors")
        with sync_redis.Redis.from_url(redis_url) as client:
            assert done_total(client, f"{ns}:done:trainer") == 16
            assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
        assert [m["step"] for m in metrics(tmp_path / name)] == [1, 2, 3, 4]
    assert exports["restarted"].keys() == exports["once"].keys()
    for key, value in exports["once"].items():
        assert torch.allclose(exports["restarted"][key], value, atol=1e-5), key
