"""`SGLangConfig`: the `rollout.sglang` section (no torch or httpx here, so configs load fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles_stream.config import check


@dataclass(frozen=True, slots=True, kw_only=True)
class SGLangConfig:
    urls: tuple[str, ...] = ()  # servers to start with; more can be attached while running (`miles-stream sglang`)
    router_url: str = ""  # SGLang's router: /generate goes through it; weight calls still go to each server
    api_key: str = ""  # the servers' --api-key: /generate, /model_info, /server_info (all routes if no admin key)
    admin_api_key: str = ""  # the servers' --admin-api-key: pause, flush, abort, weight routes (client.py)
    health_probe_s: float = 30.0  # one /health_generate (SGLang answers 503 after its own 20 s when stuck or paused)
    max_inflight_per_server: int = 64  # requests outstanding per server (the router: this x servers)
    request_timeout_s: float = 3600.0  # one /generate
    control_timeout_s: float = 60.0  # pause, flush, version and the other control calls
    update_timeout_s: float = 600.0  # each step of a weight update (a hung collective becomes an error)
    connect_retries: int = 5  # retries of a call whose connection failed (with backoff); nothing else is retried
    health_timeout_s: float = 600.0  # how long an attached server may take to answer /health_generate
    health_interval_s: float = 10.0  # a server taken out after failing is probed this often
    pause_mode: Literal["abort", "retract", "in_place"] = "retract"  # at a weight update; retract loses no work
    weight_sync: Literal["disk", "distributed", "tensor"] = "disk"  # disk: trainer.transport=file, shared dir
    verify_disk_weights: bool = True  # check the version file's sha256 before a server loads it
    sync_backend: Literal["nccl", "gloo"] = "nccl"  # distributed: gloo only for CPU tests
    sync_device: str = "cuda"  # where this process stages tensors for distributed / tensor sync
    sync_master_address: str = "127.0.0.1"  # distributed: this host, as the servers reach it
    sync_master_port: int = 29600  # distributed: each new weight group takes the next free port from here,
    sync_port_range: int = 64  # within this many (a group's port and name are never reused in one process)
    tensor_devices: tuple[str, ...] = ()  # tensor: this process's device for each TP rank's GPU (empty: sync_device)
    require_routed_experts: bool = True  # MoE models: servers must run --enable-return-routed-experts (R3)
    bucket_mb: int = 512  # distributed / tensor: tensors per call

    def __post_init__(self) -> None:
        check(self.max_inflight_per_server >= 1, "rollout.sglang.max_inflight_per_server", "must be >= 1")
        for name in ("request_timeout_s", "control_timeout_s", "update_timeout_s", "health_timeout_s",
                     "health_interval_s", "health_probe_s"):  # fmt: skip
            check(getattr(self, name) > 0, f"rollout.sglang.{name}", "must be positive")
        check(self.connect_retries >= 0, "rollout.sglang.connect_retries", "must be >= 0")
        check(self.bucket_mb >= 1, "rollout.sglang.bucket_mb", "must be >= 1")
        check(self.sync_port_range >= 1, "rollout.sglang.sync_port_range", "must be >= 1")
        check(1 <= self.sync_master_port <= 65535 - self.sync_port_range, "rollout.sglang.sync_master_port",
              "with sync_port_range must stay within 1..65535")  # fmt: skip
        check(all(u.startswith(("http://", "https://")) for u in (*self.urls, *filter(None, [self.router_url]))),
              "rollout.sglang.urls", "each must start with http:// or https://")  # fmt: skip
