"""Mixture-of-experts layouts under context parallelism (collected by tests/distributed/equivalence.py).

Routing is token-local; the router sums its per-expert counts, score sums and z-loss terms
over the cp ranks (model/moe/router.py, ``seq_reducer``), so the balancing and z losses,
the reported load and the auxiliary-loss-free bias update are those of the whole sequence.
MOE_CP is the MoE suite's model (sigmoid routing, shared expert, balancing bias, balance and
z losses) dropless: capacity dropping is refused under cp. With EP2 x CP2 each expert
group holds ranks of one cp index; the cp ranks of an expert shard sum its gradients.
"""
from tests.distributed.layout import Layout
from tests.distributed.layouts_moe import MHMOE, MOE

MOE_CP = {**MOE, "moe": {**MOE["moe"], "capacity_factor": 0.0}}

LAYOUTS = [
    Layout("moe_cp2_ep2_docs", 4, parallel={"context": 2, "expert": 2}, model=MOE_CP, data="docs"),
    Layout("mhmoe_cp2", 2, parallel={"context": 2}, model=MHMOE),
]
