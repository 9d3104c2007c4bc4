"""Context-parallel layouts of the equivalence suite (collected by tests/distributed/equivalence.py).

Each sequence (SEQ=16) is cut into 2 x cp chunks; rank i of a cp group holds chunks i and
2cp-1-i (parallel/context.py). Document masking ("docs": packed documents with restarted
positions) runs through the ring with masks built per chunk pair from the gathered
document ids; CP4 has chunks of 2 tokens, so documents span several ranks. The loss and
token counts are normalized over the whole sequence (cp and dp), the per-source statistics
("sources") are reduced over the cp ranks too. They run in the same spawn per world size
as every other layout.
"""
from tests.distributed.layout import Layout
from tests.distributed.layouts_bitnet import B2B4T
from tests.distributed.layouts_dha import DHA

LAYOUTS = [
    Layout("cp2_docs", 2, parallel={"context": 2}, data="docs"),
    Layout("cp4_docs", 4, parallel={"context": 4}, data="docs"),
    Layout("cp2_allgather_docs", 2, parallel={"context": 2, "context_kind": "allgather"}, data="docs"),
    Layout("cp2_tp2_masked", 4, parallel={"context": 2, "tensor": 2}, data="masked"),
    Layout("cp2_pp2_docs", 4, parallel={"context": 2, "pipeline": 2}, data="docs"),
    Layout("cp2_fsdp2_sources", 4, parallel={"context": 2}, data="sources"),
    Layout("dha_cp2_docs", 2, parallel={"context": 2}, model=DHA, data="docs"),
    # BitNet under the ring differs by ~4e-5 at step 1 (ternary rounding amplifies the online
    # softmax's fp32 summation order); the all-gather form matches within 1e-5
    Layout("bitnet_cp2_allgather", 2, parallel={"context": 2, "context_kind": "allgather"}, model=B2B4T,
           data="masked"),
]
