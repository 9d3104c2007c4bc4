"""Decoupled-head attention layouts of the equivalence suite (collected by
tests/distributed/equivalence.py).

The suite's tiny model (d=64, 4 layers, 4 query heads) with ``model.arch=dha``: key and
value head counts that differ between layers and between keys and values (2/1, 1/2,
4/2, 2/4), contiguous maps in layers 0-1 and permuted ones in layers 2 (keys) and 3
(values). Under TP2 each rank holds key/value heads {0,1} / {2,3} of the 4-head layers
(the permutations stay inside a rank), splits the 2-head layers and replicates the
1-head ones, so the layer gathers different heads on each rank (``tp_local`` maps).
PP2 cuts between layers 1 and 2 with document masks (the masked SDPA path of the
gather); FSDP2 shards the unequal projections.
"""
from tests.distributed.layout import Layout

DHA = {"arch": "dha", "attention": "dha",
       "dha": {"key_heads": [2, 1, 4, 2], "value_heads": [1, 2, 2, 4],
               "key_map": [[], [], [1, 0, 3, 2], []], "value_map": [[], [], [], [1, 0, 3, 2]]}}

LAYOUTS = [
    Layout("dha_tp2", 2, parallel={"tensor": 2}, model=DHA),
    Layout("dha_pp2_docs", 2, parallel={"pipeline": 2}, model=DHA, data="docs"),
    Layout("dha_fsdp2", 2, model=DHA),
]
