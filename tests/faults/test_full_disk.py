"""A full disk, for real: a small tmpfs filled by the product itself (a faked OSError could not see that
safetensors 0.8 raises `SafetensorError`, which is not an OSError).

    the trainer's checkpoint    CheckpointError naming the directory; no `.tmp-PID` directory left behind
    the recorder's files        `miles-stream record` exits 2 with one line naming the directory, no chained
                                traceback (its close flushed again onto the full disk); what it had not
                                written stays pending in its consumer group
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from redis_groups import publish_groups

from miles_stream.errors import CheckpointError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.checkpoint import TrainerState, save_checkpoint
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.build import build_trainer

CLI = [sys.executable, "-m", "miles_stream.cli"]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (mounting needs root, as CI and `bash ops/run.sh test` run here)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True,
                             text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_checkpoint_disk_names_the_directory_and_leaves_no_temporary(tmp_path: Path, full_disk: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "model", TinyModelConfig())  # ~300 KB of weights: more than fits
    trainer = build_trainer(TrainerConfig(model=str(model_dir)), AlgoConfig(), temperature=1.0, parallel=DataParallel())
    root = full_disk / "ckpt"
    with pytest.raises(CheckpointError, match=rf"step 1 in {root}: "):
        save_checkpoint(root, TrainerState(step=1, version=1, claims=()), trainer.save)
    assert list(root.iterdir()) == []  # the temporary directory went with the failure


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_full_recorder_disk_is_one_line_and_loses_nothing(redis_url: str, full_disk: Path) -> None:
    ns = f"fd{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(0)
    groups = [synthetic_group(rng, n_samples=4, prompt_len=64, response_len=256, vocab=50_000, group_id=f"g{i}",
                              prompt_key=str(i)) for i in range(200)]  # fmt: skip  # ~10 MB: far past 64 KiB
    asyncio.run(publish_groups(redis_url, ns, groups))
    env = {**os.environ, "MILES_REDIS_URL": redis_url}
    done = subprocess.run([*CLI, "record", f"bus.namespace={ns}", "--out", str(full_disk)], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"miles-stream record: cannot write the recording in {full_disk}: "), last
    with redis.Redis.from_url(redis_url) as client:
        (group,) = [g for g in client.xinfo_groups(f"{ns}:trajectories") if g["name"] == b"recorder"]
        acked = 200 - int(group["pending"]) - int(group.get("lag") or 0)
        assert int(group["pending"]) > 0 and acked < 200  # what did not reach the disk was not acked
