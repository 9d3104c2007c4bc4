"""BitNet's parallel registrations: the tensor-parallel role ``sharded_norm`` (in
:mod:`polytron.parallel.roles`) and the context-parallel form of ``gqa_subnorm`` (in
:mod:`polytron.parallel.context`: native, it attends through ``model.layers.attend``).

A norm over a column-sharded last dimension, between a colwise and a rowwise projection
(the sub-norms of model/bitnet/layers.py): its input is taken as ``Shard(-1)``, so the
statistic spans the whole vector; the gain is replicated; the output is handed on as a
local tensor. Imported by model/bitnet/layers.py.
"""
from __future__ import annotations

from polytron.parallel.context import register_cp_mixer
from polytron.parallel.roles import register_tp_style

register_cp_mixer("gqa_subnorm")


@register_tp_style("sharded_norm")
def sharded_norm(role, module, tp: int, sequence_parallel: bool):
    """Style of role ``sharded_norm``: SequenceParallel over the last (feature) dimension."""
    from torch.distributed.tensor.parallel import SequenceParallel
    return SequenceParallel(sequence_dim=-1, use_local_output=True)
