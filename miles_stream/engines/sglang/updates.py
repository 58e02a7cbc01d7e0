"""Weight updates to SGLang servers: the sequence every server goes through, and the three ways bytes travel.

    pause(mode) -> flush cache (retried while busy; not after in_place) -> begin_weight_update (0.5.2x; a 404
    means an older server without the session) -> the buckets -> update_weight_version -> end_weight_update
    -> continue_generation

- `disk` (our `file` transport, a directory every server can read): `/update_weights_from_disk` with the
  version's directory; it records the version itself. The file's sha256 is checked first (the manifest's).
- `distributed` (separate GPUs): this process is rank 0 of a weight-update group, the servers' TP ranks
  follow (`rank_offset` = 1 + the GPUs of the servers before); per bucket one `/update_weights_from_distributed`
  call per server while the same tensors are broadcast from rank 0, one per name, in list order. Backend
  `nccl` (CUDA tensors) in production; `gloo` works on CPU, which is how it is tested here.
- `tensor` (colocated, CUDA IPC): `/update_weights_from_tensor` with, per TP rank, a pickled list of
  (name, CUDA tensor) that carries IPC handles, not data; the tensors stay referenced until the server replied.

Each step has a timeout (a hung collective becomes an error). A server whose update failed part-way is left
paused, never resumed on half-updated weights: `WeightUpdateError` names it and the engine stops using it
until a later version syncs it whole.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
import torch

from miles_stream.engines.sglang.client import NotSupported, SGLangClient, SGLangError
from miles_stream.errors import MilesStreamError, WeightIntegrityError
from miles_stream.weights.collective import broadcast_from_rank0, init_weight_group
from miles_stream.weights.manifest import WeightManifest, buckets

log = structlog.get_logger(__name__)
PauseMode = Literal["abort", "retract", "in_place"]


class WeightUpdateError(MilesStreamError):
    def __init__(self, url: str, version: int, step: str, cause: BaseException) -> None:
        super().__init__(f"{url}: weight update to version {version} failed at {step}: {cause}")
        self.url, self.version, self.step = url, version, step


class WeightPush(Protocol):
    """How one version's bytes reach the servers once they are paused (and flushed, and in a session)."""

    session: bool  # needs begin/end_weight_update around it and a separate version call

    async def push(self, servers: Sequence[SGLangClient], version: int, manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None: ...  # fmt: skip

    def needs_state(self) -> bool: ...


async def update_servers(
    servers: Sequence[SGLangClient],
    version: int,
    manifest: WeightManifest,
    state: Mapping[str, torch.Tensor] | None,
    push: WeightPush,
    *,
    pause_mode: PauseMode,
    step_timeout_s: float,
) -> list[WeightUpdateError]:
    """Take every server in `servers` through the update; returns the servers that failed (left paused).
    The push itself runs over all servers at once (a collective needs every member)."""
    failed: list[WeightUpdateError] = []
    ready: list[SGLangClient] = []
    for result in await asyncio.gather(*(_prepare(s, version, push, pause_mode, step_timeout_s) for s in servers),
                                       return_exceptions=True):  # fmt: skip
        if isinstance(result, WeightUpdateError):
            failed.append(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            ready.append(result)
    if not ready:
        return failed
    try:
        await asyncio.wait_for(push.push(ready, version, manifest, state), step_timeout_s)
    except TimeoutError:
        cause = TimeoutError(f"timed out after {step_timeout_s:g} s")
        return failed + [WeightUpdateError(s.url, version, "push", cause) for s in ready]
    except (SGLangError, WeightIntegrityError, OSError, RuntimeError) as exc:
        return failed + [WeightUpdateError(s.url, version, "push", exc) for s in ready]
    for outcome in await asyncio.gather(*(_finish(s, version, push, step_timeout_s) for s in ready),
                                        return_exceptions=True):  # fmt: skip
        if isinstance(outcome, WeightUpdateError):
            failed.append(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
    return failed


async def _prepare(
    server: SGLangClient, version: int, push: WeightPush, mode: PauseMode, timeout_s: float
) -> SGLangClient:
    step = "pause_generation"
    try:
        await server.pause(mode)
        if mode != "in_place":  # frozen requests keep their KV: a flush would fail
            step = "flush_cache"
            await _flush(server, timeout_s)
        if push.session:
            step = "begin_weight_update"
            with contextlib.suppress(NotSupported):  # an SGLang before the session (0.5.16) works without it
                await server.call("/begin_weight_update", {}, timeout_s=timeout_s)
    except (SGLangError, TimeoutError) as exc:
        raise WeightUpdateError(server.url, version, step, exc) from exc
    return server


async def _flush(server: SGLangClient, timeout_s: float) -> None:
    """Flush the prefix cache, retried about once a second while the server still has requests."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await server.flush_cache(timeout_s=timeout_s)
            return
        except SGLangError as exc:
            if exc.status != 400 or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(1.0)


async def _finish(server: SGLangClient, version: int, push: WeightPush, timeout_s: float) -> None:
    step = "update_weight_version"
    try:
        if push.session:
            await server.call("/update_weight_version", {"new_version": str(version), "abort_all_requests": False},
                              timeout_s=timeout_s)  # fmt: skip
            step = "end_weight_update"
            with contextlib.suppress(NotSupported):
                await server.call("/end_weight_update", {}, timeout_s=timeout_s)
        step = "check weight_version"
        reported = (await server.model_info()).get("weight_version")
        if reported != str(version):
            raise SGLangError(server.url, f"reports weight_version {reported!r} after the update to {version}")
        step = "continue_generation"
        await server.resume()
    except (SGLangError, TimeoutError) as exc:
        raise WeightUpdateError(server.url, version, step, exc) from exc


class DiskPush:
    """`/update_weights_from_disk` with the file transport's version directory (shared by every server)."""

    session = False

    def __init__(self, *, verify: bool = True, timeout_s: float = 600.0) -> None:
        self.verify, self.timeout_s = verify, timeout_s

    def needs_state(self) -> bool:
        return False

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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DistributedPush:
    """Rank 0 of a weight-update group with the servers' GPUs; one broadcast per tensor, in list order."""

    session = True

    def __init__(self, *, master_address: str, master_port: int, backend: str = "nccl", device: str = "cuda",
                 group_name: str = "miles-weight-update", bucket_bytes: int = 512 << 20,
                 timeout_s: float = 600.0) -> None:  # fmt: skip
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.device, self.group_name, self.bucket_bytes, self.timeout_s = device, group_name, bucket_bytes, timeout_s
        self._group: Any = None
        self._members: tuple[str, ...] = ()

    def needs_state(self) -> bool:
        return True

    async def connect(self, servers: Sequence[SGLangClient]) -> None:
        """(Re)create the group over `servers`: every server joins while this process does (a blocking
        rendezvous on all sides); the world size is fixed, so a changed membership means a new group."""
        if self._members == tuple(s.url for s in servers):
            return
        await self.close(servers=[])
        tp = [int((await s.server_info()).get("tp_size", 1)) for s in servers]
        world = 1 + sum(tp)
        offsets = [1 + sum(tp[:i]) for i in range(len(servers))]
        joins = [s.call("/init_weights_update_group", {"master_address": self.master_address,
                                                        "master_port": self.master_port, "rank_offset": offset,
                                                        "world_size": world, "group_name": self.group_name,
                                                        "backend": self.backend}, timeout_s=self.timeout_s)
                 for s, offset in zip(servers, offsets, strict=True)]  # fmt: skip
        ours = asyncio.to_thread(init_weight_group, self.backend, self.master_address, self.master_port, world, 0,
                                 self.group_name, self.timeout_s)  # fmt: skip
        results = await asyncio.wait_for(asyncio.gather(ours, *joins), self.timeout_s)
        self._group, self._members = results[0], tuple(s.url for s in servers)
        log.info("weight_group_ready", world_size=world, servers=len(servers), backend=self.backend)

    async def close(self, servers: Sequence[SGLangClient]) -> None:
        if self._group is None:
            return
        for s in servers:
            try:
                await s.call("/destroy_weights_update_group", {"group_name": self.group_name}, timeout_s=30)
            except SGLangError as exc:
                log.warning("weight_group_destroy_failed", url=s.url, error=str(exc))
        self._group, self._members = None, ()

    async def push(self, servers: Sequence[SGLangClient], version: int, manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        assert state is not None
        try:
            await self._push(servers, version, state)
        except BaseException:  # a broken or timed-out collective: the group is not reused
            self._group, self._members = None, ()
            raise

    async def _push(self, servers: Sequence[SGLangClient], version: int, state: Mapping[str, torch.Tensor]) -> None:
        await self.connect(servers)
        for bucket in buckets(state, self.bucket_bytes):
            payload = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                       "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                       "flush_cache": False, "weight_version": str(version)}  # fmt: skip
            calls = [s.call("/update_weights_from_distributed", payload, timeout_s=self.timeout_s) for s in servers]
            send = asyncio.to_thread(self._broadcast, [t for _, t in bucket])
            await asyncio.gather(send, *calls)

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            broadcast_from_rank0(self._group, tensor.detach().to(self.device).contiguous())


class TensorPush:
    """Colocated servers: CUDA IPC handles of tensors this process holds on the servers' GPU (one entry per
    TP rank, each read only by the rank on the same GPU: here one server per GPU, TP 1)."""

    session = True

    def __init__(self, *, device: str = "cuda", bucket_bytes: int = 512 << 20, timeout_s: float = 600.0) -> None:
        self.device, self.bucket_bytes, self.timeout_s = device, bucket_bytes, timeout_s

    def needs_state(self) -> bool:
        return True

    async def push(self, servers: Sequence[SGLangClient], version: int, manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None:  # fmt: skip
        assert state is not None
        for s in servers:  # one serialized entry per TP rank, each on its own GPU: only TP 1 is built
            if (tp := int((await s.server_info()).get("tp_size", 1))) != 1:
                raise SGLangError(s.url, f"weight_sync=tensor is built for TP 1 servers; this one has tp_size {tp}")
        for bucket in buckets(state, self.bucket_bytes):
            held = [(name, t.detach().to(self.device).contiguous()) for name, t in bucket]
            payload = {"serialized_named_tensors": [serialize_named_tensors(held)], "load_format": None,
                       "flush_cache": False}  # fmt: skip
            await asyncio.gather(*(s.call("/update_weights_from_tensor", payload, timeout_s=self.timeout_s)
                                   for s in servers))  # fmt: skip
            del held  # the servers have copied: the IPC handles may go
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """A list of (name, tensor) pickled with multiprocessing's reducers (a CUDA tensor becomes an IPC handle)
    and base64-encoded: the form SGLang's `MultiprocessingSerializer.deserialize` reads."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  # registers the tensor reducers

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(named)
    return base64.b64encode(buffer.getvalue()).decode()
