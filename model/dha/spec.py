"""The ``dha`` architecture: the Llama-style decoder with decoupled-head attention.

Units, builders and layout rules are the dense decoder's (``model/llama``); the blocks
take ``model.attention=dha`` (:mod:`model.dha.layers`, which this module registers), so
the per-layer head counts and maps, and their tensor-parallel rules, come from the
layer. What the spec adds is the inference cache sized per layer (``Gk`` key and
``Gv`` value heads, :func:`make_cache`) and the Hugging Face adapter, which exports a
``trust_remote_code`` model (:mod:`model.dha.hf`).
"""
from __future__ import annotations

import torch

from polytron.model.dha import layers  # noqa: F401  (registers the "dha" attention slot)
from polytron.model.dha.config import DHAConfig
from polytron.model.dha.hf import DHAAdapter
from polytron.model.dha.layers import kv_heads
from polytron.model.llama import build_unit, check_layout, tied, units
from polytron.model.spec import ModelSpec, register_spec


def make_cache(cfg, batch: int, max_len: int, device, dtype):
    """A DenseKVCache whose layer ``i`` holds (B, Gk_i, max_len, hd) keys and (B, Gv_i, max_len,
    hd) values."""
    from polytron.model.generate import DenseKVCache
    keys, values = {}, {}
    for i in range(cfg.num_layers):
        gk, gv = kv_heads(cfg, i)
        keys[i] = torch.zeros(batch, gk, max_len, cfg.head_dim, device=device, dtype=dtype)
        values[i] = torch.zeros(batch, gv, max_len, cfg.head_dim, device=device, dtype=dtype)
    return DenseKVCache(keys, values)


DHA = register_spec(ModelSpec(
    name="dha", units=units, build_unit=build_unit, check_layout=check_layout,
    hf=DHAAdapter(), make_cache=make_cache, tied=tied, config=DHAConfig,
    uses_section=lambda cfg: cfg.attention == "dha",
    slot_defaults={"attention": "dha"}, slot_kinds={"attention": ("dha",)},
    doc="Decoupled-head attention (Chen et al. 2024): per-layer key and value head counts and "
        "query maps (model.dha); exports a trust_remote_code model."))
