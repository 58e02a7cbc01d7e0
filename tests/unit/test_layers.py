"""The import graph keeps the layers of docs/architecture.md: imports point down, no circles, and the two
extension points (engines, trainer backends) are reached only through their registries.

Every `import` of a project module counts, at module level or inside a function or `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top; a module may import its own layer's modules and those of the layers below. The longest
# matching prefix names a module's layer.
LAYERS: list[set[str]] = [
    {
        "miles_stream.errors",
        "miles_stream.config",
        "miles_stream.procs",
        "miles_stream.logs",
        "miles_stream.aio",
        "miles_stream.schema",
        "miles_stream.codec",
        "miles_stream.prompts",
        "miles_stream.kernels",
        "miles_stream.models",
        "miles_stream.rewards",
        "miles_stream.redis_server",
        "miles_stream.metrics_http",
        "miles_stream.wandb_log",
    },
    {"miles_stream.bus", "miles_stream.testing"},
    {"miles_stream.weights", "miles_stream.buffer", "miles_stream.record", "miles_stream.feeder"},
    {"miles_stream.engines"},
    {"miles_stream.rollout", "miles_stream.trainer", "miles_stream.evaluation"},
    {"miles_stream.status"},
    {"miles_stream.run_config", "miles_stream.tasks"},
    {"miles_stream.admin", "miles_stream.demo"},
    {"miles_stream.cli", "producers", "consumers", "miles_stream"},
]
# Function-level imports of project modules: the CLI loads each command's code when it runs (so `status` does
# not pay for torch), and these optional accelerator paths are imported only where they are used.
LAZY_OK_FROM = {"miles_stream.cli"}
# The Megatron backend is an optional extra (megatron-core) whose import costs seconds: trainer.backends imports it
# only when trainer.backend asks for it.
LAZY_OK_TO = {"miles_stream.weights.cuda_ipc", "miles_stream.weights.broadcast", "miles_stream.kernels.triton_decode",
              "miles_stream.kernels.triton_rows", "miles_stream.trainer.megatron.build"}  # fmt: skip
# An engine's or a backend's implementation is reached through its registry (and by the process entry points,
# which compose); `*.config` modules are sections of the run config.
PRIVATE = {
    "miles_stream.engines.native": {"miles_stream.rollout.engines", "producers.rollout"},
    "miles_stream.engines.sglang": {"miles_stream.rollout.engines", "miles_stream.rollout.config"},
    # the Megatron backend runs the torch backend's train step over its GPTModel (one step, not two copies)
    "miles_stream.trainer.torch": {"miles_stream.trainer.backends", "miles_stream.trainer.megatron"},
    "miles_stream.trainer.megatron": {"miles_stream.trainer.backends"},
}


def modules() -> dict[str, Path]:
    found = {}
    for top in ("miles_stream", "producers", "consumers"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = modules()


def imports(name: str) -> Iterator[tuple[str, bool]]:
    """(project module imported, whether the import is inside a function) for each import in `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            local |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, id(node) in local


def layer(name: str) -> int:
    best, found = -1, -1
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found >= 0, f"{name} is in no layer of tests/unit/test_layers.py (and docs/architecture.md)"
    return found


def test_every_import_points_down_or_stays_in_its_layer() -> None:
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a in MODULES for b, _ in imports(a) if layer(b) > layer(a)]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle() -> None:
    graph = {name: {b for b, _ in imports(name)} for name in MODULES}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            circle = visit(name)
            assert circle is None, " -> ".join(circle)


def test_no_function_level_import_dodges_the_graph() -> None:
    lazy = [f"{a} imports {b} inside a function"
            for a in MODULES for b, inside in imports(a)
            if inside and a not in LAZY_OK_FROM and b not in LAZY_OK_TO]  # fmt: skip
    assert not lazy, "\n".join(lazy)


def test_engines_and_backends_are_reached_through_their_registries() -> None:
    leaks = []
    for a in MODULES:
        for b, _ in imports(a):
            for package, allowed in PRIVATE.items():
                inside = a == package or a.startswith(package + ".")
                permitted = any(a == x or a.startswith(x + ".") for x in allowed)  # a module, or a package's
                if b.startswith(package + ".") and not inside and not permitted and not b.endswith(".config"):
                    leaks.append(f"{a} imports {b}")
    assert not leaks, "\n".join(leaks)


def test_run_config_is_imported_only_by_what_composes_a_run() -> None:
    composers = [a for a in MODULES for b, _ in imports(a) if b == "miles_stream.run_config"]
    assert all(layer(a) > layer("miles_stream.run_config") for a in composers), composers


def test_the_checker_sees_imports_of_every_kind() -> None:
    """The walk itself: a top-level, a relative-free nested and a TYPE_CHECKING import are all found."""
    found = dict(imports("miles_stream.engines.base"))
    assert found.get("miles_stream.weights.manifest") is False  # under `if TYPE_CHECKING:`
    assert found.get("miles_stream.config") is False
    assert ("miles_stream.admin", True) in set(imports("miles_stream.cli"))


def test_test_modules_have_unique_basenames() -> None:
    """pytest imports test modules by basename (no packages under tests/): two of one name stop collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
