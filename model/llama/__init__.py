"""The dense Llama-style decoder: units, builders, layout rules and tying, which the other
decoders reuse; ``spec.py`` registers the ``llama`` spec with its HF adapter.

Units: ``tok_embeddings`` -> ``layers.0 .. layers.{L-1}`` (pre-norm blocks of the
``model.attention`` and ``model.mlp`` slots, per layer through ``layer_attention`` /
``layer_mlp``) -> ``norm`` -> ``output``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from polytron.model.layers import Block, RMSNorm, block_tp_requirements, layer_attention, layer_mlp, make_linear
from polytron.model.spec import Unit


def units(cfg) -> list[Unit]:
    return ([Unit("tok_embeddings", "embedding")]
            + [Unit(f"layers.{i}", "block") for i in range(cfg.num_layers)]
            + [Unit("norm", "norm"), Unit("output", "head")])


def build_unit(cfg, unit: Unit) -> nn.Module:
    if unit.kind == "embedding":
        return nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    if unit.kind == "block":
        i = int(unit.name.split(".")[1])
        return Block(cfg, i, layer_attention(cfg, i), layer_mlp(cfg, i))
    if unit.kind == "norm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return make_linear(cfg, cfg.hidden_size, cfg.vocab_size, False, "head")


def check_layout(cfg, tp: int) -> Optional[str]:
    """Tensor-parallel divisibility of the vocabulary and of every block."""
    for i in range(cfg.num_layers):
        err = block_tp_requirements(cfg, i, tp, layer_attention(cfg, i), layer_mlp(cfg, i))
        if err:
            return err
    if cfg.vocab_size % tp:
        return f"parallel.tensor={tp} must divide model.vocab_size={cfg.vocab_size}"
    return None


def tied(cfg) -> list[tuple[str, str]]:
    return [("output.weight", "tok_embeddings.weight")] if cfg.tie_embeddings else []


def make_cache(cfg, batch: int, max_len: int, device, dtype):
    from polytron.model.generate import DenseKVCache
    return DenseKVCache.for_layers(cfg, range(cfg.num_layers), batch, max_len, device, dtype)
