"""The stand-in SGLang server's weight routes (tests/sglang_standin.py): the weight-update session, weight-update
process groups, the three ways weights arrive, and the weight version, each as SGLang 0.5.23 does it (file:line
in the wheel cited at each behaviour). The stand-in plays one TP rank; `--tp-size` changes only /server_info."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import pickle
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

WU = "sglang/srt/managers/scheduler_components/weight_updater.py"
MRU = "sglang/srt/model_executor/model_runner_components/weight_updater.py"


class Reply(Exception):
    """An HTTP answer other than 200 (here, not in sglang_standin.py: that one runs as __main__)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


class Weights:
    def __init__(self, server: Any, args: argparse.Namespace) -> None:
        self.server, self.args = server, args
        self.version = "default"  # arg_groups/fields/serving.py:172-175
        self.session = False  # WU:81-84, 98-99: _session, replicated on every TP rank
        self.groups: dict[str, Any] = {}  # MRU:98: _model_update_group, by name
        self.loaded: list[list[str]] = []  # names of each successful load, for the tests
        self.entries: list[int] = []  # per tensor call: how many entries, how many distinct (tests)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stats(self) -> dict[str, Any]:
        return {"version": self.version, "session": self.session, "groups": sorted(self.groups),
                "loaded": self.loaded, "entries": self.entries}  # fmt: skip

    def _reply(self, success: bool, message: str, **more: Any) -> Any:
        """The weight routes answer {"success", "message"} with 200, or 400 on failure (http_server.py:1300-1556)."""
        if not success:
            raise Reply(400, {"success": False, "message": message, **more})
        return {"success": True, "message": message, **more}

    def _dp_one(self, what: str) -> None:
        """tokenizer_control_mixin.py:451-453, 464-466, 509-511, 569-571: an assert, so a 500."""
        assert self.args.dp_size == 1, f"data-parallel replicas are not supported for {what}"

    def _load(self, state: dict[str, torch.Tensor]) -> tuple[bool, str]:
        """Load into the model at the version it serves now (a load does not move the version by itself)."""
        faults = self.server.faults
        calls = faults.get("fail_update_call", 0) or (1 if faults.pop("fail_next_update", False) else 0)
        if self.server.faults.get("hang_update_s"):
            time.sleep(self.server.faults["hang_update_s"])
        if calls:
            self.server.faults["fail_update_call"] = calls - 1
            if calls == 1:
                return False, "Failed to update parameter online: injected failure."  # MRU:324-341's words
        self.run(self.server.engine.update_weights(_ours(self.version), state))
        self.loaded.append(sorted(state))
        return True, "Succeeded to update parameter online."

    def _record_version(self, version: str | None) -> None:
        """WU:135-136 + scheduler.py:5630-5641 and tokenizer_control_mixin.py:1072-1078: a given version is
        recorded; the one the next tokens are generated under (scheduler.py:6404-6406)."""
        if version is not None and version != self.version:
            self.version = version
            self.run(self.server.engine.update_weights(_ours(version), {}))

    def _flush_after(self, body: dict[str, Any], success: bool, message: str) -> tuple[bool, str]:
        """WU:120-133: flush_cache (true by default) fails the call while requests run or wait."""
        if body.get("flush_cache", True) and not self.server.flushable():
            return False, ("Weights were updated, but the cache was not flushed because requests are still "
                           "running or queued. Retract or finish them, then call /flush_cache.")  # fmt: skip
        return success, message

    # ---- the session: WU:309-335 ------------------------------------------------------------------------
    def do_begin_weight_update(self, body: dict[str, Any]) -> Any:
        if self.session:
            return self._reply(False, "a weight-update session is already open; call end_weight_update() first")
        self.session = True
        return self._reply(True, "Success")

    def do_end_weight_update(self, body: dict[str, Any]) -> Any:
        if not self.session:
            return self._reply(False, "no weight-update session is open; call begin_weight_update() first")
        self.session = False
        return self._reply(True, "Success")

    # ---- weight-update process groups: MRU:100-157 -------------------------------------------------------
    def do_init_weights_update_group(self, body: dict[str, Any]) -> Any:
        """One rank (rank_offset + tp_rank 0, MRU:124) joins a TCP rendezvous at master_address:master_port
        with the default 30-minute timeout (utils/common.py:2894-2899); a name torch still has registered is
        refused by torch and answered 400 (MRU:130-144)."""
        from torch.distributed import rendezvous  # type: ignore[attr-defined]
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

        self._dp_one("update weights from distributed")
        name, world, rank = body["group_name"], body["world_size"], body["rank_offset"]
        timeout = timedelta(seconds=self.args.rendezvous_timeout_s)
        try:
            url = f"tcp://{body['master_address']}:{body['master_port']}"
            store, _, _ = next(rendezvous(url, rank, world, timeout=timeout))
            store.set_timeout(timeout)
            made = _new_process_group_helper(world, rank, [], Backend(body.get("backend", "nccl")),
                                             PrefixStore(name, store), group_name=name, timeout=timeout)  # fmt: skip
            group = made[0] if isinstance(made, tuple) else made
            _world.pg_group_ranks[group] = {i: i for i in range(world)}  # utils/common.py:2925
        except Exception as exc:
            return self._reply(False, f"Failed to initialize custom process group: {exc}.")
        self.groups[name] = group
        return self._reply(True, "Succeeded to initialize custom process group.")

    def do_destroy_weights_update_group(self, body: dict[str, Any]) -> Any:
        import torch.distributed as dist

        self._dp_one("destroy parameter update group")
        name = body.get("group_name", "weight_update_group")  # io_struct.py:2146-2147
        if name not in self.groups:
            return self._reply(False, "The group to be destroyed does not exist.")
        try:
            dist.destroy_process_group(self.groups.pop(name))
        except Exception as exc:
            return self._reply(False, f"Failed to destroy custom process group: {exc}.")
        return self._reply(True, "Succeeded to destroy custom process group.")

    # ---- the three ways weights arrive -------------------------------------------------------------------
    def do_update_weights_from_distributed(self, body: dict[str, Any]) -> Any:
        """WU:187-230: needs the session; receives one broadcast per name in list order (MRU:260-298), loads,
        and records `weight_version` as soon as this one call succeeded."""
        import torch.distributed as dist

        self._dp_one("update weights from distributed")
        if not self.session:
            return self._reply(False, "update_weights_from_distributed must run between begin_weight_update() "
                                      "and end_weight_update()")  # fmt: skip
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:  # MRU:268-271, caught at WU:208-211
            return self._reply(False, f"Failed to receive weights: Group {name} not in {sorted(self.groups)}. "
                                      "Please call `init_weights_update_group` first.")  # fmt: skip
        received = {}
        options = dist.BroadcastOptions()
        options.rootRank = 0
        for tensor_name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            self.groups[name].broadcast([tensor], options).wait()
            received[tensor_name] = tensor
        success, message = self._load(received)
        if success:
            self._record_version(body.get("weight_version"))  # WU:224 + tokenizer_control_mixin.py:529-531
            success, message = self._flush_after(body, success, message)
        return self._reply(success, message)

    def do_update_weights_from_tensor(self, body: dict[str, Any]) -> Any:
        """WU:232-262: needs the session; this rank reads entry [tp_rank] only (tp_worker.py:194-201), base64
        text from HTTP (io_struct.py:2030-2035, utils/common.py:3109-3132), unpickled by SafeUnpickler with
        SGLang's patched CUDA rebuild (a device named by UUID: utils/patch_torch.py:80-99)."""
        self._dp_one("update weights from tensor")
        if not self.session:
            return self._reply(False, "update_weights_from_tensor must run between begin_weight_update() and "
                                      "end_weight_update()")  # fmt: skip
        entries = body["serialized_named_tensors"]
        self.entries += [len(entries), len(set(entries))]
        entry = entries[0]  # tp_rank 0
        named = loads_restricted(base64.b64decode(entry, validate=True))
        success, message = self._load({n: t.clone() for n, t in named})
        if success:
            self._record_version(body.get("weight_version"))  # WU:256 + tokenizer_control_mixin.py:592-594
            success, message = self._flush_after(body, success, message)
        return self._reply(success, message)

    def do_update_weights_from_disk(self, body: dict[str, Any]) -> Any:
        """WU:138-162 + MRU:174-258: no session; a failed load rolls back to the old weights; the version is
        recorded on success (WU:152-153), and the flush (true by default) follows."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(body["model_path"]).glob("*.safetensors")):
            state.update(load_file(str(f)))
        success, message = self._load(state)
        if not success:
            message = "Failed to update weights: injected failure.\nRolling back to original weights."
        else:
            self._record_version(body.get("weight_version"))
            success, message = self._flush_after(body, success, message)
        return self._reply(success, message, num_paused_requests=0)

    def do_update_weight_version(self, body: dict[str, Any]) -> Any:
        """http_server.py:1527-1556: aborts every request first unless told not to (io_struct.py:2155-2160)."""
        if body.get("abort_all_requests", True):
            self.server.do_abort_request({"abort_all": True})
        self._record_version(str(body["new_version"]))
        return self._reply(True, f"Weight version updated to {body['new_version']}", new_version=body["new_version"])


def _ours(version: str) -> int:
    return 0 if version == "default" else int(version)


def loads_restricted(data: bytes) -> Any:
    """utils/common.py:3085-3099 + 3144-3345 (SafeUnpickler): only allow-listed globals; the ones a tensor
    pickle names are listed here (torch's rebuild functions, storage and dtype types)."""
    allowed = {("torch.multiprocessing.reductions", n) for n in ("rebuild_tensor", "rebuild_cuda_tensor",
               "rebuild_storage_fd", "rebuild_storage_filename", "rebuild_typed_storage")}  # fmt: skip
    allowed |= {("torch", "Tensor"), ("torch", "Size"), ("torch.storage", "UntypedStorage"),
                ("torch.storage", "TypedStorage"), ("torch.nn.parameter", "Parameter")}  # fmt: skip

    class SafeUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return rebuild_cuda_tensor_by_uuid  # what the name resolves to once SGLang has patched torch
            if (module, name) in allowed or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                             torch.dtype)):  # fmt: skip
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"Deserialization of {module}.{name} is not allowed")

    return SafeUnpickler(io.BytesIO(data)).load()


def rebuild_cuda_tensor_by_uuid(*args: Any) -> Any:
    """utils/patch_torch.py:80-99: argument 6, the device, may be a GPU's UUID, found among this process's
    devices; an int is taken as this process's own ordinal (so a sender's bare ordinal names whatever GPU has
    that ordinal here)."""
    from torch.multiprocessing import reductions

    device = args[6]
    if isinstance(device, str):
        found = [i for i in range(torch.cuda.device_count()) if str(torch.cuda.get_device_properties(i).uuid) == device]
        if not found:
            raise RuntimeError("Invalid device_uuid=" + device)
        device = found[0]
    return reductions.rebuild_cuda_tensor(*args[:6], device, *args[7:])
