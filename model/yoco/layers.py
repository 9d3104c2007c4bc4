"""YOCO's layer kinds.

* ``swa`` (attention slot): sliding-window attention with RoPE and grouped KV heads
  (``model.yoco.self_kv_heads``, default ``model.num_kv_heads``), O(T W) through
  :func:`model.yoco.kernels.sliding_window_attention`.
* ``retention`` (attention slot): gated retention, q/k/v/g projections, a per-head
  decay gate ``log gamma = logsigmoid(x W_gamma) / tau``, chunkwise in training and
  recurrent in generation, a non-affine RMSNorm over each head, a SiLU output gate.
* :class:`SharedKV`: the unit between the decoders. It normalizes the self-decoder's
  output (its own RMSNorm), projects it once to the global keys (RoPE applied) and
  values of ``model.num_kv_heads`` heads, and hands them on as the carry tensors
  ``yoco_k`` / ``yoco_v`` (B, Hkv, T, hd).
* :class:`CrossDecoderBlock`: a pre-norm block whose attention (:class:`CrossAttention`)
  has only query and output projections and attends causally (GQA) to the carry; its
  MLP is the ``model.mlp`` slot.
* :class:`ScaledEmbedding`: token embedding times sqrt(d).

Every query and key rotates through :func:`model.yoco.rope.rope` in the pairing of
``model.yoco.rope_pairing`` (frequencies: ``model.yoco.rope_frequencies``, in the table).

The two slot kinds work in any spec (e.g. ``model.attention=swa`` in the dense Llama).
With an inference cache each layer talks to it through its own method:
``window_update`` (sliding window; a :class:`~model.generate.DenseKVCache`'s ``update``
also works), ``recurrent_state`` / ``set_recurrent_state`` (retention) and
``shared_update`` plus ``early_exit`` (the shared key/value); see :mod:`model.yoco.cache`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.layers import (
    ATTENTIONS,
    MLPS,
    Block,
    Context,
    GroupedQueryAttention,
    RMSNorm,
    attend,
    make_linear,
    register,
)
from polytron.model.protocols import RecurrentCache
from polytron.model.yoco import context_parallel
from polytron.model.yoco.kernels import chunk_retention, recurrent_retention, segments, sliding_window_attention
from polytron.model.yoco.rope import rope

#: Carry names of the shared key and value (produced by :class:`SharedKV`).
CARRY = ("yoco_k", "yoco_v")


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by sqrt(hidden_size) (the paper's and released code's)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__(vocab_size, dim)
        self.scale = math.sqrt(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * self.scale                       # (B, T, d)


def _kv_rule(tp: int, heads: int, key: str) -> Optional[str]:
    """Key/value heads are split over tp, or replicated when tp exceeds their count."""
    if heads % tp and tp % heads:
        return (f"parallel.tensor={tp} and {key}={heads}: one must divide the other (KV heads are "
                f"split, or replicated when tensor exceeds their count)")
    return None


def _heads_rule(cfg, tp: int) -> Optional[str]:
    if cfg.num_heads % tp:
        return f"parallel.tensor={tp} must divide model.num_heads={cfg.num_heads}"
    return None


def _rotate(module: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, T, d') projection output -> (B, T, H, hd), RoPE in the module's pairing."""
    B, T, _ = x.shape
    return rope(x.view(B, T, -1, module.head_dim), cos, sin, module.pairing)


def _pairing(cfg) -> str:
    return cfg.yoco.rope_pairing if cfg.arch == "yoco" else "rotate_half"


# ---------------------------------------------------------------- sliding-window attention

@register(ATTENTIONS, "swa")
class SlidingWindowAttention(nn.Module):
    """Causal attention over the last ``model.yoco.sliding_window`` positions, RoPE, GQA."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim, self.num_heads = cfg.head_dim, cfg.num_heads
        self.num_kv_heads = cfg.yoco.kv_heads(cfg)
        self.window = cfg.yoco.sliding_window
        self.pairing = _pairing(cfg)
        hd, b, d = cfg.head_dim, cfg.attention_bias, cfg.hidden_size
        self.wq = make_linear(cfg, d, cfg.num_heads * hd, b, "q")
        self.wk = make_linear(cfg, d, self.num_kv_heads * hd, b, "k")
        self.wv = make_linear(cfg, d, self.num_kv_heads * hd, b, "v")
        self.wo = make_linear(cfg, cfg.num_heads * hd, d, b, "o")

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x.shape
        q = _rotate(self, self.wq(x), ctx.cos, ctx.sin).transpose(1, 2)        # (B, Hq, T, hd)
        k = _rotate(self, self.wk(x), ctx.cos, ctx.sin).transpose(1, 2)        # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if ctx.seq is not None:                             # context parallel: own chunks + halo
            y = context_parallel.window_attention(q, k, v, self.window, ctx)
        else:
            y = self._attend(q, k, v, ctx)                               # (B, Hq, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        seg = segments(ctx.mask)
        if ctx.cache is not None:                                        # keys: window so far + new
            update = getattr(ctx.cache, "window_update", None)
            k, v = update(self.layer_idx, k, v) if update else ctx.cache.update(self.layer_idx, k, v)
            seg = None
        return sliding_window_attention(q, k, v, self.window, seg)       # (B, Hq, T, hd)

    def tp_roles(self) -> dict:
        kv = ("kv", self.num_kv_heads, self.head_dim)
        return {"wq": "colwise", "wk": kv, "wv": kv, "wo": "rowwise"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        key = "model.yoco.self_kv_heads" if cfg.yoco.self_kv_heads else "model.num_kv_heads"
        return _heads_rule(cfg, tp) or _kv_rule(tp, cfg.yoco.kv_heads(cfg), key)

    def attention_flops(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (PaLM convention over the window)."""
        return 12.0 * self.num_heads * self.head_dim * min(seq_len, self.window)


# ---------------------------------------------------------------- gated retention

def head_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-affine RMSNorm over the last dimension (each head), in fp32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@register(ATTENTIONS, "retention")
class GatedRetention(nn.Module):
    """Gated retention (YOCO section 2.2): (swish(x W_G) * RMSNorm_head(Retention(x))) W_O."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim, self.num_heads = cfg.head_dim, cfg.num_heads
        self.chunk = cfg.yoco.retention_chunk
        self.tau = cfg.yoco.gate_logit_normalizer
        self.eps = cfg.norm_eps
        self.pairing = _pairing(cfg)
        inner, b, d = cfg.num_heads * cfg.head_dim, cfg.attention_bias, cfg.hidden_size
        self.wq = make_linear(cfg, d, inner, b, "q")
        self.wk = make_linear(cfg, d, inner, b, "k")
        self.wv = make_linear(cfg, d, inner, b, "v")
        self.wg = make_linear(cfg, d, inner, b, "gate")                   # output gate
        self.wgt = make_linear(cfg, d, cfg.num_heads, b, "proj")          # decay gate, one per head
        self.wo = make_linear(cfg, inner, d, b, "o")

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x.shape
        q = _rotate(self, self.wq(x), ctx.cos, ctx.sin)                   # (B, T, H, hd)
        k = _rotate(self, self.wk(x), ctx.cos, ctx.sin)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        log_decay = (F.logsigmoid(self.wgt(x).float()) / self.tau).transpose(1, 2)   # (B, H, T)
        q, v = q.transpose(1, 2), v.transpose(1, 2)                       # (B, H, T, hd)
        k = k.transpose(1, 2) * self.head_dim ** -0.5
        o = self._retain(q, k, v, log_decay, ctx)                        # (B, H, T, hd)
        o = head_rms_norm(o, self.eps).transpose(1, 2).reshape(B, T, -1)   # (B, T, H*hd)
        return self.wo(F.silu(self.wg(x)) * o)

    def _retain(self, q, k, v, log_decay, ctx: Context) -> torch.Tensor:
        if ctx.seq is not None:                             # context parallel: chunk states scanned
            return context_parallel.retention(q, k, v, log_decay, self.chunk, ctx)
        cache = ctx.cache
        if cache is None:
            return chunk_retention(q, k, v, log_decay, self.chunk, segments(ctx.mask))[0]
        if not isinstance(cache, RecurrentCache):
            from polytron.model.generate import GenerationError
            raise GenerationError(f"the retention layer {self.layer_idx} needs a cache with recurrent "
                                  f"states (model.yoco.cache.YOCOCache), not {type(cache).__name__}")
        state = cache.recurrent_state(self.layer_idx)                    # (B, H, hd, hd) fp32
        if q.shape[2] == 1:
            o, state = recurrent_retention(q, k, v, log_decay, state)
        else:
            o, state = chunk_retention(q, k, v, log_decay, self.chunk, None, state)
        cache.set_recurrent_state(self.layer_idx, state)
        return o

    def tp_roles(self) -> dict:
        return {"wq": "colwise", "wk": "colwise", "wv": "colwise", "wg": "colwise", "wgt": "colwise",
                "wo": "rowwise"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        return _heads_rule(cfg, tp)

    def attention_flops(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len``: scores and weighted sum within a chunk
        (PaLM convention) plus the state update and read, 3 x (4 C hd + 4 hd^2) per head."""
        chunk = min(seq_len, self.chunk)
        return 12.0 * self.num_heads * self.head_dim * (chunk + self.head_dim)


# ---------------------------------------------------------------- the shared key/value

class KVProjection(nn.Module):
    """The global key and value projections (B, T, d) -> (B, T, Hkv*hd) each."""

    def __init__(self, cfg):
        super().__init__()
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        out, b = cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias
        self.wk = make_linear(cfg, cfg.hidden_size, out, b, "k")
        self.wv = make_linear(cfg, cfg.hidden_size, out, b, "v")

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wk(h), self.wv(h)

    def tp_roles(self) -> dict:
        kv = ("kv", self.num_kv_heads, self.head_dim)
        return {"wk": kv, "wv": kv}


class SharedKV(nn.Module):
    """x -> (x, {yoco_k, yoco_v}): the one key/value every cross-decoder layer reads.

    Keys and values are (B, Hkv, T, hd), contiguous (they may cross a pipeline border);
    under tensor parallelism each rank holds the heads its cross-attention queries use.
    With an inference cache they are appended to its one global buffer and the whole
    prefix is handed on; with ``cache.early_exit`` only the last position continues
    into the cross-decoder (the paper's prefill early exit).
    """

    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.pairing = cfg.head_dim, _pairing(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.proj = KVProjection(cfg)

    def forward(self, x: torch.Tensor, ctx: Context):
        k, v = self.proj(self.norm(x))                                   # (B, T, Hkv*hd) each
        B, T = k.shape[:2]
        k = _rotate(self, k, ctx.cos, ctx.sin).transpose(1, 2).contiguous()
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2).contiguous()   # (B, Hkv, T, hd)
        cache = ctx.cache
        if cache is not None:
            k, v = cache.shared_update(k, v)                             # (B, Hkv, start + T, hd)
            if getattr(cache, "early_exit", False) and x.shape[1] > 1:
                return x[:, -1:], dict(zip(CARRY, (k, v)))               # only the last query goes on
        # a new tensor, not the input: FSDP2 hooks every unit's outputs and warns on views
        return x.clone(), dict(zip(CARRY, (k, v)))

    def tp_roles(self) -> dict:
        # the residual is a sequence shard under SP: norm on the shard, gather before projecting
        return {"norm": "sequence", "proj": "gather"}

    @classmethod
    def tp_requirements(cls, cfg, tp: int) -> Optional[str]:
        return _kv_rule(tp, cfg.num_kv_heads, "model.num_kv_heads")


# ---------------------------------------------------------------- the cross-decoder

class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The shared key/value may be a pipeline stage's input; the schedule receives its
    gradient into a buffer laid out like the gradient the next stage computed (on the
    meta device, where attention's GQA backward returns a strided view), and
    point-to-point receives need contiguous buffers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class CrossAttention(nn.Module):
    """Queries (RoPE) of this layer against the shared key/value: causal, grouped heads."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim, self.num_heads = cfg.head_dim, cfg.num_heads
        self.pairing = _pairing(cfg)
        hd, b = cfg.head_dim, cfg.attention_bias
        self.wq = make_linear(cfg, cfg.hidden_size, cfg.num_heads * hd, b, "q")
        self.wo = make_linear(cfg, cfg.num_heads * hd, cfg.hidden_size, b, "o")

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = (t.narrow(-3, t.shape[-3] - T, T) for t in (ctx.cos, ctx.sin))   # last T positions
        q = _rotate(self, self.wq(x), cos, sin).transpose(1, 2)        # (B, Hq, T, hd)
        k, v = (_ContiguousGrad.apply(ctx.carry[n]) for n in CARRY)      # (B, Hkv, S, hd), S >= T
        if ctx.seq is not None:             # context parallel: the K/V shards gathered once per forward
            k, v = context_parallel.shared_kv(k, v, ctx)                 # (B, Hkv, T_full, hd)
            y = context_parallel.cross_attention(q, k, v, ctx)
        else:
            y = attend(q, k, v, ctx)                                     # (B, Hq, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def tp_roles(self) -> dict:
        return {"wq": "colwise", "wo": "rowwise"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        return GroupedQueryAttention.tp_requirements(cfg, layer_idx, tp)

    def attention_flops(self, seq_len: int) -> float:
        """Attention-score and weighted-sum FLOPs per token, training (PaLM convention)."""
        return 12.0 * self.num_heads * self.head_dim * seq_len


class CrossDecoderBlock(Block):
    """Pre-norm block: x + cross_attention(norm(x)), then + mlp(norm(x)) (``model.mlp`` slot).

    Built like :class:`~model.layers.Block` (same parameter names and TP roles) with a
    :class:`CrossAttention` in the attention place, which is not a slot kind: it only
    works after a :class:`SharedKV` unit."""

    def __init__(self, cfg, layer_idx: int, mlp: str):
        nn.Module.__init__(self)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = CrossAttention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLPS[mlp](cfg, layer_idx)
