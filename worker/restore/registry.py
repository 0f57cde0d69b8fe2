"""Restoration methods by name: the catalogue's facts (app.methods) joined to their implementations.

Adding a method: its folder under worker/restore/ and one ``register`` line here (or, for a method living
elsewhere, one ``register`` call with its catalogue entry). Implementations given as "module:Class" are imported
when a job uses them, so a RestoreLCC job never imports peft.
"""

from __future__ import annotations

from importlib import import_module

from app.methods import RestorationMethod, register_restoration, restoration_method, unregister_restoration
from app.schemas import JobSpec
from worker.errors import SpecError
from worker.restore.method import RestoreMethod

_IMPLEMENTATIONS: dict[str, type[RestoreMethod] | str] = {}


def register(method: RestorationMethod, implementation: type[RestoreMethod] | str) -> None:
    """Make ``method`` (added to the catalogue if new) run as ``implementation`` (a class, or "module:Class")."""
    register_restoration(method)
    _IMPLEMENTATIONS[method.name] = implementation


def unregister(name: str) -> None:
    """Remove a method registered at run time (from the catalogue too)."""
    unregister_restoration(name)
    _IMPLEMENTATIONS.pop(name, None)


def implementation(name: str) -> type[RestoreMethod]:
    try:
        found = _IMPLEMENTATIONS[name]
    except KeyError:
        raise SpecError(f"restoration.method {name!r} has no implementation in this worker",
                        field="restoration.method") from None
    if isinstance(found, str):
        module, _, cls = found.partition(":")
        found = _IMPLEMENTATIONS[name] = getattr(import_module(module), cls)
    return found


def method_for(spec: JobSpec) -> RestoreMethod:
    """The job's restoration method, ready for its preflight."""
    return implementation(spec.restoration.method)(spec.restoration, spec.seed)


register(restoration_method("restorelcc"), "worker.restore.restorelcc.method:RestoreLCC")
register(restoration_method("bias"), "worker.restore.bias.method:Bias")
register(restoration_method("lora"), "worker.restore.adapters.method:Adapter")
register(restoration_method("dora"), "worker.restore.adapters.method:Adapter")
register(restoration_method("none"), RestoreMethod)
