"""Model specs: one registered description per architecture.

A :class:`ModelSpec` owns everything the rest of the system needs to know about an
architecture, so that nothing outside its folder names its projections:

* ``units(cfg)``: the model as an ordered list of :class:`Unit` (name, kind, what it
  produces for and consumes from the *carry*). The pipeline cut, FSDP wrapping,
  activation checkpointing and compile iterate over these units.
* ``build_unit(cfg, unit)``: the module of one unit, for one device.
* ``check_layout(cfg, tp)``: divisibility rules of its layer kinds under tensor
  parallelism (run before any process group exists); the layer classes declare them.
* ``hf``: the Hugging Face adapter (config writer, tensor name map, both directions).
* ``make_cache(...)``: the inference cache for generation.

Unit kinds: ``embedding`` (tokens -> hidden), ``block`` (a transformer layer; the unit
pipeline stages are counted in), ``norm`` and ``head`` (hidden -> logits) take the
hidden state only; any other kind (for example a unit that produces a carry tensor)
is called like a block, ``unit(x, ctx)``.

The *carry* is a dict of tensors that travels beside the hidden state: a unit that
``produces`` a name returns ``(x, {name: tensor})``, and later units read
``ctx.carry[name]``. Across a pipeline border the live carry tensors are sent with
the hidden state (see :mod:`parallel.pipeline`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

#: Unit kinds that take only the hidden state (or tokens) and return one tensor.
PLAIN_KINDS = ("embedding", "norm", "head")


@dataclass(frozen=True)
class Unit:
    """One entry of a model's ordered unit list."""
    name: str                       # module path in the model: "tok_embeddings", "layers.3", ...
    kind: str                       # "embedding" | "block" | "norm" | "head" | another kind
    produces: tuple[str, ...] = ()  # carry names this unit adds
    consumes: tuple[str, ...] = ()  # carry names this unit reads

    @property
    def takes_context(self) -> bool:
        return self.kind not in PLAIN_KINDS


@dataclass
class ModelSpec:
    """How one architecture is built, sharded, counted, exported and cached."""
    name: str
    units: Callable[[Any], list[Unit]]
    build_unit: Callable[[Any, Unit], nn.Module]
    check_layout: Callable[[Any, int], Optional[str]]
    hf: Any = None                              # an HFAdapter (model/hf.py), or None: no export
    make_cache: Optional[Callable[..., Any]] = None
    tied: Callable[[Any], list[tuple[str, str]]] = field(default=lambda cfg: [])
    """(parameter, parameter it shares storage with) pairs, e.g. the head tied to the embedding."""
    doc: str = ""


SPECS: dict[str, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to the registry (``model.arch`` selects it)."""
    SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name`` (importing the built-in architectures first)."""
    import polytron.model.architectures  # noqa: F401  (registers every built-in spec)
    if name not in SPECS:
        from polytron.model.configlib import bad
        raise bad("model.arch", name, "one of " + ", ".join(repr(n) for n in sorted(SPECS)))
    return SPECS[name]


def layer_units(units: list[Unit]) -> list[int]:
    """Positions of the ``block`` units (the layers pipeline stages are counted in)."""
    return [i for i, u in enumerate(units) if u.kind == "block"]
