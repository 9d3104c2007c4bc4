"""``model.bitnet``: settings of BitNet b1.58 (ternary-weight BitLinear projections)."""
from __future__ import annotations

from dataclasses import dataclass, field

from polytron.model.configlib import bad, doc

#: Projection roles quantized by default: every one but the output head and MoE routers.
DEFAULT_QUANTIZED = ["q", "k", "v", "o", "gate", "up", "down", "proj"]


@dataclass
class BitNetConfig:
    """BitNet b1.58 settings (used when ``model.linear=bitlinear`` or ``model.arch=bitnet``)."""
    quantize: list[str] = field(default_factory=lambda: list(DEFAULT_QUANTIZED), metadata=doc(
        "Projection roles (model/layers.py ROLES: q k v o gate up down router head proj) that "
        "model.linear=bitlinear makes ternary BitLinear layers; the others stay full-precision "
        "nn.Linear. Default: all but head and router, as in the paper. 'embedding' also "
        "quantizes the input embedding table (model.arch=bitnet only; not in the paper)."))
    linear_norm: bool = field(default=False, metadata=doc(
        "RMS-normalize (no learned gain, eps model.norm_eps) the input inside every BitLinear "
        "before its 8-bit quantization: the paper's BitLinear (its released training code). "
        "false: the 2B4T model, whose sub-norms are separate layers (attention gqa_subnorm, "
        "mlp relu2_subnorm)."))

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
        from polytron.model.layers import ROLES
        for i, role in enumerate(self.quantize):
            if role not in ROLES + ("embedding",):
                raise bad(f"model.bitnet.quantize[{i}]", role,
                          "one of " + ", ".join(repr(r) for r in ROLES + ("embedding",)))
        if "embedding" in self.quantize and model.arch != "bitnet" and model.linear == "bitlinear":
            raise bad("model.bitnet.quantize", self.quantize,
                      f"'embedding' only with model.arch=bitnet (model.arch={model.arch!r} builds a "
                      "plain embedding)")
