"""Packed BitNet inference: ternary weights kept at 2 bits each in memory.

* :class:`PackedBitLinear`: the evaluation form of :class:`~model.bitnet.layers.BitLinear`.
  It holds the packed ternary matrix (``weight``, uint8 ``(ceil(out/4), in)``, the layout
  of :func:`~model.bitnet.quant.pack_ternary`) and ``weight_scale`` = beta (fp32, one per
  tensor); each forward unpacks the matrix transiently, multiplies by beta and quantizes
  the input exactly as BitLinear does, so a packed model's logits equal the unpacked
  model's bit for bit (same dtype and device).
* :func:`pack_model`: replaces every BitLinear of a model in place (latent weights dropped).
* :func:`load_packed`: builds our model from a packed ``BitNetForCausalLM`` directory (the
  ``convert_checkpoint.py to-hf --packed`` output, or any directory in that layout), for
  evaluation and generation (:mod:`model.generate`).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from polytron.model.bitnet.layers import BitLinear
from polytron.model.bitnet.quant import (
    PER_BYTE,
    bitlinear_packed,
    pack_ternary,
    rms_normalize,
    ternary,
    unpack_ternary,
    weight_scale,
)
from polytron.model.hf import ConvertError, check_param_shapes


class PackedBitLinear(nn.Module):
    """y = Q8(x) @ (T * beta)^T (+ b) with T stored packed; inference only (no gradients)."""

    weight: torch.Tensor                  # (R, in) uint8 buffers, registered in __init__
    weight_scale: torch.Tensor            # (1,) fp32
    bias: Optional[torch.Tensor]          # (out,)
    role: Optional[str]                   # the source BitLinear's projection role

    def __init__(self, in_features: int, out_features: int, bias: bool, norm_eps: Optional[float] = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.norm_eps = in_features, out_features, norm_eps
        rows = -(-out_features // PER_BYTE)
        self.register_buffer("weight", torch.zeros(rows, in_features, dtype=torch.uint8))   # (R, in)
        self.register_buffer("weight_scale", torch.ones(1))                               # beta, fp32
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> "PackedBitLinear":
        """Pack a trained BitLinear's latent weight (its T and beta, as its forward computes them)."""
        w = layer.weight
        packed = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.norm_eps, w.dtype)
        packed.to(w.device)
        beta = weight_scale(w)
        packed.weight.copy_(pack_ternary(ternary(w, beta)))
        packed.weight_scale.copy_(beta.reshape(1))
        if layer.bias is not None:
            assert packed.bias is not None                # built with bias=True above
            packed.bias.copy_(layer.bias)
        packed.role = getattr(layer, "role", None)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_eps is not None:
            x = rms_normalize(x, self.norm_eps)                                   # (..., in)
        t = unpack_ternary(self.weight, self.out_features, x.dtype)              # (out, in), transient
        return bitlinear_packed(x, t, self.weight_scale[0], self.bias)           # (..., out)

    def packed_bytes(self) -> int:
        """Bytes of the packed weight and its scale."""
        return self.weight.numel() * self.weight.element_size() + self.weight_scale.numel() * 4

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=2bit"


def _replace(model: nn.Module, make) -> int:
    """Swap every BitLinear in ``model`` for ``make(layer)``; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    for name, layer in targets:
        parent, _, leaf = name.rpartition(".")
        new = make(layer)
        new.role = getattr(layer, "role", None)
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return len(targets)


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every BitLinear of ``model`` by its PackedBitLinear (in place; returns ``model``)."""
    _replace(model, PackedBitLinear.from_bitlinear)
    return model.eval()


# ---------------------------------------------------------------- loading a packed directory

def read_packed_config(src: str) -> tuple[dict, str]:
    """(config.json contents, linear class) of a packed BitNetForCausalLM directory."""
    from polytron.model.bitnet.hf import LINEAR_CLASSES
    from polytron.model.hf import read_hf_config
    hf, file = read_hf_config(src)
    qc = hf.get("quantization_config") or {}
    qc = qc if isinstance(qc, dict) else {}
    if hf.get("model_type") != "bitnet" or qc.get("quant_method") != "bitnet":
        raise ConvertError(f"{file}: not a BitNet model (model_type={hf.get('model_type')!r}, "
                           f"quantization_config.quant_method={qc.get('quant_method')!r})")
    if qc.get("quantization_mode") != "offline" or qc.get("linear_class") not in LINEAR_CLASSES:
        raise ConvertError(f"{file}: field 'quantization_config' selects {qc.get('linear_class')!r} in "
                           f"{qc.get('quantization_mode')!r} mode, not packed weights (offline "
                           f"{' or '.join(LINEAR_CLASSES)})")
    return hf, qc["linear_class"]


def read_tensors(src: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory (one file or an index of shards)."""
    from safetensors.torch import load_file
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        path = os.path.join(src, str(name))
        if not os.path.isfile(path):
            raise ConvertError(f"{src}: {name} is missing")
        try:
            out.update(load_file(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise ConvertError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    return out


def packed_config(src: str):
    """Our ModelConfig of a packed BitNetForCausalLM directory."""
    from polytron.model.bitnet.hf import BitNetAdapter, quantized_roles
    hf, _ = read_packed_config(src)
    file = os.path.join(src, "config.json")
    return BitNetAdapter().model_config(hf, file, quantized_roles(hf["quantization_config"], file))


def packed_skeleton(cfg, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Our model for ``cfg`` with PackedBitLinear layers, uninitialized (built on meta, then
    allocated once: the latent weights never exist)."""
    from polytron.model.layers import rope_table
    from polytron.model.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
        _replace(model, lambda m: PackedBitLinear(m.in_features, m.out_features, m.bias is not None,
                                                  m.norm_eps, dtype))
    model.to_empty(device=device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model.rope = rope_table(cfg, device=device)
    model.tie_weights()
    return model


def load_packed(src: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Our Transformer from a packed BitNetForCausalLM directory, ternary weights kept packed.

    Full-precision tensors (embedding, norms, head) are cast to ``dtype``; ``weight_scale``
    is turned back into beta for whichever transformers class the config names."""
    from polytron.model.bitnet.hf import BitNetAdapter
    _, linear_class = read_packed_config(src)
    adapter, cfg = BitNetAdapter(), packed_config(src)
    model = packed_skeleton(cfg, device, dtype)
    model.load_state_dict(_our_tensors(adapter, cfg, read_tensors(src), linear_class, model, src, dtype))
    model.tie_weights()
    return model.eval()


def _our_tensors(adapter, cfg, hf: dict[str, torch.Tensor], linear_class: str, model: nn.Module, src: str,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF tensors under our names, each checked against the packed model's shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        stem, _, leaf = name.rpartition(".")
        if leaf == "weight_scale":
            ours[adapter.from_hf_name(cfg, stem + ".weight")[:-len("weight")] + "weight_scale"] = t
        else:
            ours[adapter.from_hf_name(cfg, name)] = t
    for name, source in adapter.tied(cfg):
        if source in ours:
            ours[name] = ours[source]
    check_param_shapes(ours, expected, src, lambda name: f"for '{name}'", "config.json")
    extra = sorted(set(ours) - set(expected))
    if extra:
        raise ConvertError(f"{src}: tensor for '{extra[0]}' does not fit the config")
    return {k: _as_ours(k, ours, linear_class, dtype) for k in expected}


def _as_ours(name: str, ours: dict[str, torch.Tensor], linear_class: str, dtype: torch.dtype) -> torch.Tensor:
    t = ours[name]
    if name.endswith("weight_scale"):
        t = t.float()
        return t if linear_class == "autobitlinear" else 1.0 / t          # beta
    if t.dtype == torch.uint8:
        return t
    if name.endswith(".bias") and name[:-len("bias")] + "weight_scale" in ours and linear_class == "autobitlinear":
        scale = ours[name[:-len("bias")] + "weight_scale"].float()
        return (t.float() * scale).to(dtype)                               # AutoBitLinear scaled it by beta
    return t.to(dtype)
