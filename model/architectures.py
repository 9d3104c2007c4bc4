"""Discovery of the built-in architectures: every subpackage of ``polytron.model`` that has
a ``spec`` module is one, and importing that module registers its spec
(:func:`model.spec.register_spec`). Nothing here names an architecture, so adding one
is adding its folder; out-of-tree architectures register through ``model.plugins``.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil

_FOUND: list[str] = []


def discover() -> list[str]:
    """Import the ``spec`` module of every architecture folder under ``polytron.model``
    (once per process); returns their package names, sorted."""
    if _FOUND:
        return _FOUND
    import polytron.model as package
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg)
    found = [n for n in names if importlib.util.find_spec(f"{package.__name__}.{n}.spec") is not None]
    _FOUND.extend(found)
    for name in found:
        importlib.import_module(f"{package.__name__}.{name}.spec")
    return _FOUND
