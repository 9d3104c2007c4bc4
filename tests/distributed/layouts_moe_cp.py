"""Mixture-of-experts layouts under context parallelism (collected by tests/distributed/equivalence.py).

Routing is token-local; the router sums its per-expert counts, score sums and z-loss terms
over the cp ranks (model/moe/router.py, ``seq_reducer``), so the balancing and z losses,
the reported load and the auxiliary-loss-free bias update are those of the whole sequence.
MOE_CP is the MoE suite's model (sigmoid routing, shared expert, balancing bias, balance and
z losses) dropless: capacity dropping is refused under cp. With EP2 x CP2 each expert
group holds ranks of one cp index; the cp ranks of an expert shard sum its gradients.

Expert groups spanning cp ranks (parallel/mesh.py, ep_cp > 1): ``*_cp2_ep2_span`` (2 ranks:
the two cp ranks of one sequence are one expert group), ``moe_cp2_ep4_span`` (4 ranks: the
group is 2 dp x 2 cp ranks, one expert each) and ``moe_cp4_ep2_span`` (4 ranks: groups of 2
of the 4 cp ranks; an expert shard's gradient is summed over the other group's cp ranks).
"""
from tests.distributed.layout import Layout
from tests.distributed.layouts_moe import MHMOE, MOE

MOE_CP = {**MOE, "moe": {**MOE["moe"], "capacity_factor": 0.0}}

LAYOUTS = [
    Layout("moe_cp2_ep2_docs", 4, parallel={"context": 2, "expert": 2}, model=MOE_CP, data="docs"),
    Layout("mhmoe_cp2", 2, parallel={"context": 2}, model=MHMOE),
    Layout("moe_cp2_ep2_span", 2, parallel={"context": 2, "expert": 2}, model=MOE_CP, data="docs"),
    Layout("mhmoe_cp2_ep2_span", 2, parallel={"context": 2, "expert": 2}, model=MHMOE),
    Layout("moe_cp2_ep4_span", 4, parallel={"context": 2, "expert": 4}, model=MOE_CP, data="docs"),
    Layout("moe_cp4_ep2_span", 4, parallel={"context": 4, "expert": 2}, model=MOE_CP, data="masked"),
]
