"""BitNet b1.58 layer kinds, registered in the slot registries of :mod:`model.layers`.

* ``LINEARS["bitlinear"]``: :class:`BitLinear` for the projection roles listed in
  ``model.bitnet.quantize`` (default: every role but ``head`` and ``router``), a plain
  ``nn.Linear`` for the others. Any layer that builds its projections with
  ``make_linear`` (attention, SwiGLU, an MoE expert, a YOCO decoder) gets ternary
  projections by ``model.linear: bitlinear``.
* ``ATTENTIONS["gqa_subnorm"]``: GQA with an RMSNorm over the attention output before
  the output projection (``attn_sub_norm`` of the 2B4T model).
* ``MLPS["relu2_subnorm"]``: ``down(subnorm(relu(gate x)^2 * up x))`` (``ffn_sub_norm``
  and ReLU^2 of the 2B4T model).
* :class:`NoPreNormBlock`: the training-tips FAQ's b1.58 block, ``x + attn(x)`` then
  ``+ mlp(x)``: no RMSNorm before the attention and the MLP, BitLinear's inner norm does
  it (``model.bitnet.block_prenorm: false``).

Both sub-norms normalize a tensor-parallel *sharded* hidden vector (heads, or the MLP's
inner columns); they declare the ``sharded_norm`` role so the statistic is taken over
the whole vector under TP.
"""
from __future__ import annotations

from typing import Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.bitnet import (
    quant,
    tp_styles,  # noqa: F401  (registers the "sharded_norm" role)
)
from polytron.model.layers import (
    ATTENTIONS,
    LINEARS,
    MLPS,
    Block,
    Context,
    GroupedQueryAttention,
    RMSNorm,
    attend,
    make_linear,
    project_qkv,
    projection_saved,
    register,
)


class BitLinear(nn.Linear):
    """y = Q8(x) @ Q1.58(W)^T (+ b), latent full-precision W trained through the STE.

    A subclass of ``nn.Linear`` (same ``weight`` / ``bias``), so tensor-parallel styles and
    checkpoints treat it as a linear layer. With ``norm_eps`` set (the paper's variant) the
    input is first RMS-normalized without a learned gain, as in the released training
    code. Under tensor parallelism the weight and a row-parallel input arrive as DTensors:
    the absmean, absmax and RMS statistics are then global (see ``model/bitnet/quant.py``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, norm_eps: Optional[float] = None):
        super().__init__(in_features, out_features, bias=bias)
        self.norm_eps = norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_eps is not None:
            x = quant.rms_normalize(x, self.norm_eps)            # (..., in)
        return quant.bitlinear(x, self.weight, self.bias)        # (..., out)

    def own_saved(self, n: float) -> tuple[float, bool]:
        """(Elements per token saved for backward beyond the input it shares with the projections
        reading the same tensor, whether it keeps that input too), for ``n`` input elements per
        token on this rank (docs/scaling.md): the 8-bit integer input ``n``, the fp32 scale ``s``
        and ``beta / s``; with the inner norm also its float64 mean square (2) and fp32 reciprocal
        RMS (1), and it keeps ``x.float()`` (the input itself in fp32; an fp32 copy under bf16)."""
        norm = self.norm_eps is not None
        return n + 2 + (3 if norm else 0), norm

    def own_saved_fp32(self, n: float) -> float:
        """Of :meth:`own_saved`, kept in fp32 under a 16-bit dtype (model/protocols.py units): the
        scale ``s`` (1); with the inner norm the float64 mean square (2) and reciprocal RMS (1).
        (Its fp32 copy of the input: :func:`~model.layers.projection_saved`.)"""
        return 1 + (3 if self.norm_eps is not None else 0)

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Alone (a quantized head): its own terms on its whole input."""
        return projection_saved([self], self.in_features)

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        return projection_saved([self], self.in_features, fp32=True)

    def saved_fixed_elements(self, tp: int) -> float:
        """Saved once per forward whatever the tokens: the ternary weight T (this rank's shard,
        at the compute width) and the fp32 scalar beta."""
        return self.weight.numel() / tp + 1

    def extra_repr(self) -> str:
        norm = f", input_norm_eps={self.norm_eps}" if self.norm_eps is not None else ""
        return super().extra_repr() + norm


def bitlinear(cfg, in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
    """The ``bitlinear`` linear-slot factory: BitLinear for quantized roles, else nn.Linear."""
    if role not in cfg.bitnet.quantize:
        return nn.Linear(in_features, out_features, bias=bias)
    eps = cfg.norm_eps if cfg.bitnet.linear_norm else None
    return BitLinear(in_features, out_features, bias, eps)


LINEARS["bitlinear"] = bitlinear


class SubNorm(RMSNorm):
    """RMSNorm with a learned gain whose mean square is accumulated in float64 and rounded
    once (:func:`~model.bitnet.quant.rms_normalize`): it normalizes a hidden vector that
    tensor parallelism shards (role ``sharded_norm``), and the BitLinear after it quantizes
    its output, so the value must not depend on how the sum is split."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * quant.rms_normalize(x, self.eps)         # (..., n)

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Per token: its input and the normalized input (``n / tp`` each, the vector is a tensor-
        parallel shard), the float64 mean square (2) and the fp32 reciprocal RMS (1)."""
        return 2 * self.weight.shape[0] / tp + 3

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        """Under a 16-bit dtype: the input it saves is the fp32 copy ``x.float()`` (``n / tp``), the
        float64 mean square (2), the fp32 reciprocal RMS (1)."""
        return self.weight.shape[0] / tp + 3


@register(ATTENTIONS, "gqa_subnorm")
class SubNormAttention(GroupedQueryAttention):
    """GQA whose (B, T, Hq*hd) output is RMS-normalized (learned gain) before ``wo``."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.sub_norm = SubNorm(cfg.num_heads * cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, ctx)                  # (B, H, T, hd)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)    # (B, Hkv, S, hd)
        y = attend(q, k, v, ctx).transpose(1, 2)             # (B, T, Hq, hd)
        return self.wo(self.sub_norm(y.reshape(B, T, -1)))   # (B, T, d)

    def tp_roles(self) -> dict:
        return {**super().tp_roles(), "sub_norm": "sharded_norm"}

    def output_saved(self, tp: int, sp: bool, fp32: bool = False) -> float:
        """The sub-norm's terms less its input (the attention output, already counted), then
        what ``wo`` saves of the normalized output. With ``fp32``: the sub-norm's fp32 copy of
        the attention output is its own storage under a 16-bit dtype (``2 q``)."""
        q = self.num_heads * self.head_dim / tp
        if fp32:
            return self.sub_norm.saved_fp32_elements(tp, sp) + q + projection_saved([self.wo], q, fp32=True)
        return self.sub_norm.saved_elements(tp, sp) - q + projection_saved([self.wo], q)


@register(MLPS, "relu2_subnorm")
class SubNormReLU2(nn.Module):
    """w2(subnorm(relu(w1 x)^2 * w3 x)): the 2B4T feed-forward (``hidden_act=relu2``)."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        b = cfg.mlp_bias
        self.w1 = make_linear(cfg, cfg.hidden_size, cfg.ffn_hidden_size, b, "gate")
        self.w3 = make_linear(cfg, cfg.hidden_size, cfg.ffn_hidden_size, b, "up")
        self.sub_norm = SubNorm(cfg.ffn_hidden_size, cfg.norm_eps)
        self.w2 = make_linear(cfg, cfg.ffn_hidden_size, cfg.hidden_size, b, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.w1(x)).square() * self.w3(x)          # (B, T, ffn)
        return self.w2(self.sub_norm(h))                       # (B, T, d)

    def tp_roles(self) -> dict:
        return {"w1": "colwise", "w3": "colwise", "sub_norm": "sharded_norm", "w2": "rowwise"}

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Per token: what ``w1`` and ``w3`` save of the gathered input, relu(w1 x), its square and
        w3 x (``3 f / tp``), the sub-norm's terms, what ``w2`` saves of the normalized product."""
        w1 = cast(nn.Linear, self.w1)
        f = w1.out_features / tp
        return (projection_saved([self.w1, self.w3], w1.in_features) + 3 * f
                + self.sub_norm.saved_elements(tp, sp) + projection_saved([self.w2], f))

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        """The projections' and the sub-norm's fp32 terms (its fp32 copy replaces the product)."""
        w1 = cast(nn.Linear, self.w1)
        f = w1.out_features / tp
        return (projection_saved([self.w1, self.w3], w1.in_features, fp32=True)
                + self.sub_norm.saved_fp32_elements(tp, sp) + projection_saved([self.w2], f, fp32=True))

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        if cfg.ffn_hidden_size % tp:
            return f"parallel.tensor={tp} must divide model.ffn_hidden_size={cfg.ffn_hidden_size}"
        return None


class NoPreNormBlock(Block):
    """x + attn(x), then + mlp(x): the FAQ's BitNet b1.58 block (``bitnet.block_prenorm: false``).

    The FAQ turns a LLaMA block into b1.58 by replacing its projections with BitLinear and
    removing the RMSNorm before attention and SwiGLU, since every BitLinear RMS-normalizes
    its input (``bitnet.linear_norm: true``). Same attention / MLP modules and names as
    :class:`~model.layers.Block`, without ``attention_norm`` / ``mlp_norm``."""

    def __init__(self, cfg, layer_idx: int, attention: str, mlp: str):
        nn.Module.__init__(self)
        self.attention = ATTENTIONS[attention](cfg, layer_idx)
        self.mlp = MLPS[mlp](cfg, layer_idx)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = x + self.attention(x, ctx)                        # (B, T, d)
        return x + self.mlp(x)

    def tp_roles(self) -> dict:
        # the residual (a sequence shard under SP) goes straight to the gathering attention / MLP
        return {k: v for k, v in super().tp_roles().items() if k not in ("attention_norm", "mlp_norm")}
