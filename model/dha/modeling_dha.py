"""Decoupled-head attention's piece of the assembled remote-code modeling file.

Copied into an export's modeling file (:mod:`model.hf_remote`) when a layer uses
``attention: dha``: layer ``i`` has ``dha_key_heads[i]`` key heads and ``dha_value_heads[i]``
value heads; query head ``h`` reads key head ``dha_key_map[i][h]`` and value head
``dha_value_map[i][h]`` (Chen et al. 2024). The heads are gathered as
:mod:`model.dha.layers` gathers them (as few as the maps allow, SDPA's grouped path), and
the cache keeps each layer's own ``Gk + Gv`` heads. The imports above the piece are for
reading this file as a module; the assembled file has its own.
"""
from __future__ import annotations

import torch

from polytron.model.hf_remote.pieces import ATTENTIONS, Attention


# piece: dha
def dha_plan(key_map, value_map) -> tuple[tuple, tuple]:
    """(key heads, value heads) to gather: one per block of query heads sharing a pair when the
    blocks are contiguous and of one size, else one per query head (model/dha/layers.py)."""
    pairs = list(zip(key_map, value_map))
    n = len(pairs)
    for size in range(n, 0, -1):
        blocks = [pairs[b:b + size] for b in range(0, n, size)]
        if n % size == 0 and all(len(set(blk)) == 1 for blk in blocks):
            return tuple(blk[0][0] for blk in blocks), tuple(blk[0][1] for blk in blocks)
    raise AssertionError("size 1 always works")


class DHAAttention(Attention):
    """Query heads read their layer's own key and value heads through two independent maps."""

    def __init__(self, config, layer_idx: int):
        kh, vh = config.dha_key_heads[layer_idx], config.dha_value_heads[layer_idx]
        super().__init__(config, layer_idx, (kh, vh))
        self.key_index, self.value_index = dha_plan(config.dha_key_map[layer_idx], config.dha_value_map[layer_idx])
        self.key_gather = self.key_index != tuple(range(kh))
        self.value_gather = self.value_index != tuple(range(vh))

    def forward(self, x, cos, sin, mask, cache):
        q, k, v = self.project(x, cos, sin, cache)                        # (B, Hq|Gk|Gv, S, hd)
        if self.key_gather:
            k = k.index_select(1, torch.tensor(self.key_index, device=k.device))
        if self.value_gather:
            v = v.index_select(1, torch.tensor(self.value_index, device=v.device))
        return self.o_proj(self.mix(q, k, v, mask))


ATTENTIONS["dha"] = DHAAttention
