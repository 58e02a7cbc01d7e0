"""The native engine: a Hugging Face causal LM sampled in PyTorch with a KV cache and continuous batching.

    generate() ──requests──► queue ──► engine thread: loop
                                         1. apply a pending weight update (between steps, spans recorded)
                                         2. wait while paused
                                         3. admit queued requests while rows are free: prefill them in one
                                            left-padded forward, sample first tokens, merge their KV rows
                                         4. one decode step for every active row
                                         5. finish rows (stop id, max tokens, abort), resolve their futures
                                            (also right after 3: a first token can end a row)
    results ◄── futures resolved on the caller's event loop

The engine owns the KV cache as per-layer [B, H, S, D] tensors, left-padded, and wraps them in a
`DynamicCache` for each forward. Rows join and leave between steps (torch.cat / index_select), and columns of
padding that every row has are dropped. MoE routing traces come from forward hooks on the routers: every
position the model runs on, prompt and response, as in `schema.Sample.routing`.

This is the CPU-correct reference engine; speed on a GPU (static cache, CUDA graphs) is its own issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from miles_stream.engines.base import GenerationRequest, GenerationResult, merge_spans
from miles_stream.engines.native.sampling import sample_tokens
from miles_stream.engines.native.static_cache import StaticDecoder, supports
from miles_stream.errors import InvalidRequest, MilesStreamError
from miles_stream.models.moe import moe_routers
from miles_stream.models.quantized import QuantizedWeights, Scheme, for_inference
from miles_stream.schema import make_spans


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    future: Future[GenerationResult]
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    routing: list[np.ndarray] = field(default_factory=list)  # [positions, L, K] chunks
    length: int = 0  # tokens in the KV cache (prompt + fed response tokens)
    aborted: bool = False


class NativeEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch: int = 32,
        seed: int = 0,
        weight_version: int = 0,
        kv_cache: Literal["auto", "static", "dynamic"] = "auto",
        max_seq_len: int = 2048,
        cuda_graphs: bool = True,
        compile_decode: bool = True,
        precision: Literal["dtype"] | Scheme = "dtype",
    ) -> None:
        self.device = torch.device(device)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model: Any = model.to(self.device).eval()
        self.model.requires_grad_(False)
        # fp8 / int4: the linear layers and MoE experts hold quantized weights (models/quantized.py); published
        # tensors for them are quantized as they are staged
        self._quantized: QuantizedWeights | None = None
        if precision != "dtype":
            self._quantized = for_inference(self.model, precision)
        config = self.model.config
        if kv_cache == "static" and not supports(self.model):
            raise ValueError(
                f"kv_cache=static needs a dense Llama/Qwen2/Qwen3/Mistral model, not {type(model).__name__}"
            )
        static = kv_cache == "static" or (kv_cache == "auto" and self.device.type == "cuda" and supports(self.model))
        self._static: StaticDecoder | None = None
        if static:
            self._static = StaticDecoder(self.model, slots=max_batch, max_len=max_seq_len, graphs=cuda_graphs,
                                         compile=compile_decode)  # fmt: skip
        eos = config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.num_experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.max_batch = max_batch
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._version = weight_version
        self.update_pauses_s: deque[float] = deque(maxlen=1024)  # engine-thread time of each weight update
        self._queue: queue.Queue[_Row] = queue.Queue()
        self._updates: queue.Queue[tuple[int, Mapping[str, torch.Tensor], Future[None]]] = queue.Queue()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._closed = False
        self._failure: BaseException | None = None
        self._admitting: list[_Row] = []
        self._wake = threading.Event()
        self._rows: list[_Row] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self._step_routing: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._record_routing) for m in moe_routers(self.model)]
        self._thread = threading.Thread(target=self._loop, name="miles-native-engine", daemon=True)
        self._thread.start()

    # ---- public API (RolloutEngine) -----------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Results in request order. The caller's loop is woken once, when the last of them is done (a group
        of 32 samples is one wake-up, not 32)."""
        futures = [self.submit(r) for r in requests]
        try:
            await _all_done(futures)
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        return [f.result() for f in futures]

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        if self._failure is not None:
            raise MilesStreamError(f"engine failed: {self._failure!r}")
        if self._closed:
            raise MilesStreamError("engine is closed")
        self._check(request)
        stop = set(request.params.stop_token_ids) | (set() if request.params.ignore_eos else set(self.eos_ids))
        row = _Row(request, Future(), frozenset(stop))
        self._queue.put(row)
        self._wake.set()
        return row.future

    def _check(self, request: GenerationRequest) -> None:
        """Refuse a request the model cannot run, before it reaches (and could break) the engine thread."""
        ids = list(request.prompt_ids)
        if not ids:
            raise InvalidRequest(f"request {request.request_id}: empty prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequest(f"request {request.request_id}: token ids outside [0, {self.vocab_size})")
        total = len(ids) + request.params.max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise InvalidRequest(
                f"request {request.request_id}: {len(ids)} prompt + {request.params.max_new_tokens} new tokens "
                f"exceed the model's {self.max_positions} positions"
            )
        if self._static is not None and total > self._static.max_len:
            raise InvalidRequest(
                f"request {request.request_id}: {len(ids)} prompt + {request.params.max_new_tokens} new tokens "
                f"exceed the engine's static KV cache of {self._static.max_len} positions (max_seq_len)"
            )

    async def update_weights(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` into the parameters in place between two decode steps; rows in flight go on under
        the new version (a new version span starts at their next token). The tensors are staged first on
        the engine's device and in its dtype, in a worker thread on a stream of its own while decoding goes
        on, so the pause between two steps is one device copy (`update_pauses_s` records each). Cost: one
        more copy of the weights on the engine's device while a version is staged."""
        staged = await asyncio.to_thread(self._stage, state)
        done: Future[None] = Future()
        self._updates.put((version, staged, done))
        self._wake.set()
        await asyncio.wrap_future(done)

    def _stage(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = self.model.state_dict(keep_vars=True)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            staged: dict[str, torch.Tensor] = {}
            for name, tensor in state.items():
                if self._quantized is not None and name in self._quantized:
                    staged |= self._quantized.encode(name, tensor.to(self.device, non_blocking=tensor.is_pinned()))
                    continue
                target = params.get(name)
                if target is None or (tensor.device == target.device and tensor.dtype == target.dtype):
                    staged[name] = tensor  # unknown names are refused by the engine thread, untouched
                else:
                    staged[name] = tensor.to(target.device, target.dtype, non_blocking=tensor.is_pinned())
        if stream is not None:
            stream.synchronize()
        return staged

    async def abort(self, request_ids: Sequence[str]) -> None:
        with self._lock:
            self._aborts.update(request_ids)
        self._wake.set()

    async def pause(self) -> None:
        self._running.clear()

    async def resume(self) -> None:
        self._running.set()
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        self._running.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        for hook in self._hooks:
            hook.remove()

    # ---- engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closed:
                self._apply_updates()
                if not self._running.is_set() or (not self._rows and self._queue.empty()):
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                with torch.inference_mode():
                    self._admit()
                    self._finish()  # a first token can already end a row (a stop id, max_new_tokens=1)
                    if self._rows:
                        self._decode()
                        self._finish()
        except BaseException as exc:  # fail every waiting caller rather than hang them, and refuse new ones
            self._failure = exc
            for row in self._rows + self._admitting + list(self._queue.queue):
                _settle(row.future, exc=MilesStreamError(f"engine failed: {exc!r}"))
            raise
        finally:
            for row in self._rows:
                _settle(row.future, exc=MilesStreamError("engine closed"))

    def _apply_updates(self) -> None:
        while not self._updates.empty():
            version, state, done = self._updates.get()
            try:
                params = self.model.state_dict(keep_vars=True)  # tied weights answer to every name
                for name, tensor in state.items():  # check all before copying any: never half an update
                    if name not in params:
                        raise MilesStreamError(f"weight update names unknown parameter {name!r}")
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        want, got = tuple(params[name].shape), tuple(tensor.shape)
                        raise MilesStreamError(f"weight update {name!r} has shape {got}, the model {want}")
                started = time.perf_counter()
                with torch.no_grad():
                    for name, tensor in state.items():
                        params[name].copy_(tensor.to(params[name].device, params[name].dtype))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.update_pauses_s.append(time.perf_counter() - started)
                self._version = version
                for row in self._rows:
                    row.spans.append((len(row.tokens), version))
                _settle(done)
            except BaseException as exc:
                _settle(done, exc=exc)

    def _admit(self) -> None:
        """Prefill every request that fits, in one left-padded forward, and merge their rows into the batch."""
        new = self._admitting = []
        while len(self._rows) + len(new) < self.max_batch and not self._queue.empty():
            new.append(self._queue.get())
        if not new:
            return
        if self._static is not None:
            self._admit_static(new)
            return
        lengths = [len(r.request.prompt_ids) for r in new]
        width = max(lengths)
        ids = torch.zeros(len(new), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(new), width, dtype=torch.long, device=self.device)
        for i, (r, n) in enumerate(zip(new, lengths, strict=True)):
            ids[i, width - n :] = torch.as_tensor(list(r.request.prompt_ids), device=self.device)
            mask[i, width - n :] = 1
            r.length = n
            r.spans.append((0, self._version))
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        self._step_routing.clear()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache(), use_cache=True
        )
        self._take_routing(new, keep_last=lengths)
        self._sample(new, out.logits[:, -1, :])
        self._merge(new, [(layer.keys, layer.values) for layer in out.cache.layers], mask)
        self._admitting = []

    def _admit_static(self, new: list[_Row]) -> None:
        """Prefill new rows, right-padded, into the slots after the rows already decoding."""
        assert self._static is not None
        lengths = [len(r.request.prompt_ids) for r in new]
        ids = torch.zeros(len(new), max(lengths), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, : lengths[i]] = torch.as_tensor(list(r.request.prompt_ids))
            r.length = lengths[i]
            r.spans.append((0, self._version))
        logits = self._static.prefill(ids.to(self.device), lengths, first_slot=len(self._rows))
        self._sample(new, logits)
        self._rows.extend(new)
        self._admitting = []

    def _merge(self, new: list[_Row], kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Append rows whose KV is `kv` ([k, H, S', D], left-padded as `mask` says) to the batch."""
        if not self._rows:
            self._kv, self._mask = kv, mask
        else:
            width = max(mask.shape[1], self._mask.shape[1])
            self._kv = [
                (_stack_rows(k, nk, width), _stack_rows(v, nv, width))
                for (k, v), (nk, nv) in zip(self._kv, kv, strict=True)
            ]
            self._mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (self._mask, mask)])
        self._rows.extend(new)

    def _decode(self) -> None:
        rows = self._rows
        if self._static is not None:
            logits = self._static.decode([r.tokens[-1] for r in rows], [r.length for r in rows])
            for r in rows:
                r.length += 1
            self._sample(rows, logits)
            return
        last = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], dim=1)
        self._step_routing.clear()
        out = self.model(
            input_ids=last, attention_mask=mask, position_ids=positions,
            cache=DynamicCache(ddp_cache_data=self._kv), use_cache=True,
        )  # fmt: skip
        self._kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._mask = mask
        for r in rows:
            r.length += 1
        self._take_routing(rows)
        self._sample(rows, out.logits[:, -1, :])

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """One token per row; one small copy of the parameters in and one of the results out."""
        params = [r.request.params for r in rows]
        table = torch.tensor([[p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params]],
                             dtype=torch.float64).to(self.device)  # fmt: skip
        truncating = any(p.top_k > 0 or p.top_p < 1 for p in params)
        tokens, logprobs = sample_tokens(logits, table[0].float(), table[1].long(), table[2].float(), self.generator,
                                         any_truncation=truncating)  # fmt: skip
        out = torch.stack([tokens.double(), logprobs.double()]).tolist()  # token ids are exact in float64
        for r, tok, lp in zip(rows, out[0], out[1], strict=True):
            r.tokens.append(int(tok))
            r.logprobs.append(float(lp))

    def _finish(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        keep = []
        for i, r in enumerate(self._rows):
            if r.request.request_id in aborts:
                r.aborted = True
            reason = _finish_reason(r)
            if reason is None:
                keep.append(i)
            else:
                _settle(r.future, self._result(r, reason))
        if len(keep) < len(self._rows) and self._static is not None:
            for slot, row in enumerate(keep):  # compact: rows keep their order, each moves down at most
                if slot != row:
                    self._static.move(row, slot)
            self._rows = [self._rows[i] for i in keep]
        elif len(keep) < len(self._rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._rows = [self._rows[i] for i in keep]
            self._kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self._kv]
            self._mask = self._mask.index_select(0, index)
            self._drop_shared_padding()
        for rid in aborts - {r.request.request_id for r in self._rows}:  # aborted while still queued
            self._abort_queued(rid)

    def _abort_queued(self, request_id: str) -> None:
        kept: list[_Row] = []
        while not self._queue.empty():
            row = self._queue.get()
            if row.request.request_id == request_id:
                row.spans.append((0, self._version))
                _settle(row.future, self._result(row, "abort"))
            else:
                kept.append(row)
        for row in kept:
            self._queue.put(row)

    def _drop_shared_padding(self) -> None:
        if not self._rows:
            self._kv, self._mask = [], self._mask[:, :0]
            return
        pad = int((self._mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if pad:
            self._kv = [(k[:, :, pad:], v[:, :, pad:]) for k, v in self._kv]
            self._mask = self._mask[:, pad:]

    def _result(self, r: _Row, reason: str) -> GenerationResult:
        routing = None
        if r.routing:
            trace = np.concatenate(r.routing)[: len(r.request.prompt_ids) + len(r.tokens) - 1]
            routing = trace.astype(np.uint8 if self.num_experts <= 256 else np.uint16)
        return GenerationResult(
            request_id=r.request.request_id,
            response_ids=np.asarray(r.tokens, dtype=np.int32),
            logprobs=np.asarray(r.logprobs, dtype=np.float32),
            finish_reason=reason,  # type: ignore[arg-type]
            version_spans=make_spans(merge_spans(r.spans, len(r.tokens))),
            routing=routing,
        )

    # ---- MoE routing traces -------------------------------------------------------------------------------
    def _record_routing(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self._step_routing.append(output[2].detach())  # [rows * positions, K] expert indices

    def _take_routing(self, rows: list[_Row], keep_last: list[int] | None = None) -> None:
        """Append this forward's expert choices to each row; `keep_last` drops left padding at prefill."""
        if not self._step_routing:
            return
        per_layer = torch.stack(self._step_routing, dim=1)  # [rows * positions, L, K]
        chunks = per_layer.reshape(len(rows), -1, *per_layer.shape[1:]).cpu().numpy()
        for i, (r, chunk) in enumerate(zip(rows, chunks, strict=True)):
            r.routing.append(chunk if keep_last is None else chunk[chunk.shape[0] - keep_last[i] :])


def _finish_reason(r: _Row) -> str | None:
    """A row that ended on its own in the step it was aborted is finished, not aborted: resuming it would
    generate past its stop token."""
    if r.tokens and r.tokens[-1] in r.stop_ids:
        return "stop"
    if len(r.tokens) >= r.request.params.max_new_tokens:
        return "length"
    return "abort" if r.aborted else None


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, 0, width - x.shape[2], 0))


def _stack_rows(batch: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, S, D] and [k, H, S', D] left-padded to `width` positions and stacked to [B + k, H, width, D]."""
    return torch.cat([_left_pad(batch, width), _left_pad(new, width)])


async def _all_done(futures: Sequence[Future[Any]]) -> None:
    """Wait until every future is done, with one thread-safe wake-up of the running loop."""
    if not futures:
        return
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    left, lock = [len(futures)], threading.Lock()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    def one_done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last and not loop.is_closed():
            loop.call_soon_threadsafe(wake)

    for f in futures:
        f.add_done_callback(one_done)
    await woken


def _settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Report an outcome to its waiter, unless the waiter gave up (a producer stopping cancels it): setting a
    cancelled future raises, and that stopped the engine thread with a traceback."""
    with contextlib.suppress(InvalidStateError):
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
