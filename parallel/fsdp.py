"""Data parallelism with FSDP2 (``fully_shard``): FSDP over ``dp_shard``, HSDP over
``dp_replicate x dp_shard``.

Each unit of the model other than the embedding, final norm and head (transformer
blocks, and units such as a carry producer) is its own FSDP unit (one all-gather /
reduce-scatter each), then the root module (embedding, final norm, head) is one more.
Gradients are averaged over the data-parallel ranks (FSDP2's default), so the
per-rank loss convention (mean over the rank's tokens) gives the global mean.

Mixture-of-experts layers (model/moe): with expert parallelism (``parallel.expert > 1``)
each layer's routed experts are first sharded over ``"ep"``
(:func:`parallel.expert_parallel.apply_expert_parallel`) and then FSDP-sharded as their
own unit over the remaining data-parallel ranks, ``"efsdp"`` (HSDP: ``("dp_replicate",
"efsdp")``); everything else is sharded over the whole data-parallel mesh as before.
Routers (modules with ``full_precision = True``) are their own units with an fp32
parameter policy, so they compute in full precision under bf16 training. Routers that
balance by observed load get a reduction of that load over the data-parallel ranks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from polytron.model.protocols import FullPrecision
from polytron.model.spec import PLAIN_KINDS
from polytron.parallel.mesh import ParallelDims

if TYPE_CHECKING:
    from polytron.model.transformer import Transformer


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP shards over: 1-D ``dp_shard``, or 2-D ``(dp_replicate, dp_shard)`` (HSDP)."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def mixed_precision(param_dtype: torch.dtype, reduce_dtype: torch.dtype):
    """FSDP2 policy: parameters cast to ``param_dtype`` for compute, gradients reduced in
    ``reduce_dtype`` (fp32 by default, so bf16 training still averages in full precision)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(model: Transformer, mesh: DeviceMesh, dims: ParallelDims, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, reshard_after_forward: bool) -> None:
    """Wrap each inner unit of ``model`` (a Transformer or a pipeline stage), then the root.

    ``reshard_after_forward=False`` keeps the blocks' gathered parameters between
    forward and backward: with pipelining each stage runs several micro-batches'
    forwards before their backwards, and re-gathering every time would multiply
    all-gathers by the micro-batch count.
    """
    from torch.distributed.fsdp import fully_shard

    from polytron.parallel.expert_parallel import attach_load_reduction
    fmesh = dp_mesh(mesh, dims)
    mp = mixed_precision(param_dtype, reduce_dtype)
    inner = [m for u, m in model.unit_modules() if u.kind not in PLAIN_KINDS]
    shard_experts(model, mesh, dims, mp, reshard_after_forward)
    for i, module in enumerate(inner):
        # the last unit's parameters are needed again at once by backward: keep them
        keep = reshard_after_forward and i < len(inner) - 1
        keep_routers_fp32(module, fmesh, param_dtype, keep)
        fully_shard(module, mesh=fmesh, mp_policy=mp, reshard_after_forward=keep)
    fully_shard(model, mesh=fmesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    attach_load_reduction(model, mesh["dp"].get_group())


def expert_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh expert shards are FSDP-sharded over: the data-parallel ranks outside "ep"."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "efsdp"]
    return mesh["efsdp"]


def shard_experts(model: nn.Module, mesh: DeviceMesh, dims: ParallelDims, mp,
                  reshard_after_forward: bool) -> list[nn.Module]:
    """With expert parallelism: experts sharded over "ep", then each layer's experts one FSDP
    unit over the other data-parallel ranks (its own mesh, so before the enclosing block)."""
    if dims.ep == 1:
        return []
    from torch.distributed.fsdp import fully_shard

    from polytron.parallel.expert_parallel import apply_expert_parallel
    experts = apply_expert_parallel(model, mesh["ep"], dims.ep_cp)
    emesh = expert_mesh(mesh, dims)
    for module in experts:
        fully_shard(module, mesh=emesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return experts


def keep_routers_fp32(unit: nn.Module, fmesh: DeviceMesh, param_dtype: torch.dtype, reshard: bool) -> None:
    """Modules marked ``full_precision`` (:class:`~polytron.model.protocols.FullPrecision`, e.g.
    MoE routers) as their own FSDP units computing in fp32."""
    if param_dtype == torch.float32:
        return
    from torch.distributed.fsdp import fully_shard
    fp32 = mixed_precision(torch.float32, torch.float32)
    for m in unit.modules():
        if isinstance(m, FullPrecision) and m.full_precision:
            fully_shard(m, mesh=fmesh, mp_policy=fp32, reshard_after_forward=reshard)
