"""The training engine: a model with its parallelism applied, and one training step.

The trainer sees only :class:`TrainEngine`: ``model_parts`` (the modules this
rank owns, for the optimizer and checkpoints), ``forward_backward`` over the
micro-batches of one optimizer step, ``eval_loss`` and ``clip_grad_norm_``.
Parallelism is applied to the single-device model in the fixed order
TP/SP -> activation checkpointing -> compile -> FSDP.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.transformer import Transformer, cross_entropy
from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims

Batch = dict[str, torch.Tensor]


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_inputs(mb: Batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(tokens, kwargs) of a micro-batch moved to ``device``."""
    kwargs = {k: mb[k].to(device, non_blocking=True) for k in ("position_ids", "doc_ids") if k in mb}
    return mb["tokens"].to(device, non_blocking=True), kwargs


class TrainEngine:
    """Non-pipelined engine: one model part, micro-batches run one after another."""

    def __init__(self, model: nn.Module, dims: ParallelDims, mesh, device: torch.device,
                 dtype: torch.dtype):
        self.model = model
        self.model_parts = [model]
        self.dims = dims
        self.mesh = mesh
        self.device = device
        self.dtype = dtype
        self.is_last_stage = True

    def _loss(self, mb: Batch) -> torch.Tensor:
        tokens, kwargs = model_inputs(mb, self.device)
        with autocast_context(self.device, self.dtype):
            logits = self.model(tokens, **kwargs)                       # (B, T, V)
        return cross_entropy(logits, mb["labels"].to(self.device))

    def _set_grad_sync(self, enabled: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)

    def forward_backward(self, microbatches: list[Batch]) -> torch.Tensor:
        """Accumulate gradients over the step's micro-batches; mean loss over the dp group."""
        n = len(microbatches)
        total = torch.zeros((), device=self.device)
        for i, mb in enumerate(microbatches):
            self._set_grad_sync(i == n - 1)     # reduce-scatter only after the last micro-batch
            loss = self._loss(mb)
            (loss / n).backward()
            total += loss.detach()
        return self.reduce_mean(total / n)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Batch]) -> float:
        """Mean validation loss over the given micro-batches and the dp group."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for mb in microbatches:
            total += self._loss(mb)
        self.model.train()
        return self.reduce_mean(total / max(len(microbatches), 1)).item()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a scalar over the data-parallel ranks."""
        if self.mesh is not None and self.dims.dp > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.mesh["dp"].get_group())
            value = value / self.dims.dp
        return value

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm (over all shards); returns the norm before clipping."""
        params = [p for m in self.model_parts for p in m.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"),
                                              foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)


def apply_fsdp(model: Transformer, mesh, dims: ParallelDims) -> None:
    """FSDP2 over the dp_shard dim (HSDP over dp_replicate x dp_shard), per block then root."""
    from torch.distributed.fsdp import fully_shard
    if dims.dp_replicate > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard"]
    else:
        dp_mesh = mesh["dp_shard"]
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def build_engine(model_cfg: ModelConfig, pcfg: ParallelConfig, dims: ParallelDims, mesh,
                 device: torch.device, dtype: torch.dtype, seed: int) -> TrainEngine:
    """Build the model on meta, apply parallelism, materialize on ``device`` and initialize."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    if dims.dp > 1:
        apply_fsdp(model, mesh, dims)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return TrainEngine(model, dims, mesh, device, dtype)
