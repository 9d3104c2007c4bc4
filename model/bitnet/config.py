"""``model.bitnet``: settings of BitNet b1.58 (ternary-weight BitLinear projections)."""
from __future__ import annotations

from dataclasses import dataclass, field

from polytron.model.configlib import bad, doc

#: Projection roles quantized by default: every one but the output head and MoE routers.
DEFAULT_QUANTIZED = ["q", "k", "v", "o", "gate", "up", "down", "proj"]
#: Roles whose projections read a block's input: without pre-norms their BitLinear norm is the only one
#: (``proj`` too where the slot kinds use it on the input: :func:`input_roles`).
INPUT_ROLES = ("q", "k", "v", "gate", "up")


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
    block_prenorm: bool = field(default=True, metadata=doc(
        "Keep the Llama block's RMSNorm before the attention and before the MLP (model.arch=bitnet). "
        "false: the training-tips FAQ's b1.58 block, x + attn(x) then + mlp(x), whose BitLinear inner "
        "norm (linear_norm: true) is the only normalization of the block input; saves 2 x "
        "hidden_size gains per layer. Needs the projections reading the block input (q k v gate up) "
        "quantized (and proj for mlp mh_moe / attention retention). mlp moe (and mh_moe with one head) "
        "is refused: its router reads the block input unnormalized. true: the 2B4T model's block and "
        "our default for the paper's variant."))

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
        if not self.block_prenorm:
            self._validate_no_prenorm(model)

    def _validate_no_prenorm(self, model) -> None:
        """The FAQ block: BitLinear's inner norm must normalize every projection of the block input."""
        if model.arch != "bitnet":
            raise bad("model.bitnet.block_prenorm", False, f"true unless model.arch=bitnet (model.arch="
                      f"{model.arch!r} builds its own blocks)")
        if model.linear != "bitlinear" or not self.linear_norm:
            raise bad("model.bitnet.block_prenorm", False, "true unless model.linear=bitlinear with "
                      "model.bitnet.linear_norm=true (BitLinear's inner RMSNorm replaces the pre-norms)")
        heads = getattr(getattr(model, "moe", None), "heads", 1)
        if model.mlp == "moe" or (model.mlp == "mh_moe" and heads == 1):
            raise bad("model.bitnet.block_prenorm", False, f"true while model.mlp={model.mlp} routes the "
                      "block input itself (its fp32 router would read the un-normalized residual; the FAQ "
                      "block has no MoE form): use model.mlp=mh_moe with model.moe.heads > 1, whose router "
                      "reads the BitLinear split projection")
        missing = [r for r in input_roles(model) if r not in self.quantize]
        if missing:
            raise bad("model.bitnet.block_prenorm", False, f"true while model.bitnet.quantize lacks "
                      f"{', '.join(missing)} (those projections would read the un-normalized residual)")


def input_roles(model) -> tuple[str, ...]:
    """Roles of the projections that read a block's input under ``model``'s slot kinds: q k v
    gate up, plus ``proj`` for retention's decay gate and MH-MoE's split projection."""
    heads = getattr(getattr(model, "moe", None), "heads", 1)
    extra = model.attention == "retention" or (model.mlp == "mh_moe" and heads > 1)
    return INPUT_ROLES + (("proj",) if extra else ())
