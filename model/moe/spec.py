"""The ``moe`` architecture: the Llama-style decoder whose MLP slot is an MoE kind.

Units, blocks and layout rules are the dense decoder's (``model/llama``); the layers use
``model.mlp=moe`` (token routing) or ``mh_moe`` (multi-head MoE), placed by
``model.moe.every`` / ``first_dense`` (the other layers keep the dense SwiGLU). The MoE
kinds themselves are slot entries (model/moe/layer.py) that any spec may use; this spec
adds their Hugging Face adapter (model/moe/hf.py). Importing this module registers the
MLP kinds and the spec.
"""
from __future__ import annotations

from polytron.model.llama import build_unit, check_layout, make_cache, tied, units
from polytron.model.moe import layer  # noqa: F401  (registers the moe and mh_moe MLP kinds)
from polytron.model.moe.config import MOE_KINDS, MoEConfig
from polytron.model.moe.hf import MoEAdapter
from polytron.model.spec import ModelSpec, register_spec

MOE = register_spec(ModelSpec(
    name="moe", units=units, build_unit=build_unit, check_layout=check_layout,
    hf=MoEAdapter(), make_cache=make_cache, tied=tied, config=MoEConfig,
    uses_section=lambda cfg: cfg.mlp in MOE_KINDS,
    slot_defaults={"mlp": "moe"}, slot_kinds={"mlp": MOE_KINDS},
    doc="Mixture-of-experts decoder: the Llama-style decoder with moe / mh_moe MLP layers "
        "(exports to MixtralForCausalLM, Glm4MoeForCausalLM or remote code)."))
