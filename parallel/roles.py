"""Registries of parallel roles: what a declared role means to the parallel layer.

Layers declare roles (``tp_roles()``, :class:`polytron.model.protocols.TPRoles`); this
module maps role names to what applies them, and architecture folders add their own
entries beside their layers, so ``parallel/`` never imports an architecture:

* :data:`TP_STYLES`: tensor-parallel role name -> ``factory(role, module, tp,
  sequence_parallel) -> ParallelStyle | None`` (None: leave the module alone). The
  built-in roles are registered by :mod:`polytron.parallel.tensor_parallel`; e.g.
  model/bitnet/tp_styles.py registers ``sharded_norm``, model/dha/tp_styles.py
  ``tp_local``, model/moe/tp_styles.py ``replicated``.
* :data:`UNIT_ROLES`: unit kind -> the role of the whole unit (embedding, head, final norm).

This module is import-light (no ``torch.distributed``): a layer module can register its
styles at import and import the heavy parts inside its factory.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from polytron.model.protocols import Role

#: ``factory(role, module, tp, sequence_parallel) -> ParallelStyle | None``. ``role`` is the
#: declared role as written (a name, or a tuple whose first item is the name), so a factory
#: can read its arguments (``("kv", num_kv_heads, head_dim)``).
StyleFactory = Callable[[Role, nn.Module, int, bool], Optional[Any]]

#: Tensor-parallel role name -> style factory (see the module doc).
TP_STYLES: dict[str, StyleFactory] = {}

#: Roles of whole units by kind (their modules declare nothing themselves).
UNIT_ROLES: dict[str, Role] = {"embedding": "vocab_rowwise", "head": "vocab_colwise", "norm": "sequence"}


def register_tp_style(name: str, factory: Optional[StyleFactory] = None):
    """Register ``factory`` for role ``name``; usable as a decorator, ``@register_tp_style(name)``.

    Another factory under a taken name is an error (two folders disagreeing on a role);
    the same function again (a module imported twice) is not."""
    def add(f: StyleFactory) -> StyleFactory:
        old = TP_STYLES.get(name)
        if old is not None and _qualname(old) != _qualname(f):
            raise ValueError(f"tensor-parallel role {name!r} is already registered by {_qualname(old)}")
        TP_STYLES[name] = f
        return f
    return add(factory) if factory is not None else add


def register_unit_role(kind: str, role: Role) -> None:
    """Give every unit of ``kind`` the (registered) role ``role`` as a whole."""
    UNIT_ROLES[kind] = role


def _qualname(f: Callable) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def role_name(role: Role) -> str:
    """The registry key of a declared role: the name, or a tuple role's first item."""
    return role[0] if isinstance(role, tuple) else role


def style_for(role: Role, module: nn.Module, tp: int, sequence_parallel: bool) -> Optional[Any]:
    """The ParallelStyle of a declared role, or None (leave the module alone)."""
    factory = TP_STYLES.get(role_name(role))
    if factory is None:
        raise ValueError(f"unknown tensor-parallel role {role!r} on {type(module).__name__} "
                         f"(registered: {', '.join(sorted(TP_STYLES))})")
    return factory(role, module, tp, sequence_parallel)
