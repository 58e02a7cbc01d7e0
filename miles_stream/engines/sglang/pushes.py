"""The three ways one version's bytes reach paused SGLang servers (the sequence around them: updates.py).

- `disk` (our `file` transport, a directory every server can read): `/update_weights_from_disk` with the
  version's directory. The file's sha256 is checked first (the manifest's).
- `distributed` (separate GPUs): this process is rank 0 of a weight-update group, the servers' TP ranks
  follow (`rank_offset` = 1 + the GPUs of the servers before: SGLang's rank is rank_offset + tp_rank,
  sglang/srt/model_executor/model_runner_components/weight_updater.py:124); per bucket one
  `/update_weights_from_distributed` call per server while the same tensors are broadcast from rank 0, one per
  name, in list order (weight_updater.py:282-298). Backend `nccl` in production; `gloo` on CPU in the tests.
- `tensor` (colocated, CUDA IPC): `/update_weights_from_tensor` with one pickled (name, tensor) list per TP
  rank, each rank reading its own entry only (managers/tp_worker.py:194-201); see payload.serialize_for_rank.

A weight-update group can be made once per name: SGLang keeps it by name until
`/destroy_weights_update_group` (weight_updater.py:98, 146-157) and torch refuses a name still registered (a
400), the rendezvous port stays bound while our side's group lives, and SGLang's side of a rendezvous waits
up to torch's default 30 minutes (utils/common.py:2894-2899). So a group is remade (membership changed, or a
push failed) only after destroying it on every member and on our side, under a name and port never used
before in this process, and every wait here is bounded by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import socket
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch

from miles_stream.engines.sglang.client import SGLangClient, SGLangError
from miles_stream.engines.sglang.payload import serialize_for_rank
from miles_stream.errors import WeightIntegrityError
from miles_stream.weights.collective import broadcast_from_rank0, destroy_weight_group, init_weight_group
from miles_stream.weights.manifest import WeightManifest, buckets

log = structlog.get_logger(__name__)


class DiskPush:
    """`/update_weights_from_disk` with the file transport's version directory (shared by every server)."""

    session = False

    def __init__(self, *, verify: bool = True, timeout_s: float = 600.0) -> None:
        self.verify, self.timeout_s = verify, timeout_s

    def needs_state(self) -> bool:
        return False

    async def release(self) -> None:
        return None

    async def push(self, servers: Sequence[SGLangClient], version: int, manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        if manifest.transport != "file":
            raise WeightIntegrityError(f"version {version}: weight_sync=disk needs the file transport, "
                                       f"not {manifest.transport!r}")  # fmt: skip
        if self.verify:
            await asyncio.to_thread(verify_file, manifest)
        payload = {"model_path": manifest.location, "weight_version": str(version), "flush_cache": False,
                   "abort_all_requests": False}  # fmt: skip
        await asyncio.gather(*(s.call("/update_weights_from_disk", payload, timeout_s=self.timeout_s)
                               for s in servers))  # fmt: skip


def verify_file(manifest: WeightManifest) -> None:
    """The version's safetensors file against the manifest's sha256, read in 16 MiB pieces."""
    path = Path(manifest.location) / "model.safetensors"
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while piece := f.read(16 << 20):
                digest.update(piece)
    except OSError as exc:
        raise WeightIntegrityError(f"version {manifest.version}: cannot read {path}: {exc}") from exc
    if (manifest.chunks[0].sha256 if manifest.chunks else "") != digest.hexdigest():
        raise WeightIntegrityError(f"version {manifest.version}: {path} does not match its manifest's sha256")


async def settle(*calls: Awaitable[Any]) -> None:
    """Await every call, then raise the first failure: a bucket's calls all end before the push is judged, so
    no call of a failed push is still running when the sessions are ended."""
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DistributedPush:
    """Rank 0 of a weight-update group with the servers' GPUs; one broadcast per tensor, in list order."""

    session = True

    def __init__(self, *, master_address: str, master_port: int, port_range: int = 64, backend: str = "nccl",
                 device: str = "cuda", bucket_bytes: int = 512 << 20, timeout_s: float = 600.0) -> None:  # fmt: skip
        self.master_address, self.master_port, self.port_range = master_address, master_port, port_range
        self.backend, self.device, self.bucket_bytes, self.timeout_s = backend, device, bucket_bytes, timeout_s
        self._tag = secrets.token_hex(3)  # a name no earlier process left registered on a server
        self._made = itertools.count()
        self._ports = itertools.cycle(range(master_port, master_port + port_range))
        self._group: Any = None
        self._name = ""
        self._members: tuple[SGLangClient, ...] = ()  # the servers that joined (or may have) under _name
        self._broken = False

    @property
    def group_name(self) -> str:
        return self._name

    def needs_state(self) -> bool:
        return True

    async def connect(self, servers: Sequence[SGLangClient]) -> None:
        """(Re)create the group over `servers` unless it stands, whole, over exactly them: every server joins
        while this process does (a rendezvous on all sides); the world size is fixed, so another membership
        means another group."""
        if self._group is not None and not self._broken and self._members == tuple(servers):
            return
        await self.release()
        tp = [int((await s.server_info()).get("tp_size", 1)) for s in servers]
        world, offsets = 1 + sum(tp), [1 + sum(tp[:i]) for i in range(len(servers))]
        self._name, port = f"miles-wu-{self._tag}-{next(self._made)}", self._free_port()
        self._members = tuple(servers)
        joins = [s.call("/init_weights_update_group", {"master_address": self.master_address, "master_port": port,
                                                        "rank_offset": offset, "world_size": world,
                                                        "group_name": self._name, "backend": self.backend},
                        timeout_s=self.timeout_s)
                 for s, offset in zip(servers, offsets, strict=True)]  # fmt: skip
        ours = asyncio.to_thread(init_weight_group, self.backend, self.master_address, port, world, 0, self._name,
                                 self.timeout_s)  # fmt: skip
        try:
            results = await asyncio.wait_for(asyncio.gather(ours, *joins, return_exceptions=True), self.timeout_s)
        except TimeoutError as exc:
            self._broken = True
            raise SGLangError(self._name, f"the weight group did not form within {self.timeout_s:g} s") from exc
        errors = [r for r in results if isinstance(r, BaseException)]
        if not isinstance(results[0], BaseException):
            self._group = results[0]
        if errors:
            self._broken = True  # destroyed on every side at the next connect or release
            raise errors[0] if isinstance(errors[0], SGLangError) else SGLangError(self._name, repr(errors[0]))
        self._broken = False
        log.info("weight_group_ready", world_size=world, servers=len(servers), group=self._name, port=port)

    async def release(self) -> None:
        """Destroy the group on every member and on our side (each bounded); a member that never joined, or
        already lost it, answers 400 and is left as it is."""
        members, group, name = self._members, self._group, self._name
        self._group, self._members, self._broken = None, (), False
        if not members and group is None:
            return
        results = await asyncio.gather(*(s.call("/destroy_weights_update_group", {"group_name": name},
                                                timeout_s=min(self.timeout_s, 30.0)) for s in members),
                                       return_exceptions=True)  # fmt: skip
        for s, result in zip(members, results, strict=True):
            if isinstance(result, SGLangError) and "does not exist" not in str(result):
                log.warning("weight_group_destroy_failed", url=s.url, group=name, error=str(result))
        if group is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(destroy_weight_group, group), min(self.timeout_s, 30.0))
            except (TimeoutError, RuntimeError, ValueError) as exc:
                log.warning("weight_group_destroy_failed", url="self", group=name, error=repr(exc))
        log.info("weight_group_destroyed", group=name, servers=len(members))

    def _free_port(self) -> int:
        """The next port of the range that nothing listens on (our last group's store may still hold one)."""
        for _ in range(self.port_range):
            port = next(self._ports)
            with socket.socket() as probe:
                try:
                    probe.bind(("", port))
                except OSError:
                    continue
            return port
        last = self.master_port + self.port_range - 1
        raise SGLangError(self.master_address, f"no free port in {self.master_port}..{last} for a weight group "
                                               "(rollout.sglang.sync_master_port / sync_port_range)")  # fmt: skip

    async def push(self, servers: Sequence[SGLangClient], version: int, manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        assert state is not None
        try:
            await self.connect(servers)
            for bucket in buckets(state, self.bucket_bytes):
                # no weight_version here: SGLang records it when one bucket succeeds (updates.py)
                payload = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                           "shapes": [list(t.shape) for _, t in bucket], "group_name": self._name,
                           "flush_cache": False}  # fmt: skip
                calls = [s.call("/update_weights_from_distributed", payload, timeout_s=self.timeout_s)
                         for s in servers]  # fmt: skip
                send = asyncio.to_thread(self._broadcast, [t for _, t in bucket])
                await settle(send, *calls)
        except BaseException:  # a broken or timed-out collective: the group is remade before its next use
            self._broken = True
            raise

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            broadcast_from_rank0(self._group, tensor.detach().to(self.device).contiguous())


class TensorPush:
    """Colocated servers: CUDA IPC handles of tensors this process holds on the servers' GPUs, one entry per TP
    rank, staged on `devices[rank]` (this process's name for that rank's GPU); the GPU goes by UUID."""

    session = True

    def __init__(self, *, devices: Sequence[str] = ("cuda",), bucket_bytes: int = 512 << 20,
                 timeout_s: float = 600.0) -> None:  # fmt: skip
        self.devices, self.bucket_bytes, self.timeout_s = tuple(devices), bucket_bytes, timeout_s

    def needs_state(self) -> bool:
        return True

    async def release(self) -> None:
        return None

    async def push(self, servers: Sequence[SGLangClient], version: int, manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        assert state is not None
        for bucket in buckets(state, self.bucket_bytes):
            held = [[(name, t.detach().to(device, copy=True).contiguous()) for name, t in bucket]  # rank's own
                    for device in self.devices]  # fmt: skip
            payload = {"serialized_named_tensors": [serialize_for_rank(named) for named in held],
                       "load_format": None, "flush_cache": False}  # fmt: skip
            await settle(*(s.call("/update_weights_from_tensor", payload, timeout_s=self.timeout_s) for s in servers))
            del held  # the servers have copied: the IPC handles may go
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]
