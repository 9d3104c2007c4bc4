"""``model.yoco``: settings of the YOCO decoder-decoder (``model.arch=yoco``).

The two self-decoder mixers are also attention slot kinds (``model.attention=swa`` or
``retention`` in any spec that uses the slot); they read their settings here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from polytron.model.configlib import bad, doc

#: Attention kinds of the self-decoder (also slot kinds usable in any spec); they read this section.
SELF_DECODER_KINDS = ("swa", "retention")


@dataclass
class YOCOConfig:
    """YOCO settings (used when ``model.arch=yoco``, and by the ``swa`` / ``retention``
    attention kinds wherever they are used)."""
    self_decoder: Literal["swa", "retention"] = field(default="swa", metadata=doc(
        "Mixer of the self-decoder layers: swa (sliding-window attention) or retention "
        "(gated retention)."))
    self_layers: int = field(default=0, metadata=doc(
        "Layers in the self-decoder; the rest form the cross-decoder. 0 means half "
        "(model.num_layers // 2), as in the paper."))
    sliding_window: int = field(default=1024, metadata=doc(
        "swa: keys each query sees, itself included (flash-attn window_size=(W-1, 0)); "
        "the paper uses 1024."))
    self_kv_heads: int = field(default=0, metadata=doc(
        "swa: key/value heads of the sliding-window layers; 0 means model.num_kv_heads (the "
        "released code's are MHA: set model.num_heads for that). The cross-decoder's shared "
        "key/value always has model.num_kv_heads."))
    retention_chunk: int = field(default=64, metadata=doc(
        "retention: positions per chunk of the chunkwise form (a speed knob: the result "
        "is the same up to rounding; the released code uses 256)."))
    gate_logit_normalizer: float = field(default=16.0, metadata=doc(
        "retention: tau in gamma = sigmoid(x W_gamma)^(1/tau), the per-head decay (paper: 16)."))
    rope_pairing: Literal["rotate_half", "interleaved"] = field(default="rotate_half", metadata=doc(
        "model.arch=yoco: head dimensions RoPE rotates together: rotate_half pairs (i, i + hd/2) "
        "(Hugging Face Llama's, ours); interleaved pairs (2i, 2i + 1) (the released YOCO code's). "
        "Equivalent up to a permutation of the q/k projection rows (model/yoco/rope.py "
        "convert_pairing); set interleaved to use released weights as they are."))
    rope_frequencies: Literal["standard", "released"] = field(default="standard", metadata=doc(
        "model.arch=yoco: RoPE frequency of pair i: standard theta^(-2i/hd) (ours, Llama's); "
        "released theta^(-i/(hd/2 - 1)), i.e. theta ** -linspace(0, 1, hd/2) (the released YOCO "
        "code's, needed to load its weights). Training from scratch works with either."))

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
        for key in ("sliding_window", "retention_chunk"):
            if getattr(self, key) < 1:
                raise bad(f"model.yoco.{key}", getattr(self, key), "a positive integer")
        if self.self_layers < 0:
            raise bad("model.yoco.self_layers", self.self_layers, "0 (half the layers) or a positive integer")
        if not self.gate_logit_normalizer > 0:
            raise bad("model.yoco.gate_logit_normalizer", self.gate_logit_normalizer, "a positive number")
        kv = self.self_kv_heads
        if kv < 0 or (kv and model.num_heads % kv):
            raise bad("model.yoco.self_kv_heads", kv, f"0 or a divisor of model.num_heads={model.num_heads}")
        if model.arch == "yoco":
            self._validate_yoco(model)
        else:
            for key, default in (("rope_pairing", "rotate_half"), ("rope_frequencies", "standard")):
                if getattr(self, key) != default:
                    raise bad(f"model.yoco.{key}", getattr(self, key), f"{default!r} unless model.arch=yoco "
                              f"(model.arch={model.arch!r} rotates with the shared table)")
        self._resolve(model)

    def _resolve(self, model) -> None:
        """Write the derived values in (0 -> the rule's value), so a saved config is explicit
        and keeps its meaning if a default rule ever changes (as model.ffn_hidden_size=0 does).
        Only where the values are used: other models' saved configs stay as they were."""
        if model.arch == "yoco":
            self.self_layers = self.num_self_layers(model)
        if model.arch == "yoco" or model.attention == "swa":
            self.self_kv_heads = self.kv_heads(model)

    def _validate_yoco(self, model) -> None:
        if model.num_layers < 2:
            raise bad("model.num_layers", model.num_layers, "at least 2 for model.arch=yoco "
                      "(a self-decoder and a cross-decoder)")
        if self.self_layers >= model.num_layers:
            raise bad("model.yoco.self_layers", self.self_layers,
                      f"less than model.num_layers={model.num_layers} (the cross-decoder needs a layer)")

    def num_self_layers(self, model) -> int:
        """Layers of the self-decoder (the first ones); the others are the cross-decoder."""
        return self.self_layers or model.num_layers // 2

    def kv_heads(self, model) -> int:
        """Key/value heads of the sliding-window layers."""
        return self.self_kv_heads or model.num_kv_heads
