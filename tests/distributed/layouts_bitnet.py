"""BitNet b1.58 layouts of the equivalence suite (collected by tests/distributed/equivalence.py).

Both variants on the suite's tiny model (d=64, 4 heads / 2 KV heads, ffn 128):

* ``B2B4T``: the released 2B4T model (sub-norms on the TP-sharded attention output and
  MLP inner width, ReLU^2) under TP2 with sequence parallelism, PP2 and FSDP2 (tied
  embeddings, uneven loss masks);
* ``PAPER``: the paper's BitLinear with its inner RMSNorm (on the row-parallel, sharded
  inputs of ``wo`` / ``w2``), here with the embedding and head also ternary, one KV head
  (replicated-KV style) and no sequence parallelism;
* ``FAQ``: the training-tips FAQ's block (``block_prenorm: false``: no RMSNorm before the
  attention and the SwiGLU, BitLinear's inner norm only) under TP2 with sequence
  parallelism, where the sequence-sharded residual goes straight into the gathering
  attention and MLP.

Under TP the absmean of a weight shard and the absmax / RMS of a row-parallel input
shard would differ from the whole tensor's; tests/model/test_bitnet_parallel.py shows
that such shard-local scales fail this suite's 1e-5 criterion.
"""
from tests.distributed.layout import Layout

B2B4T = {"arch": "bitnet", "attention": "gqa_subnorm", "mlp": "relu2_subnorm", "linear": "bitlinear"}
PAPER = {"arch": "bitnet", "linear": "bitlinear",
         "bitnet": {"linear_norm": True, "quantize": ["q", "k", "v", "o", "gate", "up", "down", "head",
                                                      "embedding"]}}
FAQ = {"arch": "bitnet", "linear": "bitlinear", "bitnet": {"linear_norm": True, "block_prenorm": False}}

LAYOUTS = [
    Layout("bitnet_tp2", 2, parallel={"tensor": 2}, model=B2B4T, data="docs"),
    Layout("bitnet_pp2", 2, parallel={"pipeline": 2}, model=B2B4T),
    Layout("bitnet_fsdp2_tied", 2, model={**B2B4T, "tie_embeddings": True}, data="masked"),
    Layout("bitnet_paper_tp2_kv1_no_sp", 2, parallel={"tensor": 2, "sequence_parallel": False},
           model={**PAPER, "num_kv_heads": 1}),
    Layout("bitnet_faq_tp2", 2, parallel={"tensor": 2}, model=FAQ, data="docs"),
]
