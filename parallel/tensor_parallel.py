"""Tensor parallelism (Megatron-style) with sequence parallelism, on DTensor.

``apply_tensor_parallel(model, tp_mesh, sequence_parallel)`` rewrites the
single-device :class:`~model.transformer.Transformer` (or a pipeline stage of it)
in place with ``parallelize_module``; module names and parameter FQNs do not
change, so checkpoints reshard across layouts.

The plan is not written here: every layer declares the role of each child it owns
(``tp_roles()``, the :class:`~polytron.model.protocols.TPRoles` protocol, in
model/layers.py and the architecture folders), and each unit kind has a role
(``UNIT_ROLES``). Roles are names in a registry, :mod:`polytron.parallel.roles`:
``register_tp_style(name, factory)`` maps a role to ``factory(role, module, tp,
sequence_parallel) -> ParallelStyle | None``. This module registers the built-in roles
(``S`` = sequence-parallel: the residual stream between blocks is a local ``(B, T/tp, d)``
shard; without SP it is a replicated ``(B, T, d)`` tensor):

================  ==============================================================
role              style
================  ==============================================================
vocab_rowwise     embedding unit: vocab-parallel rows; Replicate tokens in,
                  reduce-scatter to Shard(1) (S) or all-reduce (no S)
sequence          norms (S only): SequenceParallel, the norm runs on the shard
sequence_local    any module on the residual stream (S only): as sequence, output
                  handed on as a local shard
gather            attention / MLP inputs (S only): all-gather Shard(1) -> Replicate
colwise           ColwiseParallel (heads / inner columns split)
("kv", n, hd)     ColwiseParallel when tp divides the n KV heads, else
                  :class:`ReplicatedKVHeads`
rowwise           RowwiseParallel: reduce-scatter to Shard(1) (S) or all-reduce
vocab_colwise     head unit: vocab-sharded logits DTensor (``Shard(-1)``),
                  consumed by ``loss_parallel``
replicate         left as plain parameters
================  ==============================================================

and architecture folders register theirs beside their layers (this package imports
no architecture): ``sharded_norm`` (model/bitnet/tp_styles.py: a norm over a
column-sharded last dimension), ``tp_local`` (model/dha/tp_styles.py: plain
head-indexed state cut to the rank), ``replicated`` (model/moe/tp_styles.py: a module
run whole on every TP rank). A role nobody registered is an error naming the module.

FP8 (``precision.fp8``, :mod:`parallel.fp8`): a ``colwise``, split ``kv`` or
``rowwise`` projection that is a tensor-wise torchao ``Float8Linear`` gets torchao's
``Float8ColwiseParallel`` / ``Float8RowwiseParallel`` (inputs cast before the
all-gather, output gradients cast to FP8 on the DTensor, so scales are global), and
a ``gather`` whose readers are all such projections gets ``PrepareFloat8ModuleInput``
(one FP8 all-gather shared by q/k/v or gate/up). Other FP8 modules (row-wise
recipes, Transformer Engine's :class:`parallel.fp8.TELinear`) take the plain styles.

RoPE and document masks need the *global* sequence: with SP the engine always
passes ``position_ids`` (``arange(T)`` when the batch has none), so the rotary
table is indexed with full positions even though the embedding output is a shard.
"""
from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Optional, cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from polytron.model.protocols import TPRoles
from polytron.parallel.roles import UNIT_ROLES, register_tp_style, style_for

if TYPE_CHECKING:
    from polytron.model.transformer import Transformer


class ReplicatedKVHeads(ParallelStyle):
    """K/V projection when the TP degree exceeds the number of KV heads.

    Each TP rank's query heads (``num_heads / tp`` consecutive heads) all read the
    same KV head, ``rank * num_kv_heads // tp``. The projection's parameters stay whole
    and replicated (``Replicate`` DTensors on the TP mesh); each rank runs the whole
    projection module (any linear kind: its forward sees the full weight, so a
    whole-tensor statistic such as BitNet's absmean stays exact) on its local input
    and keeps the columns of its KV head, ``(B, T, hd)``. The parameters enter the
    forward as local tensors whose gradients are marked ``Partial``: ranks that share
    a head hold partial gradients, summed over the TP group when the DTensor gradient
    is formed. The input gradient is marked ``Partial`` like a column-parallel one.
    """

    def __init__(self, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for sub in module.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                dparam = nn.Parameter(distribute_tensor(param, device_mesh, [Replicate()], src_data_rank=None),
                                      requires_grad=param.requires_grad)
                sub.register_parameter(name, dparam)
        head = device_mesh.get_local_rank() * self.num_kv_heads // device_mesh.size()
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)
        module.forward = functools.partial(_kv_head_forward, module, module.forward, cols, device_mesh)
        return module


def _kv_head_forward(module: nn.Module, inner_forward, cols: slice, mesh: DeviceMesh,
                     x: torch.Tensor) -> torch.Tensor:
    """(B, T, d) replicated input -> (B, T, hd) projection onto this rank's KV head."""
    from torch.nn.utils.stateless import _reparametrize_module
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    x_local = x.to_local(grad_placements=[Partial()])           # (B, T, d), grad is partial
    local = {name: cast(DTensor, p).to_local(grad_placements=[Partial()])   # parameters are DTensors here
             for name, p in module.named_parameters()}
    with _reparametrize_module(module, local):
        y = inner_forward(x_local)                               # (B, T, Hkv*hd), whole projection
    return y[..., cols]


class InPlace(ParallelStyle):
    """A style that changes a module's plain (non-parameter) state in place:
    ``fn(module, tp_mesh)``; the module's parameters stay as they are."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.fn(module, device_mesh)
        return module


def _gather_style(module: nn.Module) -> ParallelStyle:
    """All-gather a sequence-sharded first input before ``module`` (its other inputs pass)."""
    n = len([p for p in inspect.signature(module.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n - 1),
                              desired_input_layouts=(Replicate(),) + (None,) * (n - 1))


# ---------------------------------------------------------------- built-in roles

def _float8(role: str, module: nn.Module, tp: int, sequence_parallel: bool) -> Optional[ParallelStyle]:
    """torchao's FP8 style when ``module`` is a tensor-wise Float8Linear (or gathers for them)."""
    from polytron.parallel.fp8 import float8_tp_style
    return float8_tp_style(role, module, tp, sequence_parallel)


def _residual(sequence_parallel: bool):
    """Placement of the residual stream between blocks: sequence shard (SP) or replicated."""
    return Shard(1) if sequence_parallel else Replicate()


@register_tp_style("colwise")
def _colwise(role, module, tp, sequence_parallel):
    return _float8("colwise", module, tp, sequence_parallel) or ColwiseParallel()


@register_tp_style("kv")
def _kv(role, module, tp, sequence_parallel):
    _, num_kv_heads, head_dim = role
    if num_kv_heads % tp:
        return ReplicatedKVHeads(num_kv_heads, head_dim)
    return _float8("kv", module, tp, sequence_parallel) or ColwiseParallel()


@register_tp_style("rowwise")
def _rowwise(role, module, tp, sequence_parallel):
    return (_float8("rowwise", module, tp, sequence_parallel)
            or RowwiseParallel(output_layouts=_residual(sequence_parallel)))


@register_tp_style("gather")
def _gather(role, module, tp, sequence_parallel):
    style = _float8("gather", module, tp, sequence_parallel)
    if style is not None:
        return style
    return _gather_style(module) if sequence_parallel else None


@register_tp_style("sequence")
def _sequence(role, module, tp, sequence_parallel):
    return SequenceParallel() if sequence_parallel else None


@register_tp_style("sequence_local")
def _sequence_local(role, module, tp, sequence_parallel):
    return SequenceParallel(use_local_output=True) if sequence_parallel else None


@register_tp_style("vocab_rowwise")
def _vocab_rowwise(role, module, tp, sequence_parallel):
    return RowwiseParallel(input_layouts=Replicate(), output_layouts=_residual(sequence_parallel))


@register_tp_style("vocab_colwise")
def _vocab_colwise(role, module, tp, sequence_parallel):
    return ColwiseParallel(input_layouts=_residual(sequence_parallel), output_layouts=Shard(-1),
                           use_local_output=False)


@register_tp_style("replicate")
def _replicate(role, module, tp, sequence_parallel):
    return None


def unit_plan(unit_kind: str, unit: nn.Module, tp: int, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan of one unit: its kind's role, then every declared ``tp_roles()`` inside it."""
    plan: dict[str, ParallelStyle] = {}
    roles: dict[str, object] = {}
    if unit_kind in UNIT_ROLES:
        roles[""] = UNIT_ROLES[unit_kind]
    for path, module in unit.named_modules():
        if isinstance(module, TPRoles):
            for child, role in module.tp_roles().items():
                roles[f"{path}.{child}" if path else child] = role
    for path, role in roles.items():
        module = unit.get_submodule(path) if path else unit
        style = style_for(role, module, tp, sequence_parallel)
        if style is not None:
            plan[path] = style
    return plan


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (a Transformer or a pipeline stage of one) over ``tp_mesh`` in place."""
    tp = tp_mesh.size()
    for unit, module in model.unit_modules():
        plan = unit_plan(unit.kind, module, tp, sequence_parallel)
        if "" in plan:                       # a whole-unit style goes on the unit itself
            parallelize_module(module, tp_mesh, plan.pop(""))
        if plan:
            parallelize_module(module, tp_mesh, plan)
