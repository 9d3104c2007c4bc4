"""The ``toy`` spec: the dense decoder's units (model/llama) whose MLP slot is ``toy_glu``
(implied by ``model.arch=toy``, the only kind it accepts), with its own section
``model.toy`` and HF adapter."""
from __future__ import annotations

from polytron.model.llama import build_unit, check_layout, make_cache, tied, units
from polytron.model.spec import ModelSpec, register_spec
from tests.model.toyarch.config import ToyConfig
from tests.model.toyarch.hf import ToyAdapter
from tests.model.toyarch.layers import KIND

TOY = register_spec(ModelSpec(
    name="toy", units=units, build_unit=build_unit, check_layout=check_layout, hf=ToyAdapter(),
    make_cache=make_cache, tied=tied, config=ToyConfig, uses_section=lambda cfg: cfg.mlp == KIND,
    slot_defaults={"mlp": KIND}, slot_kinds={"mlp": (KIND,)},
    doc="Test-only: the dense decoder with a toy MLP, its own section, TP role and HF adapter."))
