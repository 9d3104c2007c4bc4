"""Architectures composed, as configurations (collected by tests/distributed/equivalence.py).

The slots make these plain settings, not forks: a YOCO decoder-decoder whose MLPs are
MH-MoE layers built from BitLinear projections, under expert parallelism combined with
tensor parallelism and with pipelining (the border inside the cross-decoder, so the
shared key/value crosses it); and a DHA model with routed BitLinear experts under EP2.
Each matches one process within 1e-5 over three steps like every other layout.
"""
from tests.distributed.layout import Layout

YOCO_MHMOE_BITNET = {"arch": "yoco", "yoco": {"self_decoder": "swa", "sliding_window": 5},
                     "mlp": "mh_moe", "linear": "bitlinear",
                     "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "heads": 2}}
DHA_MOE_BITNET = {"arch": "dha", "attention": "dha", "mlp": "moe", "linear": "bitlinear",
                  "dha": {"key_heads": [2, 1, 2, 1], "value_heads": [1, 2, 2, 1]},
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "shared_experts": 1}}

LAYOUTS = [
    Layout("compose_yoco_mhmoe_bitnet_ep2_tp2", 4, parallel={"expert": 2, "tensor": 2},
           model=YOCO_MHMOE_BITNET, data="docs"),
    Layout("compose_yoco_mhmoe_bitnet_ep2_pp2", 4,
           parallel={"expert": 2, "pipeline": 2, "pipeline_split": [3, 1]},
           model=YOCO_MHMOE_BITNET, data="masked"),
    Layout("compose_dha_moe_bitnet_ep2", 2, parallel={"expert": 2}, model=DHA_MOE_BITNET),
]
