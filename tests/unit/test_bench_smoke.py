"""Every bench script runs as docs/benchmarks.md runs it: `python bench/bench_x.py ...` from the repository root,
so that `bench/` is first on sys.path, as it is for a user. A bench module named like an installed package
shadows it there (bench/kernels.py hid the `kernels` package transformers 5.25 imports at a model load), and a
config key renamed under a script fails only when the script runs: so each script runs its smallest CPU case
for a step or two, or, where it has none (GPU only, or minutes long), parses its arguments (`--help`), which
imports it. Those that start an embedded Redis are marked integration.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BENCH = ROOT / "bench"
SERVER = pytest.mark.integration  # the script starts an embedded Redis of its own

SMOKE = [
    pytest.param("bench_async_accuracy.py", ["--help"], id="async_accuracy-minutes"),
    pytest.param("bench_bus.py", ["--seconds", "0.5", "--samples", "2", "--response-len", "64", "--layers", "0"],
                 marks=SERVER, id="bus"),
    pytest.param("bench_clients.py", ["--mb", "0.1", "--reps", "1"], marks=SERVER, id="clients"),
    pytest.param("bench_colocate.py", ["--help"], id="colocate-gpu-only"),
    pytest.param("bench_demo_rise.py", ["--batch", "1", "--samples", "2", "--steps", "1", "--seeds", "0"],
                 id="demo_rise"),
    pytest.param("bench_demo_recipe.py", ["--seeds", "0", "--samples", "4", "--batch", "2", "--max-groups", "8"],
                 id="demo_recipe"),
    pytest.param("bench_engine.py", ["--help"], id="engine-gpu-only"),
    pytest.param("bench_vllm_n.py", ["--help"], id="vllm_n-needs-the-vllm-venv"),
    pytest.param("bench_engine_cpu.py", ["--batch", "2", "--prompt-len", "4", "--new-tokens", "2"], id="engine_cpu"),
    pytest.param("bench_fp8_gemm.py", ["--help"], id="fp8_gemm-gpu-only"),
    pytest.param("bench_fsdp_memory.py", ["--hidden", "64", "--layers", "1"], id="fsdp_memory"),
    pytest.param("bench_kernels.py", ["--help"], id="kernels-gpu-only"),
    pytest.param("bench_load.py", ["--producers", "2", "--rate", "2", "--seconds", "1", "--warmup", "1",
                                    "--processes", "2"], marks=SERVER, id="load-processes"),
    pytest.param("bench_load.py", ["--producers", "2", "--rate", "2", "--seconds", "1", "--warmup", "1",
                                    "--cluster", "3", "--partitions", "3"], marks=SERVER, id="load-cluster-partitions"),
    pytest.param("bench_pipeline.py", ["--case", "cpu", "--steps", "2", "--warmup", "0", "--modes", "async"],
                 marks=SERVER, id="pipeline-cpu"),
    pytest.param("bench_precision_mismatch.py", ["--kinds", "dense", "--prompts", "2", "--new-tokens", "4", "--pairs",
                                                 "fp8:fp8"], id="precision_mismatch"),
    pytest.param("bench_producers.py", ["--help"], id="producers-minutes"),
    pytest.param("bench_routing_replay.py", ["--samples", "2", "--tokens", "4"], id="routing_replay"),
    pytest.param("bench_scratchpad.py", ["--help"], id="scratchpad-minutes"),
    pytest.param("bench_soak.py", ["--minutes", "0.05", "--sample-s", "1", "--producers", "1", "--prompts", "20"],
                 marks=SERVER, id="soak"),
    pytest.param("bench_train_step.py", ["--device", "cpu", "--shape", "tiny", "--groups", "1", "--samples", "2",
                                         "--prompt-len", "8", "--response-len", "8", "--steps", "1",
                                         "--cases", "fused-4k"], id="train_step-cpu"),
    pytest.param("bench_train_step.py", ["--device", "cpu", "--shape", "tiny", "--groups", "1", "--samples", "2",
                                         "--prompt-len", "8", "--response-len", "8", "--steps", "1",
                                         "--cases", "fused-4k", "--backend", "megatron"], id="train_step-megatron"),
    pytest.param("bench_megatron_memory.py", ["--hidden", "64", "--layers", "2", "--tokens", "16", "--layouts", "1"],
                 id="megatron_memory"),
    pytest.param("bench_trainer_cpu.py", ["--groups", "1", "--samples", "2", "--prompt-len", "4", "--response-len",
                                          "4", "--steps", "1", "--threads", "1", "--sizes", "tiny-dense"],
                 id="trainer_cpu"),
    pytest.param("bench_weights.py", ["--params-m", "1"], marks=SERVER, id="weights"),
]  # fmt: skip


def run_script(script: str, args: list[str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: this checkout's package, behind bench/ (which the interpreter puts first for a script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def test_every_bench_script_has_a_smoke_case() -> None:
    """At least one each (bench_load has two: one server, a cluster), and none for a script that is gone."""
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted({str(p.values[0]) for p in SMOKE})


def test_no_bench_module_shadows_an_importable_module() -> None:
    """Run as a script, bench/NAME.py is what `import NAME` finds, in the script and in every library it uses."""
    assert str(BENCH) not in sys.path
    clashes = {p.stem: importlib.util.find_spec(p.stem).origin for p in BENCH.glob("*.py")
               if importlib.util.find_spec(p.stem) is not None}  # fmt: skip
    assert not clashes, f"rename these bench modules (they hide installed ones): {clashes}"
    assert all(p.name.startswith("bench_") for p in BENCH.glob("*.py")), "bench scripts are named bench_*.py"


@pytest.mark.parametrize(("script", "args"), SMOKE)
def test_bench_script_runs_as_documented(script: str, args: list[str]) -> None:
    started = time.monotonic()
    done = run_script(script, args)
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, f"python bench/{script} {' '.join(args)} exited {done.returncode}:\n{tail}"
    assert time.monotonic() - started < 60, f"{script}'s smoke case took over a minute: make it smaller"


def _run(mode: str, index: int, points: list[tuple[int, float, float]], end_s: float, stalled: bool = False) -> dict:
    curve = [{"version": step, "step": step, "t_s": t, "pass_at_1": acc, "skipped": 0} for step, t, acc in points]
    return {"mode": mode, "index": index, "rc": 0, "curve": curve, "end_s": end_s, "stalled": stalled,
            "steps": points[-1][0], "steps_per_s": 1.0, "trainer_wait_share": 0.5, "groups_read": 100,
            "filtered": 10, "stale_dropped": 4}  # fmt: skip


def test_async_accuracy_tables_runs_it_is_given(tmp_path: Path) -> None:
    """--replot: the table and the plot from runs.json alone; seconds and steps to the target are those of the
    first scored version at or above it, accuracy at t is the newest version published by t while the run was
    up, and a stalled run's last score stands after it ended."""
    runs = [
        _run("async", 1, [(0, 0.0, 0.1), (10, 5.0, 0.5), (20, 12.0, 0.92), (30, 40.0, 0.95)], end_s=41.0),
        _run("sync", 1, [(0, 0.0, 0.1), (25, 30.0, 0.9)], end_s=70.0),
        _run("async", 2, [(0, 0.0, 0.1), (30, 20.0, 0.91), (40, 31.0, 0.8)], end_s=65.0),
        _run("sync", 2, [(0, 0.0, 0.1), (12, 10.0, 0.6)], end_s=25.0, stalled=True),
    ]
    (tmp_path / "runs.json").write_text(json.dumps({"target": 0.9, "at": [30.0, 60.0], "runs": runs}))
    done = run_script("bench_async_accuracy.py", ["--replot", str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "table.md").read_text()
    rows = {line.split(" | ")[0]: line.split(" | ")[1:8] for line in table.splitlines() if line.startswith("| a")}
    rows |= {line.split(" | ")[0]: line.split(" | ")[1:8] for line in table.splitlines() if line.startswith("| s")}
    assert rows["| async"] == ["2", "2 / 2", "16 (12-20)", "25 (20-30)", "0.92 (0.91-0.92)",
                               "0.80 (0.80-0.80) (1 of 2 runs still up)", "4 (4-4); 4.0 (4.0-4.0)%"]  # fmt: skip
    assert rows["| sync"] == ["2", "1 / 2", "not reached (30-not reached)", "not reached (25-not reached)",
                              "0.75 (0.60-0.90)", "0.75 (0.60-0.90)", "4 (4-4); 4.0 (4.0-4.0)%"]  # fmt: skip
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
