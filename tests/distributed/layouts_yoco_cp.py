"""YOCO under context parallelism (collected by tests/distributed/equivalence.py).

The suite's tiny YOCO (layers 0-1 self-decoder, ``shared_kv``, layers 2-3 cross-decoder)
on 16 positions, cut into 2 x cp chunks (model/yoco/context_parallel.py):

* sliding window at CP2 (chunks of 4, W = 5: each chunk's W-1 = 4 halo keys are the
  whole previous chunk, another rank's) and CP4 (chunks of 2, W = 3: every window
  crosses a chunk border), with packed documents / uneven loss masks;
* gated retention at CP2 (chunks of 4 with a retention chunk of 3, so the in-chunk padding
  runs; documents reset the scanned states) and CP4 (8 chunks, 7 scanned states);
* CP2 x PP2 with the pipeline border inside the cross-decoder (split [3, 1]): the shared
  key/value crosses the border as sequence shards and each stage gathers it once;
* retention CP2 with full activation checkpointing (the gathered key/value is reused by the
  recomputed cross-decoder blocks).
"""
from tests.distributed.layout import Layout

SWA5 = {"arch": "yoco", "yoco": {"self_decoder": "swa", "sliding_window": 5}}
SWA3 = {"arch": "yoco", "yoco": {"self_decoder": "swa", "sliding_window": 3}}
RETENTION3 = {"arch": "yoco", "yoco": {"self_decoder": "retention", "retention_chunk": 3}}
RETENTION4 = {"arch": "yoco", "yoco": {"self_decoder": "retention", "retention_chunk": 4}}

LAYOUTS = [
    Layout("yoco_swa_cp2_docs", 2, parallel={"context": 2}, model=SWA5, data="docs"),
    Layout("yoco_swa_cp4_masked", 4, parallel={"context": 4}, model=SWA3, data="masked"),
    Layout("yoco_retention_cp2_docs", 2, parallel={"context": 2}, model=RETENTION3, data="docs"),
    Layout("yoco_retention_cp4_docs", 4, parallel={"context": 4}, model=RETENTION4, data="docs"),
    Layout("yoco_swa_cp2_pp2_border_in_cross", 4,
           parallel={"context": 2, "pipeline": 2, "pipeline_split": [3, 1]}, model=SWA5, data="docs"),
    Layout("yoco_retention_cp2_full_ac", 2, parallel={"context": 2, "activation_checkpoint": "full"},
           model=RETENTION4),
]
