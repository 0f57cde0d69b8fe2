"""Every code a job can fail with through a JobFailure is in docs/api.md's table of codes: the code of every
JobFailure subclass in app/ and worker/ (found in the source, so that one no test imports counts too), and JobFailure's
own ``job_failed`` wherever the base class itself is raised."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOC = (ROOT / "docs" / "api.md").read_text()
BASE = "JobFailure"


def documented_codes(doc: str) -> set[str]:
    """The codes in the first cells of the `| code | when |` table."""
    rows = doc.split("| code | when |", 1)[1].split("\n\n", 1)[0].splitlines()
    return {code for row in rows if row.startswith("| ") for code in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def failure_codes() -> dict[str, str]:
    """Where → code, for every JobFailure subclass and every place the base class is raised, in app/ and worker/."""
    classes: dict[str, tuple[list[str], str | None, str]] = {}  # name → (bases, own code, where)
    bare: list[str] = []
    for file in sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]):
        tree = ast.parse(file.read_text(), str(file))
        where = str(file.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                code = next((stmt.value.value for stmt in node.body
                             if isinstance(stmt, ast.Assign) and any(_name(t) == "code" for t in stmt.targets)
                             and isinstance(stmt.value, ast.Constant)), None)
                classes[node.name] = ([n for b in node.bases if (n := _name(b))], code, f"{where}:{node.lineno}")
            elif isinstance(node, ast.Call) and _name(node.func) == BASE:
                bare.append(f"{where}:{node.lineno}")

    def code_of(name: str) -> str | None:
        bases, code, _ = classes[name]
        if code is not None:
            return code
        return next((c for b in bases if b in classes and (c := code_of(b)) is not None), None)

    def is_failure(name: str) -> bool:
        return name == BASE or any(b in classes and is_failure(b) for b in classes[name][0])

    out = {f"{name} ({classes[name][2]})": code_of(name) for name in classes if name != BASE and is_failure(name)}
    out.update({f"JobFailure raised at {where}": code_of(BASE) for where in bare})
    return out


def test_the_scan_finds_the_failure_classes_the_worker_defines():
    """The source scan sees what Python sees: every subclass defined by the modules that define them, with its code."""
    import worker.errors
    import worker.restore.offsets.merge
    import worker.service.handoff

    def subclasses(cls: type) -> set[type]:
        return {s for c in cls.__subclasses__() for s in {c} | subclasses(c)}

    found = failure_codes()
    for cls in subclasses(worker.errors.JobFailure):
        if cls.__module__.startswith(("app.", "worker.")):
            assert any(k.startswith(f"{cls.__name__} (") and v == cls.code for k, v in found.items()), cls
    assert len(documented_codes(DOC)) > 10


def test_every_code_a_job_can_fail_with_is_documented():
    documented = documented_codes(DOC)
    assert {where: code for where, code in failure_codes().items() if code not in documented} == {}
