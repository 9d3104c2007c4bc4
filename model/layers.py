"""Building blocks shared by every architecture, and the slot registries.

A transformer block is assembled from three slots:

* ``LINEARS[cfg.linear]``: ``factory(in_features, out_features, bias) -> nn.Module``
  used for every projection inside attention and MLP (BitLinear / FP8 fill it later).
* ``ATTENTIONS[cfg.attention]``: ``cls(cfg, layer_idx, linear)``; forward
  ``(x, rope, mask) -> y``.
* ``MLPS[cfg.mlp]``: ``cls(cfg, layer_idx, linear)``; forward ``x -> y``.

Projections reshape with ``-1`` head counts so tensor parallelism (which shards
the projection weights) needs no change here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.attention_kernels import causal_attention
from model.config import ModelConfig

LinearFactory = Callable[[int, int, bool], nn.Module]

LINEARS: dict[str, LinearFactory] = {
    "linear": lambda i, o, bias: nn.Linear(i, o, bias=bias),
}
ATTENTIONS: dict[str, type] = {}
MLPS: dict[str, type] = {}


def register(registry: dict, name: str):
    """Class decorator adding an implementation to a slot registry."""
    def wrap(cls):
        registry[name] = cls
        return cls
    return wrap


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# ---------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,), with Llama-3 / linear scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = cfg.rope_scaling
    if sc.type == "linear":
        inv = inv / sc.factor
    elif sc.type == "llama3":
        low_wl = sc.original_max_position_embeddings / sc.low_freq_factor
        high_wl = sc.original_max_position_embeddings / sc.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
            sc.high_freq_factor - sc.low_freq_factor)
        scaled = torch.where(wavelen > low_wl, inv / sc.factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(mid, (1 - smooth) * inv / sc.factor + smooth * inv, scaled)
    return inv.float()


def rope_table(cfg: ModelConfig, device=None) -> torch.Tensor:
    """cos/sin table (max_seq_len, 2, hd) for the rotate-half RoPE convention."""
    inv = rope_inv_freq(cfg).to(device)                      # (hd/2,)
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)                              # (S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                  # (S, hd)
    return torch.stack([emb.cos(), emb.sin()], dim=1)        # (S, 2, hd)


def select_rope(table: torch.Tensor, seq_len: int,
                position_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin broadcastable to (B, T, H, hd) for the given positions."""
    if position_ids is None:
        cs = table[:seq_len]                                 # (T, 2, hd)
        return cs[:, 0, None, :], cs[:, 1, None, :]          # (T, 1, hd)
    cs = table[position_ids]                                 # (B, T, 2, hd)
    return cs[:, :, 0, None, :], cs[:, :, 1, None, :]        # (B, T, 1, hd)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by position; rotate-half layout (Hugging Face Llama's)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------- attention

@dataclass
class AttnInputs:
    """Per-batch tensors every attention layer reads."""
    cos: torch.Tensor                 # (T, 1, hd) or (B, T, 1, hd)
    sin: torch.Tensor
    mask: Optional[torch.Tensor]      # None (causal) or bool (B, 1, T, T), True = attend


@register(ATTENTIONS, "gqa")
class GroupedQueryAttention(nn.Module):
    """Multi-head attention with grouped key/value heads, RoPE, and SDPA."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, linear: LinearFactory):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.num_heads // cfg.num_kv_heads
        hd, b = cfg.head_dim, cfg.attention_bias
        self.wq = linear(cfg.hidden_size, cfg.num_heads * hd, b)
        self.wk = linear(cfg.hidden_size, cfg.num_kv_heads * hd, b)
        self.wv = linear(cfg.hidden_size, cfg.num_kv_heads * hd, b)
        self.wo = linear(cfg.num_heads * hd, cfg.hidden_size, b)

    def forward(self, x: torch.Tensor, inp: AttnInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)         # (B, T, Hq, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)         # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, inp.cos, inp.sin), apply_rope(k, inp.cos, inp.sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))     # (B, H, T, hd)
        n_rep = q.shape[1] // k.shape[1]
        if inp.mask is None:
            y = causal_attention(q, k, v)                    # (B, Hq, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=inp.mask, enable_gqa=n_rep > 1)
        y = y.transpose(1, 2).reshape(B, T, -1)              # (B, T, Hq*hd)
        return self.wo(y)


# ---------------------------------------------------------------- MLPs

@register(MLPS, "swiglu")
class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, linear: LinearFactory):
        super().__init__()
        b = cfg.mlp_bias
        self.w1 = linear(cfg.hidden_size, cfg.ffn_hidden_size, b)   # gate
        self.w3 = linear(cfg.hidden_size, cfg.ffn_hidden_size, b)   # up
        self.w2 = linear(cfg.ffn_hidden_size, cfg.hidden_size, b)   # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


#: Submodule names whose weights write into the residual stream; they get the
#: depth-scaled init std / sqrt(2 * num_layers) (GPT-2 / Megatron).
OUTPUT_PROJECTIONS = ("wo", "w2")
