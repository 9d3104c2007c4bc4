"""BitNet b1.58 pieces of the assembled remote-code modeling file.

Copied into an export's modeling file (:mod:`model.hf_remote`) for compositions that no
transformers class computes (e.g. YOCO or DHA with BitLinear projections; the 2B4T
slots alone export natively to ``BitNetForCausalLM``):

* ``bitlinear``: y = Q8(x) @ Q1.58(W)^T (+ b) as :func:`model.bitnet.quant.bitlinear`
  computes it: per-token absmax 8-bit activations, per-tensor absmean ternary weights
  (mean summed in float64), the integer matmul, then ``* beta / s``; projections of roles
  not in ``quantized_roles`` stay ``nn.Linear``; ``bitlinear_norm_eps`` set: the paper's
  RMS normalization inside each BitLinear. Forward only (no straight-through gradients).
  ``quantized_roles`` listing ``embedding``: the input embedding is looked up in its ternary
  form T * beta (``BitEmbedding``).
* ``subnorm``: ``gqa_subnorm`` attention and the ``relu2_subnorm`` MLP (2B4T's sub-norms).

The imports above the pieces are for reading this file as a module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.hf_remote.pieces import (
    ATTENTIONS,
    EMBEDDINGS,
    LINEAR_FNS,
    LINEARS,
    MLPS,
    Attention,
    RMSNorm,
    make_linear,
    rms_normalize,
)


# piece: bitlinear
def bitlinear(config, x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """(..., in) -> (..., out): 8-bit activations times ternary weights, rescaled."""
    eps = getattr(config, "bitlinear_norm_eps", None)
    if eps is not None:
        x = rms_normalize(x, eps)
    s = 127.0 / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)   # (..., 1)
    beta = (w.detach().abs().sum(dtype=torch.float64) / w.numel()).clamp(min=1e-5).float()
    xi = (x.float() * s).round().clamp(-128, 127).to(x.dtype)                  # (..., in) integers
    ti = (w.float() * (1.0 / beta)).round().clamp(-1, 1).to(w.dtype)           # (out, in) ternary
    y = F.linear(xi, ti).round() * (beta / s).to(x.dtype)                      # (..., out)
    return y if bias is None else y + bias.to(y.dtype)


class BitLinear(nn.Linear):
    """An ``nn.Linear`` (latent weights) whose forward is :func:`bitlinear`."""

    def __init__(self, config, in_features: int, out_features: int, bias: bool, role: str):
        super().__init__(in_features, out_features, bias=bias)
        self.bit_config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear(self.bit_config, x, self.weight, self.bias)


class BitEmbedding(nn.Embedding):
    """An embedding looked up in its ternary form T * beta (``quantized_roles`` has ``embedding``)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        beta = (w.detach().abs().sum(dtype=torch.float64) / w.numel()).clamp(min=1e-5).float()
        table = ((w.float() * (1.0 / beta)).round().clamp(-1, 1) * beta).to(w.dtype)     # (V, d)
        return F.embedding(input_ids, table)                                           # (B, T, d)


LINEARS["bitlinear"] = BitLinear
LINEAR_FNS["bitlinear"] = bitlinear
EMBEDDINGS["bitlinear"] = lambda config: BitEmbedding(config.vocab_size, config.hidden_size)


# piece: subnorm
class SubNorm(RMSNorm):
    """RMSNorm whose mean square is summed in float64 (the norm before a BitLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


class SubNormAttention(Attention):
    """GQA whose output is RMS-normalized (``attn_sub_norm``) before ``o_proj``."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_sub_norm = SubNorm(config.num_attention_heads * config.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        return self.o_proj(self.attn_sub_norm(self.mix(*self.project(x, cos, sin, cache), mask)))


class SubNormReLU2(nn.Module):
    """down(ffn_sub_norm(relu(gate x)^2 * up x))."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = make_linear(config, d, f, b, "gate")
        self.up_proj = make_linear(config, d, f, b, "up")
        self.ffn_sub_norm = SubNorm(f, config.rms_norm_eps)
        self.down_proj = make_linear(config, f, d, b, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x)))


ATTENTIONS["gqa_subnorm"] = SubNormAttention
MLPS["relu2_subnorm"] = SubNormReLU2
