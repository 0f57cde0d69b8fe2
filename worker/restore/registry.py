"""Restoration methods by name: the catalogue's facts (app.methods) joined to their implementations.

Adding a method: its folder under worker/restore/ and one ``register`` line here (or, for a method living
elsewhere, one ``register`` call with its catalogue entry).
"""

from __future__ import annotations

from app.methods import RestorationMethod, register_restoration, restoration_method, unregister_restoration
from app.schemas import JobSpec
from worker.restore.adapters.method import Adapter
from worker.restore.bias.method import Bias
from worker.restore.method import RestoreMethod
from worker.restore.restorelcc.method import RestoreLCC

_IMPLEMENTATIONS: dict[str, type[RestoreMethod]] = {}


def register(method: RestorationMethod, implementation: type[RestoreMethod]) -> None:
    """Make ``method`` (added to the catalogue if new) run as ``implementation``."""
    register_restoration(method)
    _IMPLEMENTATIONS[method.name] = implementation


def unregister(name: str) -> None:
    """Remove a method registered at run time (from the catalogue too)."""
    unregister_restoration(name)
    _IMPLEMENTATIONS.pop(name, None)


def method_for(spec: JobSpec) -> RestoreMethod:
    """The job's restoration method, ready for its preflight."""
    name = spec.restoration.method
    try:
        implementation = _IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"restoration.method {name!r} has no implementation in this worker") from None
    return implementation(spec.restoration, spec.seed)


register(restoration_method("restorelcc"), RestoreLCC)
register(restoration_method("bias"), Bias)
register(restoration_method("lora"), Adapter)
register(restoration_method("dora"), Adapter)
register(restoration_method("none"), RestoreMethod)
