"""The code's floors: app/ never imports torch or worker; worker's rooms import only their own room or rooms on
lower floors (so no cycle between rooms), with errors and the reporter protocol at the bottom. Read from the
source (every import, those inside functions too), so nothing needs importing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

# (room, floor, module prefixes): a module belongs to the room with its longest matching prefix.
ROOMS: list[tuple[str, int, tuple[str, ...]]] = [
    ("bottom", 0, ("worker", "worker.errors", "worker.reporting")),
    ("model", 1, ("worker.model",)),
    ("prune", 2, ("worker.prune",)),
    ("restore", 2, ("worker.restore", "worker.restore.method", "worker.restore.train", "worker.restore.batches")),
    ("restore.offsets", 3, ("worker.restore.offsets",)),
    ("restore.bias", 5, ("worker.restore.bias",)),  # RestoreLCC without directions: builds on restorelcc/
    ("restore.registry", 6, ("worker.restore.registry",)),
    ("run", 7, ("worker.run",)),
    ("assets", 7, ("worker.assets",)),
    ("service", 8, ("worker.service",)),
    ("cli", 9, ("worker.cli",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code ('from a.b import c' → 'a.b.c' when c is a
    module of this repository, else 'a.b')."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                is_module = any((ROOT / Path(*full.split("."))).with_suffix(s).exists() for s in (".py",)) or \
                    (ROOT / Path(*full.split("."))).is_dir()
                out.add(full if is_module else node.module)
    return out


METHOD_FLOOR = 4  # any other folder under worker/restore/ is a method's own room (restorelcc/, adapters/, a new one)


def room_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    listed = [p for _, _, prefixes in ROOMS for p in prefixes if p.count(".") >= 2]
    if (module.startswith("worker.restore.") and (ROOT / "worker" / "restore" / parts[2]).is_dir()
            and not any(module == p or module.startswith(p + ".") for p in listed)):
        return f"restore.{parts[2]}", METHOD_FLOOR
    best: tuple[int, str, int] | None = None
    for name, floor, prefixes in ROOMS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), name, floor)
    return None if best is None else (best[1], best[2])


def sources(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def test_every_worker_module_is_in_a_room():
    assert all(room_of(module_name(p)) for p in sources("worker")), [
        module_name(p) for p in sources("worker") if not room_of(module_name(p))]


@pytest.mark.parametrize("top", ["app"])
def test_app_never_imports_torch_or_worker(top):
    bad = {(module_name(p), m) for p in sources(top) for m in imports(p)
           if m.split(".")[0] in ("torch", "worker", "transformers", "peft")}
    assert not bad


def test_worker_imports_run_down_the_floors():
    upward = []
    for path in sources("worker"):
        here = room_of(module_name(path))
        assert here is not None
        for m in imports(path):
            if not m.startswith("worker"):
                continue
            there = room_of(m)
            assert there is not None, f"{module_name(path)} imports {m}, which is in no room"
            if there[0] != here[0] and there[1] >= here[1]:
                upward.append(f"{module_name(path)} ({here[0]}, floor {here[1]}) imports {m} "
                              f"({there[0]}, floor {there[1]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = {module_name(p): {m for m in imports(p) if m.startswith(("app", "worker"))}
             for top in ("app", "worker") for p in sources(top)}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt == node:
                continue
            if state.get(nxt) == 1:
                cycles.append(" → ".join([*trail[trail.index(nxt):], nxt]) if nxt in trail else nxt)
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own submodules is not a cycle of concern; no such __init__ exists today.
    assert not cycles, cycles
