"""Tensor parallelism (Megatron-style) with sequence parallelism, on DTensor.

``apply_tensor_parallel(model, tp_mesh, sequence_parallel)`` rewrites the
single-device :class:`~model.transformer.Transformer` (or a pipeline stage of it)
in place with ``parallelize_module``; module names and parameter FQNs do not
change, so checkpoints reshard across layouts.

Plan (``S`` = sequence-parallel, the residual stream between blocks is a local
``(B, T/tp, d)`` shard; without SP it is a replicated ``(B, T, d)`` tensor):

==========================  ===================================================
tok_embeddings              vocab-parallel rows (RowwiseParallel): Replicate
                            tokens in, reduce-scatter to Shard(1) (S) or
                            all-reduce (no S)
attention_norm, mlp_norm,   SequenceParallel: norm runs on the sequence shard
norm (S only)
attention / mlp inputs      PrepareModuleInput: all-gather Shard(1) -> Replicate
wq, w1, w3                  ColwiseParallel (heads / MLP columns split)
wk, wv                      ColwiseParallel when tp divides num_kv_heads, else
                            :class:`ReplicatedKVHeads` (see below)
wo, w2                      RowwiseParallel: reduce-scatter to Shard(1) (S) or
                            all-reduce (no S)
output                      ColwiseParallel to vocab-sharded logits DTensor
                            (``Shard(-1)``), consumed by ``loss_parallel``
==========================  ===================================================

RoPE and document masks need the *global* sequence: with SP the engine always
passes ``position_ids`` (``arange(T)`` when the batch has none), so the rotary
table is indexed with full positions even though the embedding output is a shard.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from model.config import ModelConfig


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) the gradient over ``group`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class ReplicatedKVHeads(ParallelStyle):
    """K/V projection when the TP degree exceeds the number of KV heads.

    Each TP rank's query heads (``num_heads / tp`` consecutive heads) all read the
    same KV head, ``rank * num_kv_heads // tp``. The weight stays whole and
    replicated (a ``Replicate`` DTensor on the TP mesh); each rank projects only the
    rows of its KV head, so its local output holds exactly one head ``(B, T, hd)``.
    Ranks sharing a head hold partial weight gradients, summed over the TP group in
    backward; the input gradient is marked ``Partial`` like a column-parallel one.
    """

    def __init__(self, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"ReplicatedKVHeads expects nn.Linear, got {type(module).__name__}")
        for name, param in list(module.named_parameters(recurse=False)):
            dparam = nn.Parameter(distribute_tensor(param, device_mesh, [Replicate()], src_data_rank=None),
                                  requires_grad=param.requires_grad)
            module.register_parameter(name, dparam)
        head = device_mesh.get_local_rank() * self.num_kv_heads // device_mesh.size()
        rows = slice(head * self.head_dim, (head + 1) * self.head_dim)
        module.forward = functools.partial(_kv_head_forward, module, rows, device_mesh)
        return module


def _kv_head_forward(module: nn.Linear, rows: slice, mesh: DeviceMesh, x: torch.Tensor) -> torch.Tensor:
    """(B, T, d) replicated input -> (B, T, hd) projection onto this rank's KV head."""
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    x_local = x.to_local(grad_placements=[Partial()])          # (B, T, d), grad is partial
    group = mesh.get_group()
    weight = _SumGradOverGroup.apply(module.weight.to_local(), group)[rows]   # (hd, d)
    bias = None
    if module.bias is not None:
        bias = _SumGradOverGroup.apply(module.bias.to_local(), group)[rows]
    return F.linear(x_local, weight, bias)


def kv_projection_style(cfg: ModelConfig, tp: int) -> ParallelStyle:
    """Column-parallel K/V when tp divides the KV heads, else replicated KV heads."""
    if cfg.num_kv_heads % tp == 0:
        return ColwiseParallel()
    return ReplicatedKVHeads(cfg.num_kv_heads, cfg.head_dim)


def block_plan(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan for one transformer block (attention + MLP), keyed by submodule path."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": kv_projection_style(cfg, tp),
        "attention.wv": kv_projection_style(cfg, tp),
        "attention.wo": RowwiseParallel(output_layouts=residual),
        "mlp.w1": ColwiseParallel(),
        "mlp.w3": ColwiseParallel(),
        "mlp.w2": RowwiseParallel(output_layouts=residual),
    }
    if sequence_parallel:
        plan.update({
            "attention_norm": SequenceParallel(),
            "mlp_norm": SequenceParallel(),
            # all-gather the sequence shard once per sub-layer; AttnInputs passes through
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None),
                                            desired_input_layouts=(Replicate(), None)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, cfg: ModelConfig,
                          sequence_parallel: bool) -> None:
    """Shard ``model`` (a Transformer or a pipeline stage of one) over ``tp_mesh`` in place."""
    tp = tp_mesh.size()
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, ParallelStyle] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if getattr(model, "norm", None) is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        top["output"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1),
                                        use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(cfg, tp, sequence_parallel))
