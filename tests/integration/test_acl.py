"""A shared Redis with an ACL user limited to the run's namespace and to data commands: feeder, producer,
trainer and status work through it as separate processes; administrative commands and other keys are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from redis_acl import ACL_RULES

from miles_stream.demo.task import write_task

CLI = [sys.executable, "-m", "miles_stream.cli"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_namespace_limited_acl_user_runs_the_pipeline(redis_url: str, tmp_path: Path) -> None:
    ns = f"acl{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    with redis.Redis.from_url(redis_url) as admin:
        admin.acl_setuser("miles", reset=True)
        admin.execute_command("ACL", "SETUSER", "miles", f">{password}", *(r.format(ns=ns) for r in ACL_RULES))
    host_port = redis_url.split("://", 1)[1]
    url = f"redis://miles:{password}@{host_port}"
    model_dir, prompts = write_task(tmp_path)
    env = {**os.environ, "MILES_REDIS_URL": url, "HF_HUB_OFFLINE": "1"}
    common = [f"bus.namespace={ns}", "--log-json"]

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args, *common], capture_output=True, text=True, timeout=timeout, env=env)

    fed = run("feed", f"feeder.path={prompts}", "feeder.num_epochs=1")
    assert fed.returncode == 0, fed.stderr[-2000:]
    rollout = [f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4", "rollout.reward=exact_match",
               "rollout.sampling.max_new_tokens=1", "rollout.torch_threads=1"]  # fmt: skip
    producer = subprocess.Popen([*CLI, "produce", *common, *rollout], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        trained = run("train", f"trainer.model={model_dir}", "trainer.max_steps=3", "buffer.rollout_batch_size=4",
                      "buffer.filters=[]", "trainer.torch_threads=1", timeout=240)  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        status = run("status", "--json")
        assert status.returncode == 0, status.stderr[-2000:]
    finally:
        producer.terminate()
        _, err = producer.communicate(timeout=60)
    assert producer.returncode == 0, err[-3000:]
    assert "password" not in trained.stderr and password not in trained.stderr + err  # never logged
    with redis.Redis.from_url(url) as user:
        announced = [int(f[b"version"]) for _, f in user.xrange(f"{ns}:weights")]
        assert announced[-1] == 3 and announced == sorted(set(announced))  # one may be skipped (background)
        for forbidden in (lambda: user.flushall(), lambda: user.config_get("*"), lambda: user.get("other:key"),
                          lambda: user.keys("*")):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
