"""`miles-stream train --sft`: the SFT objective, the step order, and the process: it learns the demo's table,
exports a Hugging Face model, resumes to the same weights as an uninterrupted run, and names bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.demo.task import MODEL, greedy_accuracy, rows
from miles_stream.models import build_tiny_model
from miles_stream.run_config import load_run_config
from miles_stream.trainer.algo import LossInputs, SftObjective
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.sft import batch_rows, total_steps

CLI = [sys.executable, "-m", "miles_stream.cli", "train"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("demo") / "model", MODEL)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "table.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": a}) + "\n" for p, a in rows()))
    return path


def sft(
    model_dir: Path,
    data: Path,
    work: Path,
    *overrides: str,
    resume: bool = False,
    launcher: Sequence[str] = CLI,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [*launcher, "--sft", str(data), *(["--resume"] if resume else []), f"trainer.model={model_dir}",
            "trainer.lr=3e-3", "trainer.adam_betas=[0.9,0.98]", "trainer.torch_threads=1", "sft.batch_size=16",
            f"trainer.metrics_path={work / 'metrics.jsonl'}", *overrides]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def test_the_objective_is_the_mean_nll_of_the_masked_tokens() -> None:
    logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-3.0, -5.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logp = logp.masked_fill(mask == 0, 0.0)  # what the trainer's logprobs hold past a response
    x = LossInputs(logp_BT=logp, logp_old_BT=logp, logp_rollout_BT=logp, adv_BT=torch.zeros_like(logp),
                   mask_BT=mask, num_tokens=3.0, num_samples=2.0)  # fmt: skip
    assert SftObjective(token_mean=True)(x)[0].item() == pytest.approx((1 + 2 + 3) / 3)
    assert SftObjective(token_mean=False)(x)[0].item() == pytest.approx(((1 + 2) / 2 + 3) / 2)


def test_steps_cover_each_epoch_once_in_its_own_order_and_ranks_split_a_step() -> None:
    config = load_run_config(None, ["sft.batch_size=4", "sft.num_epochs=2", "trainer.seed=3"])
    assert total_steps(config.sft, config.trainer.max_steps, 10) == 6  # 3 steps an epoch, the last one of 2
    one = DataParallel()
    epochs = [
        [i for s in range(e * 3, e * 3 + 3) for i in batch_rows(config.sft, config.trainer.seed, 10, s, one)]
        for e in (0, 1)
    ]
    assert all(sorted(rows) == list(range(10)) for rows in epochs) and epochs[0] != epochs[1]
    halves = [batch_rows(config.sft, config.trainer.seed, 10, 1, DataParallel(rank=r, world=2)) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(batch_rows(config.sft, config.trainer.seed, 10, 1, one))
    capped = load_run_config(None, ["sft.batch_size=4", "sft.num_epochs=2", "trainer.max_steps=4"])
    assert total_steps(capped.sft, capped.trainer.max_steps, 10) == 4


def test_it_learns_the_demo_table_and_exports_the_model(model_dir: Path, data: Path, tmp_path: Path) -> None:
    done = sft(model_dir, data, tmp_path, "sft.num_epochs=30", f"trainer.export_dir={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 * 7  # 100 examples in steps of 16
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 3
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = greedy_accuracy(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)
    after = greedy_accuracy(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tokenizer)
    assert before < 0.3 and after >= 0.9, (before, after)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    model_dir: Path, data: Path, tmp_path: Path
) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["sft.num_epochs=3", "trainer.checkpoint_every=5"]  # 21 steps: the cut at 10 falls mid-epoch
    a = sft(model_dir, data, straight, *common, f"trainer.checkpoint_dir={straight / 'ckpt'}")
    b = sft(model_dir, data, split, *common, "trainer.max_steps=10", f"trainer.checkpoint_dir={split / 'ckpt'}")
    c = sft(model_dir, data, split, *common, f"trainer.checkpoint_dir={split / 'ckpt'}", resume=True)
    for done in (a, b, c):
        assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 22))  # 10, then 11..21 after the resume
    weights = [load_file(d / "ckpt" / (d / "ckpt" / "latest").read_text().strip() / "model.safetensors")
               for d in (straight, split)]  # fmt: skip
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_two_data_parallel_ranks_train_the_weights_one_rank_does(model_dir: Path, data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "miles_stream.cli", "train"]  # fmt: skip
    weights = {}
    for name, launcher in (("dp", ranks), ("single", CLI)):
        work = tmp_path / name
        done = sft(model_dir, data, work, "trainer.max_steps=3", f"trainer.export_dir={work / 'out'}",
                   launcher=launcher, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        weights[name] = load_file(work / "out" / "model.safetensors")
    for key, value in weights["single"].items():
        assert torch.allclose(weights["dp"][key], value, atol=1e-5), key  # the same steps, summed in another order


def test_bad_data_is_named_without_a_traceback(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    done = sft(model_dir, bad, tmp_path)
    assert done.returncode == 2 and f"{bad}:2: 'response' must be a string" in done.stderr, done.stderr[-3000:]
    missing = sft(model_dir, tmp_path / "nowhere.jsonl", tmp_path)
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    assert "Traceback" not in done.stderr + missing.stderr
