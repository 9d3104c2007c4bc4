"""Equivalence layouts of the mixture-of-experts decoder (model/moe), merged into
tests/distributed/equivalence.LAYOUTS: expert parallel alone, with tensor parallel,
with pipeline parallel, with FSDP over the ranks outside the expert group, and with HSDP
(experts replicated over dp_replicate).

MOE: sigmoid routing (DeepSeek-V3 style) with a shared expert, the auxiliary-loss-free
bias (post-optimizer hook, load summed over data-parallel ranks), load-balancing and
z losses, capacity-factor dropping (1.0, so micro-batches drop assignments), first layer
dense. MHMOE: MH-MoE with 4 sub-tokens per token, softmax routing, dropless. MHMOE_RELEASED:
the released MH-MoE recipe (model.moe.reference=released: raw-probability combine,
first-choice balancing loss, capacity top_k x ceil(N / E) with drops, MoE layers at
(i + 1) % 2 == 0). SKEWED: a
routing that sends nothing to the second expert-parallel rank (forced imbalance).
"""
from __future__ import annotations

from tests.distributed.layout import Layout

MOE = {"arch": "moe", "mlp": "moe",
       "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64, "shared_experts": 1,
               "score": "sigmoid", "bias_update_rate": 1e-3, "z_loss_coeff": 1e-3,
               "capacity_factor": 1.0, "first_dense": 1}}
MHMOE = {"arch": "moe", "mlp": "mh_moe",
         "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "heads": 4}}
MHMOE_RELEASED = {**MHMOE, "moe": {**MHMOE["moe"], "every": 2, "reference": "released"}}
#: every choice lands on experts 0-1 (tests/distributed/moe_skew.py): EP rank 1 receives no rows
SKEWED = {"plugins": ["tests.distributed.moe_skew"], "mlp": "test_moe_skewed",
          "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64, "shared_experts": 1,
                  "bias_update_rate": 1e-9}}

LAYOUTS = [
    Layout("moe_ep2", 2, parallel={"expert": 2}, model=MOE, data="masked"),
    Layout("mhmoe_ep2", 2, parallel={"expert": 2}, model=MHMOE),
    Layout("mhmoe_ep2_released", 2, parallel={"expert": 2}, model=MHMOE_RELEASED, data="masked"),
    Layout("moe_ep2_idle_rank", 2, parallel={"expert": 2}, model=SKEWED),
    Layout("moe_ep2_tp2", 4, parallel={"expert": 2, "tensor": 2}, model=MOE, data="docs"),
    Layout("moe_ep2_pp2", 4, parallel={"expert": 2, "pipeline": 2}, model=MOE),
    Layout("moe_ep2_efsdp2", 4, parallel={"expert": 2}, model=MOE),
    Layout("moe_ep2_hsdp2x2", 4,
           parallel={"expert": 2, "data_parallel_replicate": 2, "data_parallel_shard": 2},
           model=MOE),
    Layout("mhmoe_ep2_tp2", 4, parallel={"expert": 2, "tensor": 2}, model=MHMOE),
    Layout("mhmoe_ep2_pp2", 4, parallel={"expert": 2, "pipeline": 2}, model=MHMOE),
]
