"""A producer's engine kept on the newest announced weight version.

    start:  WeightSubscriber.latest() ──► the engine loads it before the first prompt (a producer attached
            mid-run starts current)
    then:   XREAD {ns}:weights after the last seen ──► load (checksums verified) ──► [abort what is generating,
            with rollout.on_update "recycle"] ──► the engine swaps the version in (between two decode steps)

A version that fails verification is skipped (the old weights stay); a Redis blip is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping

import structlog
import torch

from miles_stream.bus.connection import is_transient
from miles_stream.engines.base import RolloutEngine, UpdatesFromManifest
from miles_stream.errors import WeightIntegrityError
from miles_stream.weights.manifest import WeightManifest
from miles_stream.weights.versions import WeightSubscriber

log = structlog.get_logger(__name__)


class WeightFollower:
    def __init__(
        self,
        engine: RolloutEngine,
        weights: WeightSubscriber,
        *,
        recycle: bool,
        generating: Callable[[], Collection[str]],
        block_ms: int,
        on_update: Callable[[], None] = lambda: None,
    ) -> None:
        """`generating`: the request ids in the engine now (aborted before an update when `recycle`);
        `on_update`: called after each version applied while following."""
        self.engine, self.weights, self.recycle = engine, weights, recycle
        self.generating, self.block_ms, self.on_update = generating, block_ms, on_update

    async def load_latest(self) -> str:
        """Before generating anything: load the newest published version, if any. Returns its entry id."""
        if (latest := await self.weights.latest()) is None:
            return "0-0"
        entry_id, manifest = latest
        if manifest.version != self.engine.weight_version:
            await self._apply(manifest)
            log.info("weights_loaded", version=manifest.version)
        return entry_id

    async def follow(self, last: str) -> None:
        """Apply each new version as it is announced after entry `last`, until cancelled."""
        while True:
            try:
                announced = await self.weights.next_after(last, block_ms=self.block_ms)
                if announced is None:
                    continue
                last, manifest = announced
                if manifest is not None and manifest.version > self.engine.weight_version:
                    await self._update(manifest)
            except WeightIntegrityError as exc:
                log.error("weights_rejected", error=str(exc))
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("weights_follow_retry", error=str(exc))
                await asyncio.sleep(1.0)

    async def update(self, manifest: WeightManifest) -> None:
        """Load `manifest`'s version and give it to the engine now (the evaluator picks its own versions)."""
        await self._update(manifest)

    async def _update(self, manifest: WeightManifest) -> None:
        started = time.perf_counter()
        state = None  # loaded (and verified) before anything is aborted, where the engine takes tensors
        if not isinstance(self.engine, UpdatesFromManifest):
            state = await self.weights.load(manifest)
        loaded = time.perf_counter()
        if self.recycle and (generating := self.generating()):
            await self.engine.abort(sorted(generating))
        await self._apply(manifest, state)
        self.on_update()
        pauses = getattr(self.engine, "update_pauses_s", None)  # the native engine's decode pause
        log.info("weights_updated", version=manifest.version, load_s=round(loaded - started, 4),
                 apply_s=round(time.perf_counter() - loaded, 4),
                 pause_s=round(pauses[-1], 5) if pauses else None)  # fmt: skip

    async def _apply(self, manifest: WeightManifest, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Give the engine `manifest`'s version: the tensors (`state`, if loaded already), or the manifest to
        an engine that takes it itself (SGLang)."""
        weights = self.weights
        if isinstance(self.engine, UpdatesFromManifest):
            await self.engine.apply_manifest(manifest, lambda: weights.load(manifest))
        else:
            await self.engine.update_weights(
                manifest.version, state if state is not None else await weights.load(manifest)
            )
