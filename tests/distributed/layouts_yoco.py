"""YOCO layouts of the equivalence suite (collected by tests/distributed/equivalence.py).

The suite's tiny model (4 layers, d=64, 4 heads / 2 KV heads) as YOCO: layers 0-1 form
the self-decoder, ``shared_kv`` produces the shared key/value, layers 2-3 the
cross-decoder. The sliding window (5) and the retention chunk (4) are shorter than the
suite's 16 positions, so the blocked window kernel, the chunk recurrence and document
resets across chunks all run.

* TP2 (sequence parallel, packed documents): the shared K/V heads split with the cross
  layers' query heads; with one KV head they are replicated (ReplicatedKVHeads).
* PP2 with the border inside the self-decoder ([1, 3]: nothing crosses but the hidden
  state) and inside the cross-decoder ([3, 1]: ``yoco_k`` / ``yoco_v`` cross), also
  with TP2 x PP2, where each TP rank sends its own heads.
* FSDP2, also tied with full activation checkpointing (the carry read inside a
  recomputed block).
* The released code's RoPE (``rope_pairing: interleaved``, ``rope_frequencies: released``)
  under CP2 (sliding window; each rank rotates its own load-balanced chunks and the
  halo it receives was rotated by its owner) and TP2 (retention, head-sharded q/k rows).
"""
from tests.distributed.layout import Layout

SWA = {"arch": "yoco", "yoco": {"self_decoder": "swa", "sliding_window": 5}}
RETENTION = {"arch": "yoco", "yoco": {"self_decoder": "retention", "retention_chunk": 4}}
RELEASED_ROPE = {"rope_pairing": "interleaved", "rope_frequencies": "released"}

LAYOUTS = [
    Layout("yoco_swa_tp2_docs", 2, parallel={"tensor": 2}, model=SWA, data="docs"),
    Layout("yoco_retention_tp2_kv1_docs", 2, parallel={"tensor": 2},
           model={**RETENTION, "num_kv_heads": 1}, data="docs"),
    Layout("yoco_swa_pp2_border_in_self", 2, parallel={"pipeline": 2, "pipeline_split": [1, 3]}, model=SWA),
    Layout("yoco_swa_pp2_border_in_cross", 2, parallel={"pipeline": 2, "pipeline_split": [3, 1]},
           model=SWA, data="masked"),
    Layout("yoco_retention_pp2_border_in_cross", 2,
           parallel={"pipeline": 2, "pipeline_split": [3, 1], "pipeline_schedule": "gpipe"},
           model=RETENTION, data="docs"),
    Layout("yoco_swa_fsdp2", 2, model=SWA, data="masked"),
    Layout("yoco_retention_fsdp2_tied_full_ac", 2, parallel={"activation_checkpoint": "full"},
           model={**RETENTION, "tie_embeddings": True}),
    Layout("yoco_retention_tp2_pp2_border_in_cross", 4,
           parallel={"tensor": 2, "pipeline": 2, "pipeline_split": [3, 1]},
           model=RETENTION),
    Layout("yoco_swa_cp2_released_rope_docs", 2, parallel={"context": 2},
           model={"arch": "yoco", "yoco": {**SWA["yoco"], **RELEASED_ROPE}}, data="docs"),
    Layout("yoco_retention_tp2_released_rope", 2, parallel={"tensor": 2},
           model={"arch": "yoco", "yoco": {**RETENTION["yoco"], **RELEASED_ROPE}}, data="docs"),
]
