"""Decoupled-head attention (``model.attention=dha``), an attention slot entry.

Chen et al. 2024, "DHA: Learning Decoupled-Head Attention from Transformer Checkpoints
via Adaptive Heads Fusion". Each layer has ``Gk`` key heads and ``Gv`` value heads of
its own, and every query head ``h`` reads key head ``key_map[h]`` and value head
``value_map[h]``; the two maps are independent. The KV cache holds ``Gk + Gv`` heads
per layer. MHA (``G = num_heads``, identity maps) and GQA (contiguous blocks, equal
key and value maps) are special cases, and for those the layer runs exactly the GQA
computation (no gather), so a DHA model with one source head per group reproduces
the source model bit for bit.

Otherwise the layer gathers its key and value heads into as few heads as the maps
allow: the distinct (key head, value head) pairs of the query heads, when query heads
with the same pair form contiguous blocks of one size (then SDPA's grouped-query
path runs on them), else one gathered head per query head.

Tensor parallelism: the query heads are split in contiguous blocks (``wq``
colwise, ``wo`` rowwise); ``wk`` / ``wv`` use the ``("kv", G, hd)`` role, so a rank
holds a contiguous block of ``G / tp`` heads (or, when ``tp`` is a multiple of
``G``, the one replicated head ``rank * G // tp``); the maps are cut to the rank
through the ``tp_local`` role (:meth:`HeadMaps.tp_localize`). So a map is supported
exactly when every rank's query heads read only heads that rank holds; others are
rejected by :meth:`DecoupledHeadAttention.tp_requirements` before any process
group exists.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from polytron.model.dha import tp_styles  # noqa: F401  (registers the "tp_local" role)
from polytron.model.dha.config import LayerHeads, layer_heads
from polytron.model.layers import ATTENTIONS, Context, attend, make_linear, project_qkv, register

NAME = "dha"


def _plan(key_map: tuple[int, ...], value_map: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(key heads, value heads) to gather so that SDPA's grouped path can run: one entry per
    block of query heads sharing a (key, value) pair when the blocks are contiguous and of
    one size; otherwise one entry per query head."""
    pairs = list(zip(key_map, value_map))
    n = len(pairs)
    for size in range(n, 0, -1):
        if n % size:
            continue
        blocks = [pairs[b:b + size] for b in range(0, n, size)]
        if all(len(set(blk)) == 1 for blk in blocks):
            chosen = [blk[0] for blk in blocks]
            return tuple(k for k, _ in chosen), tuple(v for _, v in chosen)
    raise AssertionError("size 1 always works")


class HeadMaps(nn.Module):
    """Query -> key head and query -> value head maps of one layer (plain state, no tensors).

    Under tensor parallelism the ``tp_local`` role calls :meth:`tp_localize`, which keeps
    this rank's query heads and renumbers the heads to the ones the rank holds."""

    def __init__(self, heads: LayerHeads):
        super().__init__()
        self.key_heads, self.value_heads = heads.key_heads, heads.value_heads
        self.key_map, self.value_map = heads.key_map, heads.value_map
        self._set_plan()

    def _set_plan(self) -> None:
        self.key_index, self.value_index = _plan(self.key_map, self.value_map)
        self._key_gather = self.key_index != tuple(range(self.key_heads))
        self._value_gather = self.value_index != tuple(range(self.value_heads))
        self._indices: dict = {}        # device -> (key index, value index) tensors

    def tp_localize(self, rank: int, tp: int) -> None:
        """Keep rank ``rank``'s query heads (a contiguous block) and number the key and value
        heads as that rank's shard of ``wk`` / ``wv`` holds them (see module doc)."""
        per = len(self.key_map) // tp
        lo = rank * per
        self.key_map, self.key_heads = _local(self.key_map[lo:lo + per], self.key_heads, rank, tp)
        self.value_map, self.value_heads = _local(self.value_map[lo:lo + per], self.value_heads, rank, tp)
        self._set_plan()

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._indices:
            self._indices[device] = (torch.tensor(self.key_index, device=device),
                                     torch.tensor(self.value_index, device=device))
        return self._indices[device]

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k (B, Gk, S, hd), v (B, Gv, S, hd) -> both (B, P, S, hd), P dividing the query heads."""
        ki, vi = self._index(k.device)
        if self._key_gather:
            k = k.index_select(1, ki)
        if self._value_gather:
            v = v.index_select(1, vi)
        return k, v


def _local(mapping: tuple[int, ...], heads: int, rank: int, tp: int) -> tuple[tuple[int, ...], int]:
    """A rank's slice of a map renumbered to the heads its shard holds, and their count."""
    if heads % tp == 0:
        per = heads // tp
        return tuple(g - rank * per for g in mapping), per
    return tuple(0 for _ in mapping), 1                  # one replicated head (tp a multiple of heads)


def _tp_rule(kind: str, layer_idx: int, heads: int, mapping: tuple[int, ...], tp: int) -> Optional[str]:
    """Why ``mapping`` cannot be split over ``tp`` ranks (None when it can)."""
    if heads % tp and tp % heads:
        return (f"parallel.tensor={tp} and model.dha.{kind}_heads[{layer_idx}]={heads}: one must divide "
                f"the other ({kind} heads are split, or replicated when tensor exceeds their count)")
    per_rank = len(mapping) // tp
    for h, g in enumerate(mapping):
        rank = h // per_rank
        if heads % tp == 0:
            lo, hi = rank * heads // tp, (rank + 1) * heads // tp
        else:
            lo = rank * heads // tp
            hi = lo + 1
        if not lo <= g < hi:
            held = f"{kind} head {lo}" if hi == lo + 1 else f"{kind} heads {lo}-{hi - 1}"
            return (f"parallel.tensor={tp}: model.dha.{kind}_map[{layer_idx}] has query head {h} (on "
                    f"tensor rank {rank}) read {kind} head {g}, but rank {rank} holds only {held}; "
                    f"tensor parallelism needs each rank's block of {per_rank} query heads to read only "
                    f"the {kind} heads of the same rank (or use parallel.tensor=1)")
    return None


@register(ATTENTIONS, NAME)
class DecoupledHeadAttention(nn.Module):
    """Attention with per-layer key and value head counts and independent query maps, RoPE, SDPA."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        heads = layer_heads(cfg, layer_idx)
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads
        self.key_heads, self.value_heads = heads.key_heads, heads.value_heads
        hd, b, d = cfg.head_dim, cfg.attention_bias, cfg.hidden_size
        self.wq = make_linear(cfg, d, cfg.num_heads * hd, b, "q")
        self.wk = make_linear(cfg, d, heads.key_heads * hd, b, "k")
        self.wv = make_linear(cfg, d, heads.value_heads * hd, b, "v")
        self.wo = make_linear(cfg, cfg.num_heads * hd, d, b, "o")
        self.maps = HeadMaps(heads)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, ctx)                  # (B, H, T, hd)
        if ctx.cache is not None:
            k, v = self._cached(ctx.cache, k, v)             # (B, Gk, S, hd), (B, Gv, S, hd)
        k, v = self.maps.gather(k, v)                        # (B, P, S, hd) each
        y = attend(q, k, v, ctx)                             # (B, Hq, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)              # (B, T, Hq*hd)
        return self.wo(y)

    def _cached(self, cache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = cache.update(self.layer_idx, k, v)
        if ks.shape[1] != k.shape[1] or vs.shape[1] != v.shape[1]:
            raise ValueError(f"layer {self.layer_idx}: the inference cache holds {ks.shape[1]} key and "
                             f"{vs.shape[1]} value heads, this DHA layer has {k.shape[1]} and {v.shape[1]}; "
                             "use model.arch=dha, whose cache is sized per layer")
        return ks, vs

    def tp_roles(self) -> dict:
        return {"wq": "colwise", "wk": ("kv", self.key_heads, self.head_dim),
                "wv": ("kv", self.value_heads, self.head_dim), "wo": "rowwise", "maps": "tp_local"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        if cfg.num_heads % tp:
            return f"parallel.tensor={tp} must divide model.num_heads={cfg.num_heads}"
        heads = layer_heads(cfg, layer_idx)
        return (_tp_rule("key", layer_idx, heads.key_heads, heads.key_map, tp)
                or _tp_rule("value", layer_idx, heads.value_heads, heads.value_map, tp))

    def kv_heads(self) -> tuple[int, int]:
        """(key heads, value heads) this layer caches per position."""
        return self.key_heads, self.value_heads

    def attention_flops(self, seq_len: int) -> float:
        """Attention-score and weighted-sum FLOPs per token, training (PaLM convention): every
        query head still scores and mixes, so sharing heads saves cache, not these FLOPs."""
        return 12.0 * self.num_heads * self.head_dim * seq_len


def kv_heads(cfg, layer_idx: int) -> tuple[int, int]:
    """(key heads, value heads) the attention of layer ``layer_idx`` caches per position:
    DHA's own counts, or ``model.num_kv_heads`` for the dense kinds."""
    from polytron.model.layers import layer_attention
    if layer_attention(cfg, layer_idx) == NAME:
        heads = layer_heads(cfg, layer_idx)
        return heads.key_heads, heads.value_heads
    return cfg.num_kv_heads, cfg.num_kv_heads
