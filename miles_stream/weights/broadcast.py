"""The `broadcast` weight transport: the trainer sends each version straight to the producers' devices over a
weight-update group (NCCL between GPUs; gloo on CPU, which is how it is tested here).

    trainer (rank 0) ── write(v): header [v, tensors, elements, float dtype], then one broadcast per tensor in
                        the model's state_dict order ──► every receiver (ranks 1..N, one per producer)
    producer         ── a thread waits in the broadcast: whatever arrives is kept (the last two versions);
                        read(manifest) returns that version once it is in (the announcement on {ns}:weights
                        still says which version exists, as for every transport)

The group has a fixed membership (`weights_group.receivers`): the trainer's first write waits until every
receiver has joined, and every broadcast needs every member. A producer that dies therefore stalls the next
write until `timeout_s`, which is then an error in the trainer (rebuilding the group around a lost member is
not built). Bytes are not checksummed: NCCL/gloo deliver them or fail. Multi-GPU runs: not run yet (no
multi-GPU machine lent); tested with gloo between processes on CPU.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import structlog
import torch

from miles_stream.config import check
from miles_stream.errors import WeightIntegrityError
from miles_stream.weights.collective import broadcast_from_rank0, init_weight_group
from miles_stream.weights.group import WeightsGroupConfig
from miles_stream.weights.manifest import ChunkInfo, TensorInfo, WeightManifest

log = structlog.get_logger(__name__)
NAME = "broadcast"
_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def wire_dtype(config: WeightsGroupConfig, dtype: torch.dtype) -> torch.dtype:
    """What a tensor of `dtype` travels as: floating tensors as `config.dtype`, others as they are."""
    return getattr(torch, config.dtype) if dtype.is_floating_point else dtype


class BroadcastSender:
    """The trainer's side (rank 0)."""

    name = NAME

    def __init__(self, config: WeightsGroupConfig) -> None:
        self.config = config
        self._group: Any = None

    async def write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        await asyncio.to_thread(self._send, version, state)
        tensors, offset = [], 0  # the layout as if the version were one chunk (nothing is stored: no checksum)
        for name, t in state.items():
            wire = wire_dtype(self.config, t.dtype)
            nbytes = t.numel() * wire.itemsize
            tensors.append(TensorInfo(name, str(wire).removeprefix("torch."), tuple(t.shape), 0, offset, nbytes))
            offset += nbytes
        return WeightManifest(version=version, transport=NAME, location=self.config.group_name,
                              tensors=tuple(tensors), chunks=(ChunkInfo(offset, ""),))  # fmt: skip

    async def read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        raise WeightIntegrityError("the trainer sends broadcast versions; it does not read them")

    async def delete(self, version: int) -> None:
        return None  # nothing is stored

    async def stored(self) -> list[int]:
        return []

    def _send(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        c = self.config
        if self._group is None:
            log.info("weights_group_waiting", receivers=c.receivers, port=c.master_port)
            self._group = init_weight_group(c.backend, c.master_address, c.master_port, c.receivers + 1, 0,
                                            c.group_name, c.timeout_s)  # fmt: skip
        tensors = list(state.values())
        header = torch.tensor([version, len(tensors), sum(t.numel() for t in tensors), _DTYPE_CODES[c.dtype]],
                              dtype=torch.int64)  # fmt: skip
        broadcast_from_rank0(self._group, header.to(c.device))
        for tensor in tensors:
            broadcast_from_rank0(self._group, tensor.detach().to(c.device, wire_dtype(c, tensor.dtype)).contiguous())


class BroadcastReceiver:
    """A producer's side (rank `rank` >= 1): joins the group and receives every version in a thread."""

    name = NAME

    def __init__(self, config: WeightsGroupConfig, rank: int, layout: Mapping[str, torch.Tensor]) -> None:
        check(1 <= rank <= config.receivers, "rollout.weights_rank", f"must be in [1, {config.receivers}]")
        self.config, self.rank = config, rank
        self.layout = {name: (t.shape, wire_dtype(config, t.dtype)) for name, t in layout.items()}  # this model's
        self._versions: dict[int, dict[str, torch.Tensor]] = {}
        self._arrived = threading.Condition()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._receive_forever, name="miles-weights-receiver", daemon=True)
        self._thread.start()

    async def write(self, version: int, state: Mapping[str, torch.Tensor]) -> WeightManifest:
        raise WeightIntegrityError("a producer receives broadcast versions; it does not send them")

    async def read(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        """The state of `manifest.version`, waiting for it to arrive (up to timeout_s)."""
        return await asyncio.to_thread(self._wait_for, manifest.version)

    async def delete(self, version: int) -> None:
        return None

    async def stored(self) -> list[int]:
        return []

    def _wait_for(self, version: int) -> dict[str, torch.Tensor]:
        with self._arrived:
            ready = self._arrived.wait_for(lambda: version in self._versions or self._failure is not None
                                           or max(self._versions, default=-1) > version,
                                           timeout=self.config.timeout_s)  # fmt: skip
            if version in self._versions:
                return self._versions[version]
            if self._failure is not None:
                raise WeightIntegrityError(f"the weight group failed: {self._failure!r}")
            if not ready or version not in self._versions:
                raise WeightIntegrityError(f"version {version} did not arrive over the weight group (or was "
                                           "superseded before it was read)")  # fmt: skip
            return self._versions[version]

    def _receive_forever(self) -> None:
        c = self.config
        try:
            group = init_weight_group(c.backend, c.master_address, c.master_port, c.receivers + 1, self.rank,
                                      c.group_name, c.timeout_s)  # fmt: skip
            elements = sum(torch.Size(shape).numel() for shape, _ in self.layout.values())
            while True:
                header = torch.zeros(4, dtype=torch.int64, device=c.device)
                broadcast_from_rank0(group, header)  # the next version, within timeout_s
                version, count, total, code = (int(x) for x in header.tolist())
                if code != _DTYPE_CODES[c.dtype]:
                    raise WeightIntegrityError(f"version {version}: floats come as dtype code {code}, not "
                                               f"{c.dtype}: weights_group.dtype differs from the trainer")  # fmt: skip
                if (count, total) != (len(self.layout), elements):
                    raise WeightIntegrityError(f"version {version}: {count} tensors / {total} elements came, this "
                                               f"model has {len(self.layout)} / {elements}")  # fmt: skip
                state = {}
                for name, (shape, dtype) in self.layout.items():
                    tensor = torch.empty(shape, dtype=dtype, device=c.device)
                    broadcast_from_rank0(group, tensor)
                    state[name] = tensor
                with self._arrived:
                    self._versions[version] = state
                    for old in sorted(self._versions)[:-2]:  # the last two: one being loaded, one newer
                        del self._versions[old]
                    self._arrived.notify_all()
        except BaseException as exc:
            log.warning("weights_group_closed", error=repr(exc))  # the trainer left (or failed): no more versions
            with self._arrived:
                self._failure = exc
                self._arrived.notify_all()
