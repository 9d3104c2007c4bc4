"""The YOCO decoder-decoder spec (``model.arch=yoco``), registered on import.

Units, for L layers of which S = ``model.yoco.self_layers`` (default L // 2) form the
self-decoder::

    tok_embeddings (x sqrt(d))
    layers.0 .. layers.{S-1}     self-decoder: Block(swa | retention, model.mlp)
    shared_kv                    RMSNorm -> K (RoPE), V projections; produces yoco_k, yoco_v
    layers.S .. layers.{L-1}     cross-decoder: CrossDecoderBlock(model.mlp); consume yoco_k, yoco_v
    norm -> output

A pipeline border anywhere works from these declarations: ``shared_kv`` goes with the
first cross-decoder layer, and a border inside the cross-decoder sends the shared
key/value on with the hidden state.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from polytron.model.layers import ATTENTIONS, MLPS, Block, RMSNorm, layer_mlp, make_linear
from polytron.model.spec import ModelSpec, Unit, register_spec
from polytron.model.yoco.cache import make_cache
from polytron.model.yoco.config import SELF_DECODER_KINDS, YOCOConfig
from polytron.model.yoco.hf import YOCOAdapter
from polytron.model.yoco.layers import CARRY, CrossAttention, CrossDecoderBlock, ScaledEmbedding, SharedKV

NAME = "yoco"
KV_KIND = "yoco_kv"


def units(cfg) -> list[Unit]:
    S, L = cfg.yoco.num_self_layers(cfg), cfg.num_layers
    return ([Unit("tok_embeddings", "embedding")]
            + [Unit(f"layers.{i}", "block") for i in range(S)]
            + [Unit("shared_kv", KV_KIND, produces=CARRY)]
            + [Unit(f"layers.{i}", "block", consumes=CARRY) for i in range(S, L)]
            + [Unit("norm", "norm"), Unit("output", "head")])


def is_self_layer(cfg, index: int) -> bool:
    return index < cfg.yoco.num_self_layers(cfg)


def build_unit(cfg, unit: Unit) -> nn.Module:
    if unit.kind == "embedding":
        return ScaledEmbedding(cfg.vocab_size, cfg.hidden_size)
    if unit.kind == KV_KIND:
        return SharedKV(cfg)
    if unit.kind == "norm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    if unit.kind == "head":
        return make_linear(cfg, cfg.hidden_size, cfg.vocab_size, False, "head")
    i = int(unit.name.split(".")[1])
    if is_self_layer(cfg, i):
        return Block(cfg, i, cfg.yoco.self_decoder, layer_mlp(cfg, i))
    return CrossDecoderBlock(cfg, i, layer_mlp(cfg, i))


def check_layout(cfg, tp: int) -> Optional[str]:
    """Tensor-parallel rules of the shared key/value, every layer kind and the vocabulary."""
    err = SharedKV.tp_requirements(cfg, tp)
    if err:
        return err
    for i in range(cfg.num_layers):
        mixer = ATTENTIONS[cfg.yoco.self_decoder] if is_self_layer(cfg, i) else CrossAttention
        for cls in (mixer, MLPS[layer_mlp(cfg, i)]):
            check = getattr(cls, "tp_requirements", None)
            err = check(cfg, i, tp) if check else None
            if err:
                return err
    if cfg.vocab_size % tp:
        return f"parallel.tensor={tp} must divide model.vocab_size={cfg.vocab_size}"
    return None


def tied(cfg) -> list[tuple[str, str]]:
    return [("output.weight", "tok_embeddings.weight")] if cfg.tie_embeddings else []


YOCO = register_spec(ModelSpec(
    name=NAME, units=units, build_unit=build_unit, check_layout=check_layout, hf=YOCOAdapter(),
    make_cache=make_cache, tied=tied, config=YOCOConfig,
    uses_section=lambda cfg: cfg.attention in SELF_DECODER_KINDS, slot_kinds={"attention": ("gqa",)},
    doc="YOCO decoder-decoder: a sliding-window or gated-retention self-decoder, one shared "
        "key/value, a cross-decoder attending to it (docs/yoco.md)."))
