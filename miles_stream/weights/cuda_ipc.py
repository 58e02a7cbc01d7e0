"""The `cuda_ipc` weight transport: producers on the trainer's host copy each version device to device.

    trainer ── write(v): copy the weights into one of two flat device buffers (slots, alternating), sum the
               slot's 32-bit words on the device, announce: slot's IPC handle + layout + sum (no bytes move)
    producer ── read(manifest): open the slot's memory by its handle (once), one device copy into a staging
               buffer of its own, sum it again: a mismatch means the trainer overwrote the slot meanwhile
               (a version two behind), which is refused like a corrupt chunk; the engine then copies the
               staged tensors into its parameters between two decode steps

This is how miles feeds SGLang on one node (CUDA IPC handles of the trainer's tensors); here the receiver is
the native engine. The handle is the plain tuple `UntypedStorage._share_cuda_()` gives (device, handle bytes,
sizes, the sender's reference counter, event), carried as msgpack-safe values in the manifest's `location`:
nothing is pickled. The device is named by its UUID, as SGLang and miles do, and the producer finds the same
GPU among its own (a bare ordinal means another GPU under another CUDA_VISIBLE_DEVICES).

The chunk checksum in the manifest is this device sum (`sum32:` + hex), not a sha256: it catches a torn or
overwritten copy (any change moves it, but by coincidence), not tampering; the memory never leaves the host.
Cost: two copies of the weights on the trainer's GPU and one on each producer's (its staging buffer).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import torch

from miles_stream.errors import WeightIntegrityError
from miles_stream.weights.manifest import DTYPES, ChunkInfo, TensorInfo, WeightManifest

NAME = "cuda_ipc"
_ALIGN = 256
_NAMES = {v: k for k, v in DTYPES.items()}


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _layout(state: Mapping[str, torch.Tensor]) -> tuple[list[TensorInfo], int]:
    tensors, offset = [], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        tensors.append(TensorInfo(name, _NAMES[t.dtype], tuple(t.shape), 0, offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return tensors, offset


def word_sum(flat: torch.Tensor) -> int:
    """Sum of the buffer's little-endian 32-bit words (zero-padded), in int64: exact, no overflow below 2**32
    words. Chunked so the int64 temporary stays small."""
    words = flat[: flat.numel() // 4 * 4].view(torch.int32)
    total = int(flat[words.numel() * 4 :].to(torch.int64).sum()) if flat.numel() % 4 else 0
    step = 1 << 26
    for i in range(0, words.numel(), step):
        total += int(words[i : i + step].to(torch.int64).sum())
    return total


def _views(flat: torch.Tensor, tensors: tuple[TensorInfo, ...] | list[TensorInfo]) -> dict[str, torch.Tensor]:
    return {t.name: flat[t.offset : t.offset + t.nbytes].view(DTYPES[t.dtype]).view(t.shape) for t in tensors}


class CudaIpcSender:
    """The trainer's side: two slots on the weights' device, written in turn."""

    name = NAME

    def __init__(self) -> None:
        self._slots: list[torch.Tensor] = []
        self._handles: list[list[Any]] = []
        self._next = 0

    async def write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        return await asyncio.to_thread(self._write, version, state)

    def _write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        tensors, size = _layout(state)
        device = next(iter(state.values())).device
        if device.type != "cuda":
            raise WeightIntegrityError("the cuda_ipc transport needs the trainer's weights on a CUDA device")
        if not self._slots or self._slots[0].numel() != size:
            self._slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
            self._handles = [_share(s) for s in self._slots]
        slot = self._next
        self._next ^= 1
        with torch.no_grad():
            for info, (_, tensor) in zip(tensors, state.items(), strict=True):
                _views(self._slots[slot], [info])[info.name].copy_(tensor)
        torch.cuda.synchronize(device)
        checksum = word_sum(self._slots[slot])
        location = json.dumps({"uuid": device_uuid(device), "slot": slot, "size": size,
                               "handle": self._handles[slot]})  # fmt: skip
        return WeightManifest(version=version, transport=NAME, location=location, tensors=tuple(tensors),
                              chunks=(ChunkInfo(size, f"sum32:{checksum:x}"),))  # fmt: skip

    async def read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        raise WeightIntegrityError("the trainer's cuda_ipc side does not read versions")

    async def delete(self, version: int) -> None:
        """Nothing to delete: the two slots are reused."""

    async def stored(self) -> list[int]:
        return []


class CudaIpcReceiver:
    """A producer's side: opens the trainer's slots once, copies each version into its own buffer."""

    name = NAME

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._opened: dict[str, torch.Tensor] = {}
        self._staging: torch.Tensor | None = None

    async def write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        raise WeightIntegrityError("a producer does not publish weights")

    async def read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        return await asyncio.to_thread(self._read, manifest)

    def _read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda" and getattr(self.device, "index", None) is None:  # "cuda": the current one
            self.device = torch.device(f"cuda:{torch.cuda.current_device()}")
        try:
            where = json.loads(manifest.location)
            size, handle = int(where["size"]), list(where["handle"])
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightIntegrityError(f"version {manifest.version}: malformed cuda_ipc location: {exc}") from exc
        if self.device.type != "cuda" or device_uuid(self.device) != where["uuid"]:
            raise WeightIntegrityError(f"version {manifest.version}: cuda_ipc weights live on GPU {where['uuid']}, "
                                       f"this producer's engine is on {self.device}: use the redis, file or "
                                       "broadcast transport across GPUs or hosts")  # fmt: skip
        key = f"{handle[1]}:{handle[3]}"
        source = self._opened.get(key)
        if source is None:
            source = self._opened[key] = _open(handle, self.device)[:size]
        if self._staging is None or self._staging.numel() != size:
            self._staging = torch.empty(size, dtype=torch.uint8, device=self.device)
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(stream):
            self._staging.copy_(source)
        stream.synchronize()
        want = manifest.chunks[0].sha256 if manifest.chunks else ""
        if f"sum32:{word_sum(self._staging):x}" != want:
            raise WeightIntegrityError(f"version {manifest.version}: the cuda_ipc slot changed while it was "
                                       "copied (the trainer was two versions ahead); a newer one follows")  # fmt: skip
        return _views(self._staging, manifest.tensors)

    async def delete(self, version: int) -> None:
        """Nothing to delete."""

    async def stored(self) -> list[int]:
        return []


def _share(slot: torch.Tensor) -> list[Any]:
    """The slot's CUDA IPC handle as msgpack/JSON-safe values (bytes as hex)."""
    storage = slot.untyped_storage()
    dev, handle, size, offset, ref_handle, ref_offset, event, sync = storage._share_cuda_()  # type: ignore[no-untyped-call]
    return [int(dev), handle.hex(), int(size), int(offset), ref_handle.hex(), int(ref_offset),
            event.hex() if event else "", bool(sync)]  # fmt: skip


def _open(handle: list[Any], device: torch.device) -> torch.Tensor:
    _, mem, size, offset, ref_handle, ref_offset, event, sync = handle
    torch.cuda._lazy_init()  # type: ignore[no-untyped-call]
    storage = torch.UntypedStorage._new_shared_cuda(
        device.index or 0, bytes.fromhex(mem), size, offset, bytes.fromhex(ref_handle), ref_offset,
        bytes.fromhex(event) if event else None, sync,
    )  # fmt: skip
    flat = torch.empty(0, dtype=torch.uint8, device=device)
    flat.set_(storage, 0, (size,), (1,))
    return flat
