"""The ``bitnet`` architecture: the Llama-style decoder with BitNet b1.58 projections.

Units and layout rules are the dense decoder's (``model/llama``): embedding, pre-norm
blocks of the ``model.attention`` / ``model.mlp`` slots, final norm, head. What makes a
model BitNet is its slots:

* the released 2B4T model (transformers ``BitNetForCausalLM``): ``attention: gqa_subnorm``,
  ``mlp: relu2_subnorm``, ``linear: bitlinear`` (exported by :mod:`model.bitnet.hf`);
* the paper's model: ``attention: gqa``, ``mlp: swiglu``, ``linear: bitlinear`` with
  ``bitnet.linear_norm: true`` (RMSNorm inside each BitLinear); with
  ``bitnet.block_prenorm: false`` also the FAQ's block without the two pre-norms
  (:class:`~model.bitnet.layers.NoPreNormBlock`).

The spec adds the option of a ternary input embedding (``bitnet.quantize`` lists
``embedding``) and the Hugging Face adapter. Importing this module registers the
layer kinds (:mod:`model.bitnet.layers`) and the spec.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.bitnet import (
    layers,  # noqa: F401  (registers bitlinear, gqa_subnorm, relu2_subnorm)
    schedule,  # noqa: F401  (registers schedule.kind two_stage_linear)
)
from polytron.model.bitnet.config import BitNetConfig
from polytron.model.bitnet.hf import BitNetAdapter
from polytron.model.bitnet.layers import NoPreNormBlock
from polytron.model.bitnet.quant import weight_ste
from polytron.model.layers import layer_attention, layer_mlp
from polytron.model.llama import build_unit as llama_build_unit
from polytron.model.llama import check_layout, make_cache, tied, units
from polytron.model.spec import ModelSpec, Unit, register_spec


class BitEmbedding(nn.Embedding):
    """An embedding table looked up in its ternary form T * beta (absmean over the whole
    table; the latent table trains through the straight-through estimator)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, weight_ste(self.weight))      # (B, T, d)


def quantized_embedding(cfg) -> bool:
    return cfg.linear == "bitlinear" and "embedding" in cfg.bitnet.quantize


def build_unit(cfg, unit: Unit) -> nn.Module:
    if unit.kind == "embedding" and quantized_embedding(cfg):
        return BitEmbedding(cfg.vocab_size, cfg.hidden_size)
    if unit.kind == "block" and not cfg.bitnet.block_prenorm:
        i = int(unit.name.split(".")[1])
        return NoPreNormBlock(cfg, i, layer_attention(cfg, i), layer_mlp(cfg, i))
    return llama_build_unit(cfg, unit)


BITNET = register_spec(ModelSpec(
    name="bitnet", units=units, build_unit=build_unit, check_layout=check_layout,
    hf=BitNetAdapter(), make_cache=make_cache, tied=tied, config=BitNetConfig,
    uses_section=lambda cfg: cfg.linear == "bitlinear", slot_defaults={"linear": "bitlinear"},
    doc="BitNet b1.58: the Llama-style decoder with ternary BitLinear projections "
        "(2B4T slots gqa_subnorm + relu2_subnorm export to BitNetForCausalLM)."))
