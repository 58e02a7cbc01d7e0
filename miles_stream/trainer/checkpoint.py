"""Trainer checkpoints: saved atomically, loaded to continue a run exactly, whatever the backend.

    {checkpoint_dir}/step-00000010/   (the backend's files: torch/state.py writes model.safetensors,
                                       critic.safetensors, state.pt)
                                      rng.json            numpy and python RNG states
                                      trainer.json        step, weight version, claims (groups trained, not yet acked),
                                                          run id, bus.partitions
    {checkpoint_dir}/latest           the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp-<pid>`, fsynced, renamed into place, and only then named in
`latest` (itself replaced by rename): a crash at any point leaves the previous checkpoint whole. The backend
writes and reads its own files through the `write` / `read` callables (`TrainerBackend.save` / `.load`).
With several data-parallel ranks every rank writes its part (`save_checkpoint_ranks`: a sharded backend's
shards, torch/fsdp.py) into rank 0's temporary directory, and rank 0 alone runs the protocol around it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from miles_stream.bus import Claim
from miles_stream.errors import CheckpointError, MilesStreamError
from miles_stream.procs import pid_alive
from miles_stream.trainer.parallel import DataParallel

LATEST = "latest"


@dataclass(frozen=True, slots=True)
class TrainerState:
    step: int  # rollout batches trained
    version: int  # weight version the policy was last published as
    claims: tuple[Claim, ...]  # groups trained into this state whose entries may not be acked yet
    run_id: str = ""  # the run (bus/run.py) whose streams these claims name
    recent: tuple[str, ...] = ()  # groups committed just before (a host crash may take those commits back)
    partitions: int = 0  # bus.partitions the claims were read from (0: not recorded, a checkpoint before it was)


def save_checkpoint(root: str | Path, state: TrainerState, write: Callable[[Path], None], *, keep: int = 2) -> Path:
    """Write the checkpoint into a temporary directory (`write` puts the backend's files there), then rename it
    into place. A failure (a full disk) removes the temporary directory and is a `CheckpointError` naming the
    directory; temporary directories left by a process that died while saving are removed by the next save."""
    root = Path(root)
    try:
        tmp = _begin(root, state)
    except Exception as exc:
        raise _failed(root, state, exc) from exc
    try:
        write(tmp)
        return _finish(root, tmp, state, keep)
    except Exception as exc:  # a full disk: OSError from torch.save and open, SafetensorError (an Exception,
        # not an OSError, in safetensors 0.8) from save_model, RuntimeError from others
        shutil.rmtree(tmp, ignore_errors=True)
        raise _failed(root, state, exc) from exc


def save_checkpoint_ranks(
    root: str | Path, state: TrainerState, write: Callable[[Path], None], parallel: DataParallel, *, keep: int = 2
) -> Path:
    """`save_checkpoint` with every data-parallel rank writing its part (a sharded backend's shards): called
    on every rank. Rank 0 makes the temporary directory and, once every rank's `write` returned, finishes the
    same protocol (metadata, fsync, rename, `latest`); a failure on any rank is a `CheckpointError` on all."""
    if parallel.world == 1:
        return save_checkpoint(root, state, write, keep=keep)
    root = Path(root)
    tmp, error = None, ""
    if parallel.is_main:
        try:
            tmp = _begin(root, state)
        except Exception as exc:
            error = str(_failed(root, state, exc))
    _agree(parallel, error)
    tmp = Path(parallel.gather(str(tmp))[0])
    try:
        write(tmp)
    except Exception as exc:
        error = str(_failed(root, state, exc))
    try:
        _agree(parallel, error)
        path, error = tmp, ""
        if parallel.is_main:
            try:
                path = _finish(root, tmp, state, keep)
            except Exception as exc:
                error = str(_failed(root, state, exc))
        _agree(parallel, error)
    except CheckpointError:
        if parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / path.name


def _agree(parallel: DataParallel, error: str) -> None:
    """Raise on every rank the errors any rank met (a collective)."""
    errors = [f"rank {rank}: {e}" for rank, e in enumerate(parallel.gather(error)) if e]
    if errors:
        raise CheckpointError("; ".join(errors))


def _failed(root: Path, state: TrainerState, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot save the checkpoint of step {state.step} in {root}: {exc}")


def _begin(root: Path, state: TrainerState) -> Path:
    """The empty temporary directory of `state`'s checkpoint, after removing those of dead processes."""
    tmp = root / f"step-{state.step:08d}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp-*"):  # a save cut short by kill -9 or a crash (its process is gone)
            if not _alive(stale.name.rpartition(".tmp-")[2]):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _finish(root: Path, tmp: Path, state: TrainerState, keep: int) -> Path:
    """Add the metadata to `tmp`, fsync it all, rename it into place and name it in `latest`."""
    (tmp / "rng.json").write_text(json.dumps(_rng_state()))
    claims = [[c.entry_id, c.group_id, *([c.partition] if c.partition else [])] for c in state.claims]
    (tmp / "trainer.json").write_text(
        json.dumps(
            {
                "step": state.step,
                "version": state.version,
                "claims": claims,
                "run_id": state.run_id,
                "recent": list(state.recent),
                "partitions": state.partitions,
            }
        )
    )
    for f in sorted(tmp.rglob("*"), reverse=True):  # files (a sharded backend's in subdirectories), then dirs
        _fsync(f)
    final = root / tmp.name.rpartition(".tmp-")[0]
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _write_atomic(root / LATEST, final.name)
    _fsync(root)
    _prune(root, keep)
    return final


def load_checkpoint(root: str | Path, read: Callable[[Path], None]) -> TrainerState | None:
    """Restore the newest checkpoint under `root` (`read` loads the backend's files); None if there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    try:
        meta = json.loads((path / "trainer.json").read_text())
        rng = json.loads((path / "rng.json").read_text())
        read(path)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise MilesStreamError(f"checkpoint {path} cannot be loaded: {exc}") from exc
    _set_rng_state(rng)
    # each claim: [entry id, group id] and, on a partitioned run (bus.partitions), the partition
    claims = tuple(Claim(c[0], c[1], int(c[2]) if len(c) > 2 else 0) for c in meta["claims"])
    return TrainerState(step=int(meta["step"]), version=int(meta["version"]), claims=claims,
                        run_id=str(meta.get("run_id", "")), recent=tuple(meta.get("recent", ())),
                        partitions=int(meta.get("partitions", 0)))  # fmt: skip


def _rng_state() -> dict[str, Any]:
    numpy_state: Any = np.random.get_state()
    kind, keys, pos, has_gauss, gauss = numpy_state
    version, internal, py_gauss = random.getstate()
    return {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), py_gauss]}


def _set_rng_state(state: dict[str, Any]) -> None:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    tmp.replace(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: str) -> bool:
    """Whether `pid` is a live process on this host (a save in progress there is not touched)."""
    return pid.isdigit() and pid_alive(int(pid))
