"""BitNet b1.58 quantizers, the straight-through estimator, and 2-bit packing.

The formulas are those of the paper's released training code ("The Era of 1-bit LLMs:
Training Tips, Code and FAQ") and of transformers' ``integrations/bitnet.py``:

* weights, per tensor, absmean: ``beta = mean(|W|)`` (clamped at 1e-5),
  ``T = clamp(round(W * (1 / beta)), -1, 1)``, dequantized ``T * beta``;
* activations, per token, absmax to 8 bits: ``s = 127 / max(|x|)`` over the last
  dimension (clamped at 1e-5), ``X = clamp(round(x * s), -128, 127)``, dequantized ``X / s``;
* the straight-through estimator: the forward returns the dequantized tensor, the
  backward passes the gradient to the latent tensor unchanged.

Every statistic is an ordinary tensor reduction, so when the weight is a tensor-parallel
DTensor shard, or the input is a DTensor sharded along its last dimension (row-parallel
projections), DTensor computes the mean and the max over the *whole* tensor / hidden
vector. Nothing here calls ``to_local``.

Packing (the layout transformers' BitNet integration reads): ternary values + 1 in
{0, 1, 2}, four per uint8 along the output dimension; with ``R = ceil(out / 4)``, byte
``(r, j)`` holds rows ``r, R + r, 2R + r, 3R + r`` of column ``j`` in bits 0-1, 2-3,
4-5, 6-7.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Smallest scale denominator (the released code's clamp).
EPS = 1e-5
#: 8-bit activations: round to integers in [ACT_MIN, ACT_MAX] after scaling by ACT_MAX / absmax.
ACT_MIN, ACT_MAX = -128, 127
#: Ternary values per packed byte.
PER_BYTE = 4


# ---------------------------------------------------------------- quantizers (no autograd)

def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """beta = mean |W| over the whole tensor (fp32 scalar, >= EPS).

    Summed in float64 and rounded once to fp32, so the value does not depend on how the
    sum is split (tensor-parallel shards all-reduce float64 partial sums)."""
    total = w.detach().abs().sum(dtype=torch.float64)
    return (total / w.numel()).clamp(min=EPS).float()


def ternary(w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(out, in) latent weights -> (out, in) fp32 values in {-1, 0, 1}."""
    return (w.detach().float() * (1.0 / beta)).round().clamp(-1, 1)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., 1) fp32 per-token scale 127 / max |x| (the max is over all of d)."""
    return ACT_MAX / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def activation_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., d) activations -> (..., d) fp32 integers in [-128, 127]."""
    return (x.detach().float() * scale).round().clamp(ACT_MIN, ACT_MAX)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Dequantized ternary weight T * beta (fp32)."""
    beta = weight_scale(w)
    return ternary(w, beta) * beta


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Dequantized 8-bit activation X / s (fp32)."""
    scale = activation_scale(x)
    return activation_int8(x, scale) / scale


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension, in ``x``'s dtype.

    The mean square is accumulated in float64 and rounded once, so it does not depend on
    how the last dimension is split (a row-parallel input is a DTensor shard of it)."""
    x32 = x.float()
    ms = x32.pow(2).sum(-1, keepdim=True, dtype=torch.float64) / x.shape[-1]    # (..., 1)
    return (x32 * torch.rsqrt(ms + eps).float()).to(x.dtype)


# ---------------------------------------------------------------- straight-through estimators

class _Integers(torch.autograd.Function):
    """Forward: the integer grid of ``x`` for ``scale`` (``kind`` "activation": X = Q8(x) with
    s; "weight": T with beta). Backward: the straight-through estimator of the dequantized
    value, whose scale the caller applies after the matmul: dL/dx = dL/dX * s, or
    dL/dW = dL/dT / beta. (Written with ``setup_context`` so torch.func can vmap it, e.g.
    over MoE experts.)"""
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
        q = activation_int8(x, scale) if kind == "activation" else ternary(x, scale)
        return q.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, scale, kind = inputs
        ctx.save_for_backward(scale)
        ctx.activation = kind == "activation"

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        factor = scale if ctx.activation else 1.0 / scale
        return (grad * factor.to(grad.dtype)), None, None


class _WeightSTE(torch.autograd.Function):
    """Forward: T * beta in ``w``'s dtype; backward: the gradient reaches ``w`` unchanged."""
    generate_vmap_rule = True

    @staticmethod
    def forward(w: torch.Tensor) -> torch.Tensor:
        return quantize_weight(w).to(w.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ExactSum(torch.autograd.Function):
    """Identity on a matmul of integer grids (its values are integers): rounding is a no-op,
    but it is not linear, so a tensor-parallel partial sum is reduced (exactly, being
    integers) before the caller scales it; backward is the identity."""
    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor) -> torch.Tensor:
        return y.round()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def bitlinear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """y = (X @ T^T) * (beta / s) (+ bias): ``F.linear(Q8(x), Q1.58(w))`` computed on the integer
    grids, with straight-through gradients to ``x`` and to the latent ``w``.

    The integer matmul is exact in fp32 (|sums| < 2^24 for in_features < 132k), so a
    row-parallel split of it sums to the same value; the scales are then applied once.
    Gradients: dL/dx = (dL/dy) (T * beta), dL/dW = (dL/dy)^T (X / s), as for the released
    code's ``x + (quant(x) - x).detach()``.
    """
    s = activation_scale(x)                                          # (..., 1) fp32
    beta = weight_scale(w)                                           # () fp32
    xi = _Integers.apply(x, s, "activation")                        # (..., in) integers
    ti = _Integers.apply(w, beta, "weight")                          # (out, in) in {-1, 0, 1}
    y = _ExactSum.apply(F.linear(xi, ti))                            # (..., out) integers
    y = y * (beta / s).to(y.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def bitlinear_packed(x: torch.Tensor, t: torch.Tensor, beta: torch.Tensor, bias=None) -> torch.Tensor:
    """The forward of :func:`bitlinear` for a known ternary ``t`` (out, in) and scale ``beta``."""
    s = activation_scale(x)                                          # (..., 1)
    y = F.linear(activation_int8(x, s).to(x.dtype), t.to(x.dtype)).round()   # (..., out)
    y = y * (beta / s).to(y.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def weight_ste(w: torch.Tensor) -> torch.Tensor:
    """Ternary-quantized ``w`` (T * beta, in ``w``'s dtype) with a straight-through gradient."""
    return _WeightSTE.apply(w)


# ---------------------------------------------------------------- packing

def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """(out, in) values in {-1, 0, 1} -> (ceil(out / 4), in) uint8 (see the module docstring)."""
    out = t.shape[0]
    rows = -(-out // PER_BYTE)
    u = (t.to(torch.int16) + 1).to(torch.uint8)                         # (out, in) in {0, 1, 2}
    if rows * PER_BYTE != out:                                          # padding rows unpack to -1
        u = torch.cat([u, u.new_zeros(rows * PER_BYTE - out, *u.shape[1:])])
    u = u.view(PER_BYTE, rows, *u.shape[1:])                            # (4, R, in)
    packed = u[0].clone()
    for i in range(1, PER_BYTE):
        packed |= u[i] << (2 * i)
    return packed                                                       # (R, in)


def unpack_ternary(packed: torch.Tensor, out_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(ceil(out / 4), in) uint8 -> (out, in) values in {-1, 0, 1} of ``dtype``."""
    parts = [(packed >> (2 * i)) & 3 for i in range(PER_BYTE)]          # 4 x (R, in)
    u = torch.cat(parts)[:out_features]                                 # (out, in) in {0, 1, 2}
    return u.to(dtype) - 1
