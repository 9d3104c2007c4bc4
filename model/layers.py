"""Building blocks shared by every architecture, and the slot registries.

A transformer block is assembled from three slots:

* ``LINEARS[cfg.linear]``: ``factory(cfg, in_features, out_features, bias, role) -> nn.Module``,
  used for every projection. ``role`` says what the projection is (:data:`ROLES`), so a
  linear kind (BitLinear, FP8) can choose which projections it replaces. Use
  :func:`make_linear`, which also records the role on the module.
* ``ATTENTIONS[kind]``: ``cls(cfg, layer_idx)``; forward ``(x, ctx) -> y``.
* ``MLPS[kind]``: ``cls(cfg, layer_idx)``; forward ``x -> y``.

Layers declare what the rest of the system needs about them, instead of the rest
guessing from names, through the hook protocols of :mod:`polytron.model.protocols`
(read with ``isinstance``):

* ``tp_roles()`` -> ``{child name: role}``: how :mod:`parallel.tensor_parallel` shards
  each child (``colwise``, ``rowwise``, ``("kv", num_kv_heads, head_dim)``,
  ``sequence``, ``gather``, or a role an architecture registers with
  ``parallel.roles.register_tp_style``); the plan is written beside the layer it shards.
* ``tp_requirements(cfg, layer_idx, tp)`` (classmethod) -> an error line or None,
  checked before any process group exists.
* initialization: a projection whose role is in :data:`OUTPUT_ROLES` gets the
  depth-scaled std; a module's ``init_rule(param_name)`` can override (norms: ones).

Projections reshape with ``-1`` head counts so tensor parallelism (which shards the
projection weights) needs no change here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.attention_kernels import causal_attention
from polytron.model.protocols import SequenceShard, TPRequirements, TPRole

#: Projection roles a linear factory receives.
ROLES = ("q", "k", "v", "o", "gate", "up", "down", "router", "head", "proj")
#: Roles whose output writes into the residual stream: init std / sqrt(2 * num_layers).
OUTPUT_ROLES = ("o", "down")

LinearFactory = Callable[[Any, int, int, bool, str], nn.Module]

LINEARS: dict[str, LinearFactory] = {
    "linear": lambda cfg, i, o, bias, role: nn.Linear(i, o, bias=bias),
}
ATTENTIONS: dict[str, type] = {}
MLPS: dict[str, type] = {}


def register(registry: dict, name: str):
    """Class decorator adding an implementation to a slot registry."""
    def wrap(cls):
        registry[name] = cls
        return cls
    return wrap


def make_linear(cfg, in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
    """A projection from the configured linear slot, tagged with its ``role``."""
    if role not in ROLES:
        raise ValueError(f"unknown projection role {role!r}")
    module = LINEARS[cfg.linear](cfg, in_features, out_features, bias, role)
    module.role = role  # type: ignore[assignment]  # nn.Module.__setattr__ takes any value
    return module


def projection_saved(projections: list[nn.Module], n: float, input_saved: bool = False,
                     fp32: bool = False) -> float:
    """Elements per token that ``projections``, all reading one input of ``n`` elements per token
    on this rank, save for backward (docs/scaling.md). A plain linear saves the input itself, one
    storage shared by all of them (not counted when ``input_saved``: another op keeps it); a
    projection declaring ``own_saved(n) -> (elements, keeps the input)`` (BitLinear: its quantized
    input and scales) adds its own terms, and may hold the shared input too.

    With ``fp32`` the same projections' ``saved_fp32_elements`` (model/protocols.py): each one's
    ``own_saved_fp32(n)``, and a projection keeping the input holds its own fp32 copy under a
    16-bit dtype (``2 n``), one of which replaces the counted shared input if no plain linear
    reads it."""
    own, shared, keepers, plain = 0.0, False, 0, False
    for p in projections:
        declared = getattr(type(p), "own_saved", None)
        if declared is None:
            shared = plain = True
        else:
            elements, keeps_input = declared(p, n)
            if fp32:
                elements = p.own_saved_fp32(n)    # type: ignore[operator]  # declared beside own_saved
            own, shared = own + elements, shared or keeps_input
            keepers += keeps_input
    if fp32:
        return own + 2 * n * keepers - (n if keepers and not plain and not input_saved else 0.0)
    return own + (n if shared and not input_saved else 0.0)


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

    def init_rule(self, name: str) -> str:
        return "ones"

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Saved for backward per token: the input and the normalized input (``d`` each) and the
        fp32 reciprocal RMS (1); the residual stream is sequence-sharded under SP."""
        return (2 * self.weight.shape[0] + 1) / (tp if sp else 1)

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        """Under a 16-bit dtype the input it saves is the fp32 copy ``x.float()`` and the
        reciprocal RMS is fp32: ``d + 1`` widened (the normalized input is 16-bit)."""
        return (self.weight.shape[0] + 1) / (tp if sp else 1)


# ---------------------------------------------------------------- RoPE

#: arch -> fn(cfg) -> unscaled inverse frequencies (hd/2,) float64, where an architecture's RoPE
#: frequencies are not theta^(-2i/hd) (model.yoco: the released code's theta^(-linspace(0, 1, hd/2))).
ROPE_FREQUENCIES: dict[str, Callable[[Any], torch.Tensor]] = {}


def rope_inv_freq(cfg) -> torch.Tensor:
    """Inverse frequencies (hd/2,), with Llama-3 / linear scaling applied."""
    hd = cfg.head_dim
    base = ROPE_FREQUENCIES.get(cfg.arch)
    inv = base(cfg) if base else 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
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


def rope_table(cfg, device=None) -> torch.Tensor:
    """cos/sin table (max_seq_len, 2, hd) for the rotate-half RoPE convention."""
    inv = rope_inv_freq(cfg).to(device)                      # (hd/2,)
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)                              # (S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                  # (S, hd)
    return torch.stack([emb.cos(), emb.sin()], dim=1)        # (S, 2, hd)


def select_rope(table: torch.Tensor, seq_len: int, position_ids: Optional[torch.Tensor],
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin broadcastable to (B, T, H, hd) for the given positions (or start..start+T)."""
    if position_ids is None:
        cs = table[start:start + seq_len]                    # (T, 2, hd)
        return cs[:, 0, None, :], cs[:, 1, None, :]          # (T, 1, hd)
    cs = table[position_ids]                                 # (B, T, 2, hd)
    return cs[:, :, 0, None, :], cs[:, :, 1, None, :]        # (B, T, 1, hd)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by position; rotate-half layout (Hugging Face Llama's)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------- per-forward context

@dataclass
class Context:
    """What every layer of one forward pass may read besides the hidden state."""
    cos: torch.Tensor                   # (T, 1, hd) or (B, T, 1, hd)
    sin: torch.Tensor
    mask: Optional[torch.Tensor]        # None (causal) or bool (B, 1, T, T), True = attend
    carry: dict[str, torch.Tensor] = field(default_factory=dict)   # tensors produced by earlier units
    cache: Any = None                   # an inference cache (generation), else None
    start: int = 0                      # position of the first token (generation with a cache)
    seq: Optional[SequenceShard] = None  # the context-parallel sequence shard (parallel/context.py), else None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Causal attention of (B, Hq, T, hd) queries over (B, Hkv, S, hd) keys/values.

    Without a cache S == T (training, full forward); with one, the queries are the last
    T of S positions and see every key up to their own position. Under context
    parallelism (``ctx.seq`` set) q, k, v hold this rank's chunks and the shard's
    ``attention`` (ring or all-gather) runs instead.
    """
    if ctx.seq is not None:        # context parallel: q, k, v are this rank's sequence shard
        return ctx.seq.attention(q, k, v, ctx)
    n_rep = q.shape[1] // k.shape[1]
    T, S = q.shape[2], k.shape[2]
    if ctx.mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=n_rep > 1)
    if S == T:
        return causal_attention(q, k, v)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)   # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=n_rep > 1)


# ---------------------------------------------------------------- attention

def project_qkv(attn: Any, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``x`` (B, T, d) through ``attn.wq/wk/wv``, RoPE applied
    to queries and keys: (B, Hq, T, hd), (B, Hk, T, hd), (B, Hv, T, hd) (``attn``: any attention
    module with ``wq``, ``wk``, ``wv`` projections and ``head_dim``). Head counts come
    from the projections' widths (``-1`` views), so tensor-parallel shards work unchanged."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, -1, attn.head_dim)                    # (B, T, Hq, hd)
    k = attn.wk(x).view(B, T, -1, attn.head_dim)                    # (B, T, Hk, hd)
    v = attn.wv(x).view(B, T, -1, attn.head_dim)                    # (B, T, Hv, hd)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@register(ATTENTIONS, "gqa")
class GroupedQueryAttention(nn.Module):
    """Multi-head attention with grouped key/value heads, RoPE, and SDPA."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        hd, b = cfg.head_dim, cfg.attention_bias
        self.wq = make_linear(cfg, cfg.hidden_size, cfg.num_heads * hd, b, "q")
        self.wk = make_linear(cfg, cfg.hidden_size, cfg.num_kv_heads * hd, b, "k")
        self.wv = make_linear(cfg, cfg.hidden_size, cfg.num_kv_heads * hd, b, "v")
        self.wo = make_linear(cfg, cfg.num_heads * hd, cfg.hidden_size, b, "o")

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, ctx)                  # (B, Hq|Hkv, T, hd)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)    # (B, Hkv, S, hd): all positions so far
        y = attend(q, k, v, ctx)                             # (B, Hq, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)              # (B, T, Hq*hd)
        return self.wo(y)

    def tp_roles(self) -> dict:
        kv = ("kv", self.num_kv_heads, self.head_dim)
        return {"wq": "colwise", "wk": kv, "wv": kv, "wo": "rowwise"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        if cfg.num_heads % tp:
            return f"parallel.tensor={tp} must divide model.num_heads={cfg.num_heads}"
        if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
            return (f"parallel.tensor={tp} and model.num_kv_heads={cfg.num_kv_heads}: one must divide the "
                    f"other (KV heads are split, or replicated when tensor exceeds their count)")
        return None

    def attention_flops(self, seq_len: int) -> float:
        """Attention-score and weighted-sum FLOPs per token, training (PaLM convention)."""
        return 12.0 * self.num_heads * self.head_dim * seq_len

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Saved for backward per token (docs/scaling.md): the gathered input ``d`` (the q, k, v
        projections share it), RoPE'd queries, keys and values, the attention output (also
        ``wo``'s input) and one log-sum-exp per query head; heads split over ``tp`` (KV heads
        replicated when ``tp`` exceeds their count). Quantized projections (BitLinear) save
        their own input copies instead (:func:`projection_saved`)."""
        kv = self.num_kv_heads / tp if self.num_kv_heads % tp == 0 else self.num_kv_heads
        q = self.num_heads * self.head_dim / tp
        d = cast(nn.Linear, self.wq).in_features
        return (projection_saved([self.wq, self.wk, self.wv], d) + 2 * q + 2 * kv * self.head_dim
                + self.num_heads / tp + self.output_saved(tp, sp))

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        """Under a 16-bit dtype: the fp32 log-sum-exp per query head, the quantized projections'
        fp32 terms (:func:`projection_saved`)."""
        d = cast(nn.Linear, self.wq).in_features
        return (projection_saved([self.wq, self.wk, self.wv], d, fp32=True) + self.num_heads / tp
                + self.output_saved(tp, sp, fp32=True))

    def output_saved(self, tp: int, sp: bool, fp32: bool = False) -> float:
        """What ``wo`` saves per token beyond the attention output (already counted); with
        ``fp32`` its ``saved_fp32_elements`` share."""
        return projection_saved([self.wo], self.num_heads * self.head_dim / tp, input_saved=True, fp32=fp32)


# ---------------------------------------------------------------- MLPs

@register(MLPS, "swiglu")
class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        b = cfg.mlp_bias
        self.w1 = make_linear(cfg, cfg.hidden_size, cfg.ffn_hidden_size, b, "gate")
        self.w3 = make_linear(cfg, cfg.hidden_size, cfg.ffn_hidden_size, b, "up")
        self.w2 = make_linear(cfg, cfg.ffn_hidden_size, cfg.hidden_size, b, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Saved for backward per token: the gathered input ``d``; w1 x, silu(w1 x), w3 x and
        their product (``w2``'s input), ``4 f / tp`` (quantized projections: :func:`projection_saved`)."""
        w1 = cast(nn.Linear, self.w1)
        f = w1.out_features / tp
        return projection_saved([self.w1, self.w3], w1.in_features) + 3 * f + projection_saved([self.w2], f)

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        """Only the quantized projections' fp32 terms (:func:`projection_saved`)."""
        w1 = cast(nn.Linear, self.w1)
        f = w1.out_features / tp
        return (projection_saved([self.w1, self.w3], w1.in_features, fp32=True)
                + projection_saved([self.w2], f, fp32=True))

    def tp_roles(self) -> dict:
        return {"w1": "colwise", "w3": "colwise", "w2": "rowwise"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        if cfg.ffn_hidden_size % tp:
            return f"parallel.tensor={tp} must divide model.ffn_hidden_size={cfg.ffn_hidden_size}"
        return None


# ---------------------------------------------------------------- the block

class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)).

    ``attention`` and ``mlp`` name slot entries, so one architecture may mix layer
    kinds (a different attention or MLP per layer)."""

    def __init__(self, cfg, layer_idx: int, attention: str, mlp: str):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = ATTENTIONS[attention](cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLPS[mlp](cfg, layer_idx)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), ctx)   # (B, T, d)
        return x + self.mlp(self.mlp_norm(x))

    def tp_roles(self) -> dict:
        # an MLP kind may declare its own role (an MoE layer: "replicated")
        return {"attention_norm": "sequence", "mlp_norm": "sequence", "attention": "gather",
                "mlp": self.mlp.tp_role if isinstance(self.mlp, TPRole) else "gather"}


def layer_attention(cfg, layer_idx: int) -> str:
    """The attention kind of layer ``layer_idx`` (the ``model.attention`` slot; an
    architecture with per-layer choices decides in its own spec)."""
    return cfg.attention


def layer_mlp(cfg, layer_idx: int) -> str:
    """The MLP kind of layer ``layer_idx``: ``model.mlp``, except where an MLP kind's
    placement rule (e.g. MoE every N layers, dense first K) keeps a layer dense."""
    placement = MLP_PLACEMENT.get(cfg.mlp)
    return placement(cfg, layer_idx) if placement else cfg.mlp


#: MLP kind -> rule(cfg, layer_idx) -> the kind that layer actually uses.
MLP_PLACEMENT: dict[str, Callable[[Any, int], str]] = {}


def block_tp_requirements(cfg, layer_idx: int, tp: int, attention: str, mlp: str) -> Optional[str]:
    """The first divisibility rule a block of these slot kinds breaks at ``tp``, or None."""
    for cls in (ATTENTIONS[attention], MLPS[mlp]):
        err = cls.tp_requirements(cfg, layer_idx, tp) if issubclass(cls, TPRequirements) else None
        if err:
            return err
    return None
