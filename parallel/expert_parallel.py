"""Expert parallelism: routed experts sharded over the ``"ep"`` mesh dimension.

``parallel.expert = ep`` carves an expert dimension out of the data-parallel shard ranks
(parallel/mesh.py, torchtitan's layout): each of the ``ep`` ranks of an expert group
holds ``E / ep`` consecutive experts of every MoE layer (``Shard(0)`` DTensors on the
``"ep"`` mesh), FSDP-sharded over the remaining data-parallel ranks (parallel/fsdp.py).
Attention, the router, shared experts and dense layers are data-parallel as before.

A layer that is an :class:`~polytron.model.protocols.ExpertLayer` (``routed_experts()``
and ``set_dispatch``, e.g. model/moe/layer.py) gets an :class:`ExpertDispatch`, which replaces the
local expert call on its expert-sorted rows:

1. exchange per-expert row counts with one ``all_to_all_single`` and read the split
   sizes back to the host (the one host synchronization of dropless expert
   parallelism, per MoE layer and direction, as in Megatron and torchtitan);
2. send each rank the rows of its experts (``all_to_all_single`` with variable split
   sizes; a hand-written autograd function whose backward is the reverse exchange);
3. regroup the received rows (source-major) by local expert and run the local experts;
4. send the outputs back the same way. Rows dropped by capacity routing are not sent
   and come back as zeros.

A rank (or an expert) that receives no rows still runs its experts on an empty batch,
so its parameters stay in the graph and every rank takes part in the same FSDP
collectives; their gradients are zero.

Gradient scale: every other parameter's gradient is averaged by FSDP over all ``dp``
data-parallel ranks, an expert's over the ``dp / ep`` ranks that hold the same experts
only, while each expert gradient already sums the rows of all ``ep`` ranks of its
group. The exchange therefore scales the gradient reaching the experts by ``1 / ep``
(and back by ``ep`` on its way to the inputs), so expert gradients are the same mean
over all data-parallel ranks as the rest, whatever the FSDP mesh size.

Under context parallelism an expert group may span cp ranks (parallel/mesh.py: ``ep_dp``
data-parallel x ``ep_cp`` cp ranks). Its cp ranks hold different tokens of the same
sequences, whose gradients are summed, not averaged, so the scale is ``1 / ep_dp``;
:func:`cp_grad_groups` then sums every other gradient over ``"cp"`` as before and the
expert shards over the cp ranks outside their group only (``"ecp"``).

The same code path runs on gloo (CPU) and NCCL.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from polytron.model.protocols import ExpertGroups, ExpertLayer, LoadReducing
from polytron.parallel.mesh import ParallelDims


class _AllToAll(torch.autograd.Function):
    """Rows (sum(send), ...) -> rows (sum(recv), ...) over ``group``; backward reverses it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        return _exchange(x, recv, send, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.send, ctx.recv, ctx.group), None, None, None


def _exchange(x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ExpertDispatch:
    """Runs a layer's experts across its expert-parallel group (see the module docstring)."""

    def __init__(self, group, ep: int, data_ranks: int):
        # data_ranks: the group's ranks that see different samples (the expert gradient scale)
        self.group, self.ep, self.data_ranks = group, ep, data_ranks

    def splits(self, counts: torch.Tensor) -> tuple[list[int], list[int], list[int], torch.Tensor]:
        """(send per rank, receive per rank, rows per local expert, received counts (ep*El,))."""
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)   # (ep*El,) source-major
        host = torch.cat([counts, received]).tolist()                            # the host read
        E = counts.shape[0]
        local = E // self.ep
        sent, got = host[:E], host[E:]
        send = [sum(sent[r * local:(r + 1) * local]) for r in range(self.ep)]
        recv = [sum(got[s * local:(s + 1) * local]) for s in range(self.ep)]
        per_expert = [sum(got[s * local + e] for s in range(self.ep)) for e in range(local)]
        return send, recv, per_expert, received

    def __call__(self, rows: torch.Tensor, groups: ExpertGroups, experts: nn.Module) -> torch.Tensor:
        """(M, w) rows sorted by (global) expert, kept rows first -> (M, w) expert outputs."""
        send, recv, per_expert, received = self.splits(groups.counts)
        local = len(per_expert)
        kept = sum(send)
        inbound = _AllToAll.apply(rows[:kept], recv, send, self.group)           # (R, w) source-major
        segment = torch.arange(local, device=rows.device).repeat(self.ep)        # (ep*El,) expert of a segment
        row_expert = torch.repeat_interleave(segment, received, output_size=sum(recv))   # (R,)
        perm = torch.argsort(row_expert, stable=True)                            # by local expert
        mine = groups.regrouped(torch.tensor(per_expert, device=rows.device), row_expert[perm],
                                max(per_expert, default=0))
        y = experts(_ScaleGrad.apply(inbound[perm], float(self.data_ranks)), mine)   # (R, w)
        y = _ScaleGrad.apply(y, 1.0 / self.data_ranks)
        inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.shape[0], device=rows.device))
        back = _AllToAll.apply(y.index_select(0, inverse), send, recv, self.group)   # (kept, w)
        if kept < rows.shape[0]:
            back = torch.cat([back, back.new_zeros(rows.shape[0] - kept, back.shape[1])])
        return back


def _local_forward(module: nn.Module, inner_forward, *args, **kwargs):
    """Run ``module`` on the local views of its expert-sharded DTensor parameters."""
    from torch.nn.utils.stateless import _reparametrize_module
    local = {name: p.to_local() for name, p in module.named_parameters() if isinstance(p, DTensor)}
    with _reparametrize_module(module, local):
        return inner_forward(*args, **kwargs)


def expert_layers(part: nn.Module) -> list[ExpertLayer]:
    """The MoE layers of a model part (:class:`~polytron.model.protocols.ExpertLayer` modules)."""
    return [m for m in part.modules() if isinstance(m, ExpertLayer)]


def apply_expert_parallel(part: nn.Module, ep_mesh: DeviceMesh, cp_ranks: int = 1) -> list[nn.Module]:
    """Shard every MoE layer's experts over ``ep_mesh`` (dim 0 of each stacked parameter) and
    give the layer the all-to-all dispatch; returns the expert modules (for FSDP).
    ``cp_ranks``: how many of the group's ranks are context-parallel peers (``ep_cp``)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    ep = ep_mesh.size()
    dispatch = ExpertDispatch(ep_mesh.get_group(), ep, ep // cp_ranks)
    out = []
    for layer in expert_layers(part):
        experts = layer.routed_experts()
        for sub in experts.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                sharded = distribute_tensor(p, ep_mesh, [Shard(0)], src_data_rank=None)
                sub.register_parameter(name, nn.Parameter(sharded, requires_grad=p.requires_grad))
        experts.forward = functools.partial(_local_forward, experts, experts.forward)
        layer.set_dispatch(dispatch)
        out.append(experts)
    return out


def _sum_over(group, t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def attach_load_reduction(part: nn.Module, dp_group) -> None:
    """Routers that balance by observed load (:class:`~polytron.model.protocols.LoadReducing`)
    sum it over the data-parallel ranks before their post-optimizer bias update, so every
    rank applies the same update."""
    reducer: Callable = functools.partial(_sum_over, dp_group)
    for m in part.modules():
        if isinstance(m, LoadReducing):
            m.load_reducer = reducer


def cp_grad_groups(parts: list[nn.Module], mesh: DeviceMesh, dims: ParallelDims,
                   ) -> list[tuple[list[nn.Parameter], object]]:
    """The parameters whose gradients are summed over each context-parallel group (``cp > 1``):
    all of them over ``"cp"``, except, when expert groups span cp ranks (``ep_cp > 1``), the
    expert shards, which sum over the cp ranks outside their group (``"ecp"``; none if there
    are none: the dispatch already summed the group's tokens)."""
    params = [p for m in parts for p in m.parameters()]
    if dims.ep_cp == 1:
        return [(params, mesh["cp"].get_group())]
    expert = {id(p) for m in parts for layer in expert_layers(m) for p in layer.routed_experts().parameters()}
    out: list[tuple[list[nn.Parameter], object]] = [
        ([p for p in params if id(p) not in expert], mesh["cp"].get_group())]
    if dims.cp > dims.ep_cp:
        out.append(([p for p in params if id(p) in expert], mesh["ecp"].get_group()))
    return out
