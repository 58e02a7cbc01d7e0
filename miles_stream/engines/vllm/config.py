"""`VLLMConfig`: the `rollout.vllm` section (no torch or httpx here, so configs load fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles_stream.config import check


@dataclass(frozen=True, slots=True, kw_only=True)
class VLLMConfig:
    urls: tuple[str, ...] = ()  # servers to start with; more can be attached while running (`miles-stream sglang`)
    api_key: str = ""  # sent as a bearer token (servers started with --api-key)
    # samples outstanding per server (a group goes as one request with n = its samples): at most the server's
    # max_num_seqs, whose API-server default is 128 on a CPU, 256 on most GPUs, 1,024 on H100/H200
    # (vllm/engine/arg_utils.py:2929-2983; a larger n is refused). Raise it with the server's
    max_inflight_per_server: int = 128
    request_timeout_s: float = 3600.0  # one /inference/v1/generate
    control_timeout_s: float = 60.0  # pause, resume, version and the other control calls
    update_timeout_s: float = 600.0  # each step of a weight update (a hung reload or collective becomes an error)
    connect_retries: int = 5  # retries of a call whose connection failed (with backoff); nothing else is retried
    health_timeout_s: float = 600.0  # how long an attached server may take to answer /health
    health_interval_s: float = 10.0  # a server taken out after failing is probed this often
    weight_sync: Literal["disk", "nccl", "ipc"] = "disk"  # disk: trainer.transport=file, a dir every server reads;
    # nccl / ipc: vLLM's GPU weight transfer (servers on other GPUs / on this process's GPU; not run here)
    sync_master_address: str = "127.0.0.1"  # nccl: this host, as the servers reach it
    sync_master_port: int = 29700

    def __post_init__(self) -> None:
        check(self.max_inflight_per_server >= 1, "rollout.vllm.max_inflight_per_server", "must be >= 1")
        for name in ("request_timeout_s", "control_timeout_s", "update_timeout_s", "health_timeout_s",
                     "health_interval_s"):  # fmt: skip
            check(getattr(self, name) > 0, f"rollout.vllm.{name}", "must be positive")
        check(self.connect_retries >= 0, "rollout.vllm.connect_retries", "must be >= 0")
        check(all(u.startswith(("http://", "https://")) for u in self.urls), "rollout.vllm.urls",
              "each must start with http:// or https://")  # fmt: skip
