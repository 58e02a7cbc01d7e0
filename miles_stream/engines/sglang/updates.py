"""Weight updates to SGLang servers: the sequence every server goes through (the ways bytes travel: pushes.py).

    pause(mode) -> flush cache (retried while busy; not after in_place) -> [begin_weight_update] -> the push
    -> [end_weight_update -> update_weight_version] -> check /model_info -> continue_generation

What SGLang 0.5.23 does that shapes it (sglang/srt/...):
- `update_weights_from_distributed` and `_from_tensor` refuse to run outside a session opened by
  `/begin_weight_update` (managers/scheduler_components/weight_updater.py:192-197, 234-239), and a second
  begin is refused while one is open (weight_updater.py:311-316): a push that fails after begin still ends the
  session on every server it began on, and a begin refused as "already open" ends the stale one and begins
  again.
- A bucket call given `weight_version` records it as soon as that one call succeeds (weight_updater.py:224;
  managers/tokenizer_control_mixin.py:529-531): a push failing at bucket 2 would leave `/model_info` reporting
  the new version. So buckets carry no version; `/update_weight_version` sets it once the whole push and the
  session's end have succeeded, and `/model_info` is read back before the server is resumed.
- `/update_weights_from_disk` is one call that rolls back to the old weights when loading fails
  (model_executor/model_runner_components/weight_updater.py:223-238) and records the version only on success
  (scheduler weight_updater.py:152-153): it carries the version itself and needs no session.

Each step has a timeout (a hung collective becomes an error). A server whose update failed is left paused,
never resumed on half-updated weights: `WeightUpdateError` names it and whether the push had reached it
(`dirty`: its weights may be half new, whatever version it reports); the engine re-syncs it before use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import structlog
import torch

from miles_stream.engines.http import WeightUpdateError
from miles_stream.engines.sglang.client import NotSupported, SGLangClient, SGLangError
from miles_stream.errors import WeightIntegrityError
from miles_stream.weights.manifest import WeightManifest

log = structlog.get_logger(__name__)
PauseMode = Literal["abort", "retract", "in_place"]


class WeightPush(Protocol):
    """How one version's bytes reach the servers once they are paused (and flushed, and in a session)."""

    session: bool  # needs begin/end_weight_update around it and a separate version call

    async def push(self, servers: Sequence[SGLangClient], version: int, manifest: WeightManifest,
                   state: Mapping[str, torch.Tensor] | None) -> None: ...  # fmt: skip

    def needs_state(self) -> bool: ...

    async def release(self) -> None:
        """Give up what the push holds on the servers (a weight-update group), before one leaves."""


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
    cause: BaseException | None = None
    try:
        await asyncio.wait_for(push.push(ready, version, manifest, state), step_timeout_s)
    except TimeoutError:
        cause = TimeoutError(f"timed out after {step_timeout_s:g} s")
    except (SGLangError, WeightIntegrityError, OSError, RuntimeError) as exc:
        cause = exc
    if cause is not None:
        if push.session:
            await end_sessions(ready, step_timeout_s)
        # a disk load that fails rolls back (model_runner_components/weight_updater.py:223-238); a session push
        # loads each call's tensors as they come: what reached a server may be half a version
        return failed + [WeightUpdateError(s.url, version, "push", cause, dirty=push.session) for s in ready]
    for outcome in await asyncio.gather(*(_finish(s, version, push, step_timeout_s) for s in ready),
                                        return_exceptions=True):  # fmt: skip
        if isinstance(outcome, WeightUpdateError):
            failed.append(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
    return failed


async def end_sessions(servers: Sequence[SGLangClient], timeout_s: float) -> None:
    """End the weight-update session on each server, as far as it answers: SGLang refuses the next begin while
    one is open (scheduler weight_updater.py:311-316). A server with none open answers 400: nothing to do."""
    results = await asyncio.gather(*(s.call("/end_weight_update", {}, timeout_s=timeout_s) for s in servers),
                                   return_exceptions=True)  # fmt: skip
    for server, result in zip(servers, results, strict=True):
        if isinstance(result, SGLangError) and "no weight-update session is open" not in str(result):
            log.warning("sglang_end_session_failed", url=server.url, error=str(result))
        elif isinstance(result, BaseException) and not isinstance(result, SGLangError):
            raise result


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
            await _begin(server, timeout_s)
    except (SGLangError, TimeoutError) as exc:
        raise WeightUpdateError(server.url, version, step, exc) from exc
    return server


async def _begin(server: SGLangClient, timeout_s: float) -> None:
    try:
        with contextlib.suppress(NotSupported):  # an SGLang before the session (0.5.16) works without it
            await server.call("/begin_weight_update", {}, timeout_s=timeout_s)
    except SGLangError as exc:
        if exc.status != 400 or "already open" not in str(exc):
            raise
        log.warning("sglang_stale_session_ended", url=server.url)  # left open by an update that failed before
        await server.call("/end_weight_update", {}, timeout_s=timeout_s)
        await server.call("/begin_weight_update", {}, timeout_s=timeout_s)


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
    step = "end_weight_update"
    try:
        if push.session:
            with contextlib.suppress(NotSupported):
                await server.call("/end_weight_update", {}, timeout_s=timeout_s)
            step = "update_weight_version"  # only now: the whole push is in and finalised
            await server.call("/update_weight_version", {"new_version": str(version), "abort_all_requests": False},
                              timeout_s=timeout_s)  # fmt: skip
        step = "check weight_version"
        reported = (await server.model_info()).get("weight_version")
        if reported != str(version):
            raise SGLangError(server.url, f"reports weight_version {reported!r} after the update to {version}")
        step = "continue_generation"
        await server.resume()
    except (SGLangError, TimeoutError) as exc:  # the bytes are in: its weights are whole unless the end failed
        raise WeightUpdateError(server.url, version, step, exc, dirty=step == "end_weight_update") from exc
