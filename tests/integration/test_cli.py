"""`miles-stream redis` and `miles-stream status` as a user runs them: real processes, real servers."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
import redis
import torch

from miles_stream.bus import Keys, RedisConfig, connect, wait_until_reachable
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.run_config import load_run_config
from miles_stream.weights.transports import FileTransport
from miles_stream.weights.versions import WeightPublisher

CLI = [sys.executable, "-m", "miles_stream.cli"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def start_cli_server(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MILES_REDIS_URL"}
    proc = subprocess.Popen(
        [*CLI, "redis", "--data-dir", str(tmp_path / "data"), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    url = ""
    deadline = time.monotonic() + 30
    while not url and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("export MILES_REDIS_URL="):
            url = line.strip().split("=", 1)[1]
        elif not line and proc.poll() is not None:
            raise AssertionError(f"miles-stream redis exited: {proc.stderr.read() if proc.stderr else ''}")
    assert url, "miles-stream redis printed no URL"
    with redis.Redis.from_url(url) as client:
        server_pid = int(client.info("server")["process_id"])
    return proc, url, server_pid


@pytest.mark.integration
def test_cli_redis_prints_url_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    proc, url, server_pid = start_cli_server(tmp_path)
    with redis.Redis.from_url(url) as client:
        assert client.ping()
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "Redis stopped." in out
    assert wait_dead(server_pid), "redis-server outlived Ctrl-C"


@pytest.mark.integration
def test_cli_redis_cluster_prints_a_url_every_process_can_use_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "redis", "--cluster", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    line, deadline = "", time.monotonic() + 60
    while not line.startswith("export") and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    url = line.strip().split("=", 1)[1].strip("'")
    assert "?cluster=true&node=" in url, line
    config = load_run_config(None, [f"redis.url={url}", "bus.namespace={run1}"])  # the url and namespace it says

    async def round_trip() -> bool:
        client = connect(config.redis)
        try:
            await wait_until_reachable(client, config.redis)
            await client.set("{run1}:x", 1)
            return bool(await client.get("{run1}:x") == b"1")
        finally:
            await client.aclose()

    assert asyncio.run(round_trip())
    pids = []
    for port in re.findall(r"127\.0\.0\.1:(\d+)", url):  # every node
        with redis.Redis(port=int(port)) as client:
            pids.append(int(client.info("server")["process_id"]))
    assert len(pids) == 3
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "Redis cluster stopped." in out
    assert all(wait_dead(pid) for pid in pids), "a cluster node outlived SIGTERM"


@pytest.mark.integration
def test_server_dies_with_a_killed_cli(tmp_path: Path) -> None:
    proc, _, server_pid = start_cli_server(tmp_path, "--persistence", "none")
    proc.kill()
    proc.communicate()
    assert wait_dead(server_pid), "redis-server outlived kill -9 of its parent"


@pytest.mark.integration
def test_aof_persistence_keeps_data_across_a_restart(tmp_path: Path) -> None:
    config = EmbeddedRedisConfig(data_dir=str(tmp_path), persistence="aof")
    with EmbeddedRedis(config) as server, redis.Redis.from_url(server.url) as client:
        client.xadd("ns:trajectories", {"d": b"kept"})
    with EmbeddedRedis(config) as server, redis.Redis.from_url(server.url) as client:
        entries = client.xrange("ns:trajectories")
    assert [f[b"d"] for _, f in entries] == [b"kept"]


@pytest.mark.integration
def test_cli_redis_with_a_url_checks_it_and_starts_nothing(redis_url: str) -> None:
    out = subprocess.run([*CLI, "redis", "--redis-url", redis_url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "nothing started" in out.stdout


def test_cli_redis_with_a_dead_url_is_a_clear_error() -> None:
    out = subprocess.run(
        [*CLI, "redis", "--redis-url", "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "does not answer" in out.stderr


def test_cli_unknown_config_key_names_it() -> None:
    out = subprocess.run([*CLI, "status", "bus.nmespace=x"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "unknown config key 'bus.nmespace'; did you mean 'namespace'?" in out.stderr


def test_cli_a_missing_model_path_names_itself(tmp_path: Path) -> None:
    cases = [("produce", "rollout.model", "/nonexistent", "is not a directory"),
             ("train", "trainer.model", str(tmp_path), "has no config.json")]  # fmt: skip
    for command, key, value, why in cases:
        out = subprocess.run([*CLI, command, f"{key}={value}"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and f"{key}: {value!r} {why}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


async def announce(url: str, ns: str, version: int, where: Path) -> None:
    client = connect(RedisConfig(url=url))
    try:
        await WeightPublisher(client, Keys(ns), FileTransport(str(where))).publish(version, {"w": torch.ones(2)})
    finally:
        await client.aclose()


@pytest.mark.integration
def test_cli_status_describes_a_namespace(redis_url: str, tmp_path: Path) -> None:
    asyncio.run(announce(redis_url, "cli", 4, tmp_path))
    with redis.Redis.from_url(redis_url) as client:
        client.xgroup_create("cli:trajectories", "trainer", id="0", mkstream=True)
        client.xadd("cli:trajectories", {"d": b"x"})
        client.xadd("cli:weights", {"version": b"5", "manifest": b"garbage"})  # not the latest: it does not decode
        client.zadd("cli:members", {"producer:p1": time.time()})  # a producer's heartbeat, still on version 2
        client.hset("cli:members:info", "producer:p1", json.dumps({"weight_version": 2}))
    env = {**os.environ, "MILES_REDIS_URL": redis_url}
    out = subprocess.run(
        [*CLI, "status", "--namespace", "cli", "--json"], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    traj = next(s for s in status["streams"] if s["key"] == "cli:trajectories")
    assert traj["length"] == 1 and traj["groups"][0]["name"] == "trainer"
    assert status["latest_weight_version"] == 4
    assert status["versions_in_use"] == {"p1": 2} and status["producer_lag"] == 2
    table = subprocess.run([*CLI, "status", "bus.namespace=cli"], capture_output=True, text=True, env=env, timeout=30)
    assert table.returncode == 0, table.stderr
    assert "cli:trajectories" in table.stdout and "latest weight version" in table.stdout


class Lines:
    """A process's stdout, read line by line on a thread, so the test can wait for output with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc, self.lines, self._queue = proc, list[str](), queue.Queue[str | None]()
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, done: Callable[[list[str]], bool], timeout_s: float) -> bool:
        """Read until `done(lines so far)`; False at the deadline or at the end of the output."""
        deadline = time.monotonic() + timeout_s
        while not done(self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                return False
            self.lines.append(line)
        return True

    def close(self) -> None:
        """After the process ended: its output is read to the end, then closed."""
        self._thread.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def watch_status(redis_url: str, stderr: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MILES_REDIS_URL": redis_url}
    with stderr.open("w") as err:
        return subprocess.Popen([*CLI, "status", "--watch", "--interval", "0.2", "--namespace", "watch", *args],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)  # fmt: skip


def stop_watch(proc: subprocess.Popen[str], sig: signal.Signals, stderr: Path) -> str:
    """Send `sig`, wait for the exit, and return stderr; a process still running after 10 s is killed (and its
    exit status then fails the test's check)."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return stderr.read_text()[-2000:]


@pytest.mark.integration
def test_cli_status_watch_json_into_a_pipe_prints_one_json_object_a_line_until_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    proc = watch_status(redis_url, tmp_path / "stderr", "--json")
    out = Lines(proc)
    try:  # imports take seconds on a loaded machine
        two = out.wait_for(lambda lines: len(lines) >= 2, timeout_s=90)
    finally:
        err = stop_watch(proc, signal.SIGTERM, tmp_path / "stderr")
        out.close()
    assert two, f"fewer than two snapshots: {out.lines!r} {err}"
    snapshots = [json.loads(line) for line in out.lines[:2]]
    assert all(s["namespace"] == "watch" for s in snapshots)
    assert all("watch:trajectories" in [st["key"] for st in s["streams"]] for s in snapshots)
    assert proc.returncode == 0, err


@pytest.mark.integration
def test_cli_status_watch_into_a_pipe_prints_the_80_column_view_per_snapshot_until_ctrl_c(
    redis_url: str, tmp_path: Path
) -> None:
    proc = watch_status(redis_url, tmp_path / "stderr")
    out = Lines(proc)
    try:
        two = out.wait_for(lambda lines: sum("WAITS ON" in line for line in lines) >= 2, timeout_s=90)
    finally:
        err = stop_watch(proc, signal.SIGINT, tmp_path / "stderr")
        out.close()
    assert two, f"fewer than two snapshots: {out.lines!r} {err}"
    assert any(line.startswith("trajectories:") for line in out.lines)
    assert all(len(line.rstrip("\n")) <= 80 for line in out.lines)
    assert proc.returncode == 130, err
