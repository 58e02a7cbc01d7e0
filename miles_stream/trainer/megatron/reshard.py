"""Resuming a Megatron checkpoint on other (TP, PP, EP) sizes or another pipeline stage split (first_stage_layers /
last_stage_layers, convert.StageSplit): each rank rebuilds its own shards of every parameter
and of AdamW's moments from the files of the sizes the checkpoint was saved at (the data-parallel size needs
nothing: every replica reads its (TP, PP, EP) rank's files, layout.py).

    saved at (tp, pp, ep)   megatron.json                  {"tensor_parallel", "pipeline_parallel", "expert_parallel",
                                                            "first_stage_layers", "last_stage_layers" (null: none
                                                            given; absent in a file written before them)}
                            megatron-tp{k}[-pp{s}][-ep{j}]  .safetensors: that rank's parameters (local names);
                                                            .pt: AdamW's state_dict, the local names of its parameters
                                                            in the optimizer's order ("param_names"), the schedule,
                                                            the torch RNG
                            ...-zero{r}.pt                 with a distributed optimizer (megatron.json's
                                                            "optimizer_shards" > 0, zero.py): replica r's share of
                                                            AdamW's state under one-stage names; the .pt then holds
                                                            no moments
    rank (k', s', j') of (tp', pp', ep'):
      1. which parameters it holds: `placement`, convert.by_stage and convert.by_expert (the splits load_policy
         applies to the HF checkpoint, a tied model's last-stage copy of the embedding included) run over one tag
         a parameter: {local name: one-stage name, as in a TP-rank state dict of convert.to_megatron}
      2. where the checkpoint holds each: the same placement at the saved sizes, inverted; a parameter held by
         several files (one replicated over EP ranks, a tied embedding and its copy) is read from a file this rank
         reads anyway
      3. for the parameters, then exp_avg, then exp_avg_sq: the saved TP shards of what it holds; when TP changes,
         merged into HF tensors by convert.iter_hf and split again by convert.rank_params (the parameters it does
         not hold stand in as meta tensors of their saved shapes: only the files holding what it needs are read,
         and of every file its safetensors header; a split AdamW state: every -zero file of the stages it needs,
         memory-mapped). PP and EP move whole tensors: nothing is merged.
      4. AdamW's state_dict rebuilt by name for this rank's optimizer (its "params" ids are positions in the order
         the optimizer was built, the layout's `optimizer(model.parameters())`: hence the names recorded at
         save); each parameter's "step" the saved one (equal over the TP shards merged, checked); hyperparameters,
         schedule and torch RNG those of the saved rank (TP 0, PP 0, EP 0), on every rank. The implementation
         flags (foreach, fused) stay this run's. numpy's and Python's RNG are rng.json's, as on any resume.

Refused in one line (a ValueError, which checkpoint.load_checkpoint reports with the checkpoint's path): a
checkpoint written before the sizes and names were recorded (no megatron.json: its sizes read from its file
names), a missing file, a parameter the checkpoint does not hold or holds in another shape (another model),
optimizer state on some TP shards of a parameter and not on others, or with different step counts.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open
from torch import Tensor, nn

from miles_stream.trainer.megatron.convert import (
    Qwen3Shape,
    StageSplit,
    by_expert,
    by_stage,
    iter_hf,
    megatron_names,
    rank_params,
)
from miles_stream.trainer.megatron.zero import ShardedAdamW

log = structlog.get_logger(__name__)
SIZES_FILE = "megatron.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")  # how this run steps, not what it learned
_STEM = re.compile(r"^megatron-tp(\d+)(?:-pp(\d+))?(?:-ep(\d+))?\.safetensors$")


@dataclass(frozen=True, slots=True)
class Sizes:
    """A Megatron layout's parallel sizes (the data-parallel size is not one: replicas hold the same files)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    first: int | None = None  # the first / last pipeline stage's layer count (convert.StageSplit; None: even)
    last: int | None = None

    @property
    def split(self) -> StageSplit:
        return StageSplit(self.first, self.last)

    def __str__(self) -> str:
        stages = "".join(f", {k}={n}" for k, n in (("first_stage_layers", self.first),
                                                    ("last_stage_layers", self.last)) if n is not None)  # fmt: skip
        return f"TP={self.tp}, PP={self.pp}, EP={self.ep}{stages}"


def stem(sizes: Sizes, tp_rank: int, pp_rank: int = 0, ep_rank: int = 0) -> str:
    """The name of a rank's checkpoint files without suffix: -pp only with PP > 1, -ep only with EP > 1."""
    out = f"megatron-tp{tp_rank:02d}"
    if sizes.pp > 1:
        out += f"-pp{pp_rank:02d}"
    if sizes.ep > 1:
        out += f"-ep{ep_rank:02d}"
    return out


def write_sizes(directory: Path, sizes: Sizes, shards: int = 0) -> None:
    """megatron.json; `shards`: the ranks each (TP, PP, EP) rank's AdamW state is split over (zero.py; 0: whole in
    its .pt)."""
    (directory / SIZES_FILE).write_text(json.dumps({"tensor_parallel": sizes.tp, "pipeline_parallel": sizes.pp,
                                                    "expert_parallel": sizes.ep, "first_stage_layers": sizes.first,
                                                    "last_stage_layers": sizes.last,
                                                    "optimizer_shards": shards}))  # fmt: skip


def saved_shards(directory: Path) -> int:
    """How many ranks the checkpoint's AdamW state of one (TP, PP, EP) rank is split over (0: not split)."""
    recorded = directory / SIZES_FILE
    return int(json.loads(recorded.read_text()).get("optimizer_shards", 0)) if recorded.is_file() else 0


def shard_stem(sizes: Sizes, tp_rank: int, pp_rank: int, ep_rank: int, replica: int) -> str:
    """The file of one rank's share of AdamW's state (a distributed optimizer, zero.py): its moments under
    one-stage names, {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}}."""
    return f"{stem(sizes, tp_rank, pp_rank, ep_rank)}-zero{replica:03d}"


def saved_sizes(directory: Path) -> Sizes | None:
    """The sizes a Megatron checkpoint was written at: megatron.json, or (written before it) the largest ranks in
    its file names; None where it holds no Megatron file."""
    recorded = directory / SIZES_FILE
    if recorded.is_file():
        raw = json.loads(recorded.read_text())
        first, last = raw.get("first_stage_layers"), raw.get("last_stage_layers")
        return Sizes(int(raw["tensor_parallel"]), int(raw["pipeline_parallel"]), int(raw["expert_parallel"]),
                     None if first is None else int(first), None if last is None else int(last))  # fmt: skip
    found = [m for p in directory.glob("megatron-*.safetensors") if (m := _STEM.match(p.name))]
    if not found:
        return None
    return Sizes(*(1 + max(int(m[i] or 0) for m in found) for i in (1, 2, 3)))


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The local names of the optimizer's parameters in its order (what its state_dict's ids count)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def placement(shape: Qwen3Shape, sizes: Sizes, pp_rank: int, ep_rank: int) -> dict[str, str]:
    """{local name: one-stage name} of what a (PP, EP) rank holds (every TP rank holds the same names), found by
    running the conversion's own splits (convert.by_stage, convert.by_expert, as build.load_policy applies them)
    over one tag a parameter."""
    names = megatron_names(shape)
    tags: Mapping[str, Tensor] = {n: torch.tensor(i) for i, n in enumerate(names)}
    if sizes.pp > 1:
        tags = by_stage(tags, shape, sizes.pp, sizes.split)[pp_rank]
    if sizes.ep > 1:
        tags = by_expert(tags, shape, sizes.ep)[ep_rank]
    return {local: names[int(tag)] for local, tag in tags.items()}


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """One rank's shards rebuilt from a checkpoint of other sizes (local names)."""

    params: dict[str, Tensor]
    moments: dict[str, dict[str, Tensor]]  # {local name: {"step", "exp_avg", "exp_avg_sq"}}; absent: no state
    extra: dict[str, Any]  # the saved rank (0, 0, 0)'s .pt: "optimizer" (its param_groups), "scheduler", "torch_rng"
    read: frozenset[str]  # the stems of the files whose tensors were read


class _Saved:
    """A checkpoint's files at `sizes`, each opened when first asked for."""

    def __init__(self, directory: Path, sizes: Sizes, holds: dict[str, set[str]], stack: ExitStack) -> None:
        self.directory, self.sizes, self.stack = directory, sizes, stack
        self.holds = holds  # {file stem: the local names it should hold}
        self.shards = saved_shards(directory)  # AdamW's state split over this many ranks (0: whole in each .pt)
        self.tensors: dict[str, Any] = {}
        self.extras: dict[str, dict[str, Any]] = {}
        self.owned: dict[tuple[int, int], dict[str, dict[str, Tensor]]] = {}  # {(TP, PP rank): {one-stage name:
        # state}} of a split state
        self.read: set[str] = set()

    def _path(self, name: str) -> Path:
        path = self.directory / name
        if not path.is_file():
            raise ValueError(f"it holds no {name} (saved at {self.sizes}: a file is missing)")
        return path

    def file(self, name: str) -> Any:
        if name not in self.tensors:
            f = self.stack.enter_context(safe_open(str(self._path(f"{name}.safetensors")), "pt"))
            if set(f.keys()) != self.holds[name]:
                other = sorted(set(f.keys()) ^ self.holds[name])[:3]
                raise ValueError(f"{name}.safetensors holds other parameters than this model's at {self.sizes} "
                                 f"({other}): the checkpoint is of another model")  # fmt: skip
            self.tensors[name] = f
        return self.tensors[name]

    def extra(self, name: str) -> dict[str, Any]:
        """One file's .pt, checked (mmap: a moment's bytes are read when it is used)."""
        if name not in self.extras:
            extra = torch.load(self._path(f"{name}.pt"), weights_only=True, mmap=True)
            if "param_names" not in extra:
                raise ValueError(f"{name}.pt was written before the megatron backend recorded its optimizer's "
                                 f"parameter names: resume it on {self.sizes}, the sizes it was saved at")  # fmt: skip
            groups = len(extra["optimizer"]["param_groups"])
            if groups != 1:
                raise ValueError(f"{name}.pt: AdamW with {groups} parameter groups (the backend builds one)")
            extra["index"] = {n: i for i, n in enumerate(extra["param_names"])}
            self.extras[name] = extra
        return self.extras[name]

    def shape(self, name: str, local: str) -> list[int]:
        shape: list[int] = self.file(name).get_slice(local).get_shape()
        return shape

    def param(self, name: str, local: str) -> Tensor:
        self.read.add(name)
        tensor: Tensor = self.file(name).get_tensor(local)
        return tensor

    def moment(self, one_stage: str, k: int, s: int, name: str, local: str) -> dict[str, Tensor] | None:
        """AdamW's state of one parameter (`one_stage`'s TP shard `k` on stage `s`, `local` in file `name`); None: it
        has none, never stepped."""
        if self.shards:
            return self.split_state(k, s).get(one_stage)
        extra = self.extra(name)
        self.read.add(name)
        index = extra["index"]
        state: dict[str, Tensor] | None = extra["optimizer"]["state"].get(index[local]) if local in index else None
        return state

    def split_state(self, k: int, s: int) -> dict[str, dict[str, Tensor]]:
        """{one-stage name: AdamW state} of TP rank k's parameters on stage s, from the shares of the stage's ranks
        (a distributed optimizer): a parameter's state is in the file of the rank that owned it, one of the stage's
        DP group (with EP, the experts' in their EP rank's expert-DP group), whichever that was (mmap: a moment's
        bytes are read when it is used). A tied embedding and its last-stage copy share a one-stage name; their
        states are equal (the same gradients from the same state), either is taken."""
        if (k, s) not in self.owned:
            merged: dict[str, dict[str, Tensor]] = {}
            for j in range(self.sizes.ep):
                for r in range(self.shards):
                    name = shard_stem(self.sizes, k, s, j, r)
                    merged |= torch.load(self._path(f"{name}.pt"), weights_only=True, mmap=True)["state"]
                    self.read.add(name)
            self.owned[(k, s)] = merged
        return self.owned[(k, s)]


def rebuild(directory: Path, shape: Qwen3Shape, saved: Sizes, here: Sizes, tp_rank: int, pp_rank: int = 0,
            ep_rank: int = 0, moments_for: Collection[str] | None = None) -> Rebuilt:  # fmt: skip
    """Rank (tp_rank, pp_rank, ep_rank) of a layout at `here`'s sizes, rebuilt from a checkpoint saved at `saved`'s
    (see the module's docstring); `moments_for`: the local names whose AdamW state it keeps (a distributed
    optimizer's owned ones; None: all)."""
    mine = placement(shape, here, pp_rank, ep_rank)
    homes: dict[str, list[tuple[int, int, str]]] = defaultdict(list)  # one-stage name -> [(stage, EP rank, local)]
    holds: dict[str, set[str]] = {}
    for s in range(saved.pp):
        for j in range(saved.ep):
            there = placement(shape, saved, s, j)
            holds |= {stem(saved, k, s, j): set(there) for k in range(saved.tp)}
            for local, name in there.items():
                homes[name].append((s, j, local))
    needed = set(mine.values())
    # read a parameter held by several files from one this rank reads anyway
    reads = {(home[0][0], home[0][1]) for n in needed if len(home := homes[n]) == 1}
    chosen = {n: next((h for h in homes[n] if h[:2] in reads), homes[n][0]) for n in homes}

    def where(name: str, k: int) -> tuple[str, str]:
        s, j, local = chosen[name]
        return stem(saved, k, s, j), local

    with ExitStack() as stack:
        files = _Saved(directory, saved, holds, stack)

        def saved_parts(get: Callable[[str, int], Any], names: set[str]) -> dict[str, list[Any]]:
            """{one-stage name: its saved TP shards} of `names` that the checkpoint holds (`get(name, k)`)."""
            parts = {n: [get(n, k) for k in range(saved.tp)] for n in sorted(names)}
            have = {n: [p for p in ps if p is not None] for n, ps in parts.items()}
            for n, ps in have.items():
                if 0 < len(ps) < saved.tp:
                    raise ValueError(f"{n}: optimizer state on {len(ps)} of its {saved.tp} TP shards")
            return {n: ps for n, ps in have.items() if ps}

        def resplit(parts: dict[str, list[Tensor]]) -> dict[str, Tensor]:
            """This rank's TP shard (one-stage names) of each of `parts`, the saved TP shards."""
            if saved.tp == here.tp:
                return {n: ps[tp_rank] for n, ps in parts.items()}

            def shards_of(name: str) -> list[Tensor]:
                if name in parts:
                    return parts[name]
                return [torch.empty(files.shape(*where(name, k)), device="meta") for k in range(saved.tp)]

            # this rank's TP part of what it needs only (not every TP rank's split of everything)
            # (experts in the per-expert form: the ones this rank needs are real, the others meta, never stacked)
            hf = dict(iter_hf(shards_of, shape, fused_experts=False))
            return dict(rank_params(hf, shape, here.tp, tp_rank, keep=parts.__contains__))

        params = resplit(saved_parts(lambda n, k: files.param(*where(n, k)), needed))
        kept = needed if moments_for is None else {mine[local] for local in moments_for}
        states = saved_parts(lambda n, k: files.moment(n, k, chosen[n][0], *where(n, k)), kept)
        moments: dict[str, dict[str, Tensor]] = {}
        if states:
            steps = {n: {float(s["step"]) for s in ps} for n, ps in states.items()}
            for n, values in steps.items():
                if len(values) > 1:
                    raise ValueError(f"{n}: its TP shards' optimizer steps differ ({sorted(values)})")
            fields = {f: resplit({n: [s[f] for s in ps] for n, ps in states.items()}) for f in MOMENTS}
            moments = {n: {"step": ps[0]["step"].clone(), **{f: fields[f][n].clone() for f in MOMENTS}}
                       for n, ps in states.items()}  # fmt: skip
        extra = files.extra(stem(saved, 0, 0, 0))
        local_moments = {local: moments[name] for local, name in mine.items() if name in moments}
        return Rebuilt(params={local: params[name] for local, name in mine.items()}, moments=local_moments,
                       extra={k: extra[k] for k in ("optimizer", "scheduler", "torch_rng")},
                       read=frozenset(files.read))  # fmt: skip


def load_resharded(directory: Path, saved: Sizes, here: Sizes, coords: tuple[int, int, int], model: Any,
                   optimizer: torch.optim.Optimizer, scheduler: Any) -> None:  # fmt: skip
    """Load a checkpoint saved at `saved` into this rank (`coords`: its TP, PP and EP ranks at `here`): parameters,
    AdamW's state (a distributed optimizer's: only the parameters this rank owns), the schedule and the torch RNG."""
    gpt = model.gpt
    params = dict(gpt.named_parameters())
    names = {id(p): n for n, p in params.items()}
    owned = [names[id(p)] for p in optimizer.owned()] if isinstance(optimizer, ShardedAdamW) else None
    out = rebuild(directory, model.shape, saved, here, *coords, moments_for=owned)
    if set(out.params) != set(params):
        other = sorted(set(out.params) ^ set(params))[:4]
        raise ValueError(f"the conversion and this GPTModel disagree on names: {other}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != out.params[name].shape:
                raise ValueError(f"{name}: this GPTModel holds {tuple(p.shape)}, the checkpoint (saved at {saved}) "
                                 f"{tuple(out.params[name].shape)}: it is of another model")  # fmt: skip
            p.copy_(out.params[name])
    (group,) = out.extra["optimizer"]["param_groups"]
    (current,) = optimizer.param_groups
    group = {**group, **{k: current[k] for k in _IMPLEMENTATION if k in current}}
    if isinstance(optimizer, ShardedAdamW):
        optimizer.load_owned({k: v for k, v in group.items() if k != "params"},
                             {params[n]: out.moments[n] for n in owned or () if n in out.moments})  # fmt: skip
    else:
        order = optimizer_names(gpt, optimizer)
        state = {i: out.moments[n] for i, n in enumerate(order) if n in out.moments}
        optimizer.load_state_dict({"state": state, "param_groups": [{**group, "params": list(range(len(order)))}]})
    scheduler.load_state_dict(out.extra["scheduler"])
    torch.set_rng_state(out.extra["torch_rng"])
    log.info(
        "megatron_checkpoint_resharded", saved=str(saved), here=str(here), rank=coords, files_read=sorted(out.read)
    )
