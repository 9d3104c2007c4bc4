"""The toy architecture's tensor-parallel role ``toy_inner_norm``: a norm over the MLP's
column-sharded inner vector (input taken as ``Shard(-1)``, so the statistic spans the whole
vector; the gain replicated; the output handed on as a local tensor)."""
from __future__ import annotations

from polytron.parallel.roles import register_tp_style


@register_tp_style("toy_inner_norm")
def toy_inner_norm(role, module, tp: int, sequence_parallel: bool):
    from torch.distributed.tensor.parallel import SequenceParallel
    return SequenceParallel(sequence_dim=-1, use_local_output=True)
