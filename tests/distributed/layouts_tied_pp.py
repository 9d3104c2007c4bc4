"""Tied embeddings under pipeline parallelism (collected by tests/distributed/equivalence.py).

The embedding lives on the first stage and the head on the last, each with a copy of the
tied weight, initialized alike and updated with the summed gradient of the pair
(:mod:`parallel.pipeline`, the embedding group): PP2 with uneven loss masks, PP2 x TP2
(vocab-parallel embedding and head sharded alike) with packed documents, and interleaved
PP2 (two virtual stages per rank) x FSDP2.
"""
from tests.distributed.layout import Layout

TIED = {"tie_embeddings": True}

LAYOUTS = [
    Layout("pp2_tied", 2, parallel={"pipeline": 2}, model=TIED, data="masked"),
    Layout("tp2_pp2_tied", 4, parallel={"tensor": 2, "pipeline": 2}, model=TIED, data="docs"),
    Layout("pp2_interleaved_fsdp2_tied", 4, parallel={"pipeline": 2, "virtual_stages": 2}, model=TIED),
]
