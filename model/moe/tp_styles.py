"""MoE's tensor-parallel role ``replicated`` (registered in :mod:`polytron.parallel.roles`).

A module run whole on every tensor-parallel rank with plain parameters (an MoE layer,
model/moe/layer.py, declares ``tp_role = "replicated"``). With sequence parallelism its
input is all-gathered ``Shard(1) -> Replicate`` and handed in as a local tensor, and its
output (identical on the TP peers) is handed back as the local ``Shard(1)`` slice
(backward: all-gather of the gradient); without it, nothing to do. Imported by
model/moe/layer.py.
"""
from __future__ import annotations

from polytron.parallel.roles import register_tp_style


@register_tp_style("replicated")
def replicated(role, module, tp: int, sequence_parallel: bool):
    """Style of role ``replicated``: sequence shard in, the whole sequence through the module
    as a local tensor, the sequence shard out (None without sequence parallelism)."""
    if not sequence_parallel:
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput
    return PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                    use_local_input=True, output_layouts=(Replicate(),),
                                    desired_output_layouts=(Shard(1),), use_local_output=True)
