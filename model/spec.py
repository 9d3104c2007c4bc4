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
* ``config``: the dataclass of its own settings, read from ``model.<section>`` (the
  section name defaults to the spec's name); :class:`model.config.ModelConfig` resolves
  its sections through this registry, so an architecture adds no field to a shared file.
* ``slot_defaults`` / ``slot_kinds``: which layer kinds the architecture implies when the
  config leaves a slot unset, and which it allows (``arch: moe`` implies ``mlp: moe``).
* ``uses_section(cfg)``: whether a model of *another* architecture uses this section
  through a layer kind this folder registers (``linear: bitlinear`` reads ``model.bitnet``);
  only the sections a run uses are saved with it and compared on resume.

Architectures in the tree are found by :func:`model.architectures.discover` (every
subpackage of ``polytron.model`` with a ``spec`` module); out-of-tree ones register on
import of a ``model.plugins`` module.

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
    config: Optional[type] = None
    """Dataclass of this architecture's settings (``model.<section>``), with ``validate(model)``;
    None: the architecture has no settings of its own."""
    section: str = ""
    """Key of that section under ``model``; empty means the spec's name."""
    uses_section: Callable[[Any], bool] = field(default=lambda cfg: False)
    """Whether a model whose ``arch`` is another spec uses this section (through a layer kind
    this architecture registers); a model of this arch always does."""
    slot_defaults: dict[str, str] = field(default_factory=dict)
    """Slot kinds this architecture implies where the config leaves the slot unset, e.g.
    ``{"mlp": "moe"}``; slots not named take the generic default (:data:`GENERIC_SLOTS`)."""
    slot_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per slot, the only kinds this architecture accepts (a config naming another is refused);
    slots not named accept every registered kind."""

    @property
    def section_name(self) -> str:
        return self.section or self.name

    def used_by(self, cfg) -> bool:
        """Whether the model ``cfg`` uses this spec's config section."""
        return self.config is not None and (cfg.arch == self.name or self.uses_section(cfg))

    def slot_default(self, slot: str) -> str:
        """The kind a config that leaves ``slot`` unset gets under this architecture."""
        return self.slot_defaults.get(slot, GENERIC_SLOTS[slot])


#: Layer slots of ModelConfig and the kind each takes when neither the config nor the
#: architecture (ModelSpec.slot_defaults) names one.
GENERIC_SLOTS = {"attention": "gqa", "mlp": "swiglu", "linear": "linear"}


SPECS: dict[str, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to the registry (``model.arch`` selects it)."""
    SPECS[spec.name] = spec
    return spec


def registered_specs() -> dict[str, ModelSpec]:
    """Every registered spec by name, the built-in architectures discovered first."""
    from polytron.model.architectures import discover
    discover()
    return SPECS


def config_sections() -> dict[str, ModelSpec]:
    """The registered specs that declare a config section, by section name."""
    return {s.section_name: s for s in registered_specs().values() if s.config is not None}


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name`` (discovering the built-in architectures first)."""
    if name not in registered_specs():
        from polytron.model.configlib import bad
        raise bad("model.arch", name, "one of " + ", ".join(repr(n) for n in sorted(SPECS)))
    return SPECS[name]


def layer_units(units: list[Unit]) -> list[int]:
    """Positions of the ``block`` units (the layers pipeline stages are counted in)."""
    return [i for i, u in enumerate(units) if u.kind == "block"]
