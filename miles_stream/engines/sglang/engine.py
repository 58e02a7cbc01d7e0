"""`SGLangEngine`: a `RolloutEngine` that drives SGLang servers over HTTP (SGLang 0.5.23, read in its wheel's
source; docs/sglang.md). Not run against a real SGLang on our machines: tested against a stand-in server that
plays what that source does (tests/sglang_standin.py).

    generate(requests) ──► one /generate per sample (unique rid), on the server with the fewest in flight
                           (or through the router), at most max_inflight_per_server each ──► parse_generate
    apply_manifest(v)  ──► updates.update_servers: pause ─ flush ─ [begin] ─ push ─ [end ─ version] ─ check
                           ─ continue
    attach(url)        ──► wait /health_generate (resuming a paused server) ─ check /server_info ─ sync to the
                           current version ─ check /model_info ─ register with the router ─ in rotation
    detach(url)        ──► out of rotation ─ drain (abort after a grace period) ─ unregister

A server that fails (a connection that cannot be made, a 5xx, a failed update) leaves the rotation; its
requests are retried on another server, and a health loop brings it back once it answers and holds the
current version (syncing it first if it does not, or if an update failed on it part-way). A 400 to /generate
is the request's fault (`RequestRefused`, an `InvalidRequest`: the producer dead-letters that prompt). What it
does with its servers as the vLLM engine does (rotation, attach / detach, the health loop, re-sync) is
`engines/pool.py`; what is SGLang's (the paused-server probe, the router, the weight group) is here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog
import torch

from miles_stream.engines.base import GenerationRequest, GenerationResult
from miles_stream.engines.http import WeightUpdateError
from miles_stream.engines.pool import PooledEngine, Server, StateLoader
from miles_stream.engines.sglang.client import SGLangClient, SGLangError
from miles_stream.engines.sglang.config import SGLangConfig
from miles_stream.engines.sglang.payload import MoeLayout, generate_payload, parse_generate
from miles_stream.engines.sglang.pushes import DiskPush, DistributedPush, TensorPush
from miles_stream.engines.sglang.server_info import check_server
from miles_stream.engines.sglang.updates import WeightPush, end_sessions, update_servers
from miles_stream.models.moe import moe_layer_indices
from miles_stream.weights.manifest import WeightManifest

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class SGLangServer(Server[SGLangClient]):
    unrouted: bool = True  # not registered with the router (or no router)


class SGLangEngine(PooledEngine[SGLangServer, SGLangConfig]):
    name = "sglang"
    label = "SGLang"
    error = SGLangError

    def __init__(
        self,
        config: SGLangConfig,
        *,
        layout: MoeLayout | None = None,
        weight_version: int = 0,
        push: WeightPush | None = None,
        client: Callable[[str], SGLangClient] | None = None,
    ) -> None:
        super().__init__(config, weight_version=weight_version, pause_mode=config.pause_mode)
        self.layout = layout
        self._push = push or make_push(config)
        self._client = client or (lambda url: SGLangClient(url, api_key=config.api_key,
                                                            admin_api_key=config.admin_api_key,
                                                            timeout_s=config.control_timeout_s,
                                                            connect_retries=config.connect_retries))  # fmt: skip
        self._routing = layout is not None and config.require_routed_experts  # ask for traces, need servers to send
        self._router = self._client(config.router_url) if config.router_url else None

    async def abort(self, request_ids: Sequence[str]) -> None:
        targets = [(server, rid) for request_id in request_ids for server, rid in self._rids.get(request_id, ())]
        await asyncio.gather(*(self._abort(server, rid) for server, rid in targets), return_exceptions=True)

    async def _abort(self, server: SGLangServer | None, rid: str) -> None:
        """Abort one rid; through the router it is unknown which server has it, so every one is told."""
        targets = [server] if server is not None else list(self._servers.values())
        await asyncio.gather(*(s.client.abort(rid) for s in targets), return_exceptions=True)

    # ---- what the pool asks of an SGLang server ---------------------------------------------------------
    def _new_server(self, url: str) -> SGLangServer:
        return SGLangServer(self._client(url))

    async def _probe(self, server: SGLangServer) -> bool:
        """True once `server` can be made current. /health_generate is a one-token generate, which waits on
        the pause lock (sglang/srt/entrypoints/http_server.py:721-799, managers/tokenizer_manager.py:938-939):
        a paused server answers 503 after 20 s, every time. So a server we left paused, or one that fails that
        probe while answering /model_info (which does not wait on the pause), first has any weight-update
        session ended; one whose weights may be half new stays paused (`_make_current` syncs it whole and
        resumes it), any other is told to continue and probed again. It gets no work until it is current."""
        client = server.client
        if not server.paused and await client.health_generate(timeout_s=self.config.health_probe_s):
            return True
        try:
            await client.model_info()
            await end_sessions([client], self.config.control_timeout_s)
            if server.dirty:
                return True
            await client.resume()
        except SGLangError:
            return False
        if server.paused:
            log.info("sglang_resumed_for_resync", url=client.url, dirty=server.dirty)
        server.paused = False
        return await client.health_generate(timeout_s=self.config.health_probe_s)

    async def _admit(self, server: SGLangServer) -> None:
        """Its /server_info must suit the run (server_info.check_server)."""
        check_server(server.client.url, await server.client.server_info(), routing=self._routing,
                     weight_sync=self.config.weight_sync,
                     tensor_ranks=len(self.config.tensor_devices) or 1)  # fmt: skip

    async def _wire_version(self, server: SGLangServer) -> Any:
        return (await server.client.model_info()).get("weight_version")

    async def _push_update(
        self, servers: list[SGLangServer], manifest: WeightManifest, load: StateLoader
    ) -> list[WeightUpdateError]:
        state = await load() if self._push.needs_state() else None
        return await update_servers([s.client for s in servers], manifest.version, manifest, state, self._push,
                                    pause_mode=self.config.pause_mode,
                                    step_timeout_s=self.config.update_timeout_s)  # fmt: skip

    async def _abort_server(self, server: SGLangServer) -> None:
        await server.client.abort(None)  # what it still runs comes back as partials, resumed elsewhere

    async def _left(self) -> None:
        async with self._update_lock:  # a weight group has a fixed membership: destroyed while it can still be
            await self._push.release()  # destroyed on the leaving server too; the next update makes a new one

    async def _close_push(self) -> None:
        await self._push.release()  # a weight group, destroyed on the servers and here

    async def _send(self, server: SGLangServer, request: GenerationRequest, rid: str) -> GenerationResult:
        payload = generate_payload(request, rid, routing=self._routing)
        body = await (self._router or server.client).generate(payload, timeout_s=self.config.request_timeout_s)
        return parse_generate(body, request, default_version=self._initial, layout=self.layout)

    # ---- the router (sglang-router's /workers) ---------------------------------------------------------
    async def _route(self, server: SGLangServer) -> None:
        if self._router is not None and server.unrouted:
            await self._router.request("POST", "/workers", {"url": server.client.url, "worker_type": "regular"})
            server.unrouted = False

    async def _unroute(self, server: SGLangServer) -> None:
        """Unregister `server` from the router: once after a failed update, and again at detach (in case an
        earlier try failed)."""
        if self._router is None or (server.unrouted and not server.draining):
            return
        server.unrouted = True
        url = server.client.url
        try:
            listed = await self._router.request("GET", "/workers")
            ids = [w.get("id") for w in (listed or {}).get("workers", []) if w.get("url") == url]
            for worker_id in ids or [quote(url, safe="")]:  # older routers take the escaped url as the id
                await self._router.request("DELETE", f"/workers/{worker_id}")
        except SGLangError as exc:
            log.warning("router_unregister_failed", url=url, error=str(exc))


def make_push(config: SGLangConfig) -> WeightPush:
    if config.weight_sync == "disk":
        return DiskPush(verify=config.verify_disk_weights, timeout_s=config.update_timeout_s)
    if config.weight_sync == "distributed":
        return DistributedPush(master_address=config.sync_master_address, master_port=config.sync_master_port,
                               port_range=config.sync_port_range, backend=config.sync_backend,
                               device=config.sync_device, bucket_bytes=config.bucket_mb << 20,
                               timeout_s=config.update_timeout_s)  # fmt: skip
    return TensorPush(devices=config.tensor_devices or (config.sync_device,), bucket_bytes=config.bucket_mb << 20,
                      timeout_s=config.update_timeout_s)  # fmt: skip


def moe_layout(model_dir: str) -> MoeLayout | None:
    """The routing layout of the model in `model_dir` (None for a dense model): which layers have a router,
    found by building the model's skeleton on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
    if not experts:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    layers = moe_layer_indices(model)
    return MoeLayout(num_layers=int(config.num_hidden_layers), top_k=int(config.num_experts_per_tok),
                     num_experts=experts, moe_layers=tuple(layers))  # fmt: skip
