"""The optional W&B logger: off by default (wandb is not even imported), and in offline mode one run whose id is
the one given, holding the trainer's steps, the extras (eval results, producers) and the config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from waiting import wait_for

from miles_stream.trainer.metrics import MetricsSink
from miles_stream.wandb_log import WandbConfig, WandbRun


def test_wandb_is_off_by_default_and_not_imported() -> None:
    run = WandbRun(WandbConfig(), run_id="ns-1", name="ns", settings={})
    assert not run.enabled
    run.log({"x": 1.0}, step=1)  # nothing happens
    run.close()


@pytest.mark.timeout(120)
def test_an_offline_run_holds_steps_extras_and_config_under_its_run_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="the `wandb` extra (pip install 'miles-stream[wandb]'; in .[dev])")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = MetricsSink(str(tmp_path / "metrics.jsonl"))
    sink.wandb = WandbRun(WandbConfig(enabled=True, mode="offline", dir=str(tmp_path)), run_id="demo-abc123",
                          name="demo", settings={"trainer": {"lr": 0.003}})  # fmt: skip
    assert sink.wandb.enabled and sink.wandb.run.id == "demo-abc123"
    sink.write(1, {"loss": 0.5, "rollout_reward": 0.1})
    sink.write_extra(1, {"eval/pass_at_1": 0.25, "eval/version": 1, "producers/tokens": 640})
    sink.write(2, {"loss": 0.4, "rollout_reward": 0.2})
    sink.close()
    assert sink.wandb is None  # closed and let go
    runs = list((tmp_path / "wandb").glob("offline-run-*-demo-abc123"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    names = (b"loss", b"rollout_reward", b"eval/pass_at_1", b"producers/tokens", b"lr")
    record = runs[0] / "run-demo-abc123.wandb"  # wandb's service may still be writing it after finish()
    wait_for(lambda: all(n in record.read_bytes() for n in names), 30, f"{names} in {record}")
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2  # the extras are not step rows
    assert "wandb" in sys.modules
