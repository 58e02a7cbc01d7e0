"""A shared Redis with an ACL user limited to the run's namespace and to data commands: feeder, producer,
trainer and status work through it as separate processes; administrative commands and other keys are refused."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import redis
from redis_acl import ACL_RULES, feed_produce_train_status

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
    trained, err = feed_produce_train_status(url, ns, tmp_path)
    assert "password" not in trained.stderr and password not in trained.stderr + err  # never logged
    with redis.Redis.from_url(url) as user:
        announced = [int(f[b"version"]) for _, f in user.xrange(f"{ns}:weights")]
        assert announced[-1] == 3 and announced == sorted(set(announced))  # one may be skipped (background)
        for forbidden in (lambda: user.flushall(), lambda: user.config_get("*"), lambda: user.get("other:key"),
                          lambda: user.keys("*")):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
