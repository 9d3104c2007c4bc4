"""The training engine: a model with its parallelism applied, and one training step.

The trainer sees only the :class:`TrainEngine` interface: ``model_parts`` (the
modules this rank owns, for the optimizer and checkpoints), ``forward_backward`` over
the micro-batches of one optimizer step, ``eval_loss`` and ``clip_grad_norm_``.

``build_engine`` builds the single-device model on the meta device, cuts pipeline
stages when ``pp > 1``, then applies parallelism to each part in the fixed order

    tensor/sequence parallel -> activation checkpointing -> torch.compile -> FSDP2

and only then materializes and initializes the weights (each parameter from its
own (seed, name) generator, so every layout starts from the single-device weights).

Loss convention, identical in every layout: each micro-batch's loss is the mean
token cross-entropy; a step's loss is the mean over its micro-batches (gradients are
those of that mean) and over the data-parallel ranks. With pipelining the last stage
computes it and every rank returns it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.transformer import Transformer, cross_entropy
from parallel.activation_checkpoint import apply_activation_checkpointing, apply_compile, compiled_loss
from parallel.config import ParallelConfig
from parallel.mesh import LayoutError, ParallelDims

Batch = dict[str, torch.Tensor]
SIDE_INPUTS = ("position_ids", "doc_ids")


def autocast_context(device: torch.device, dtype: torch.dtype,
                     enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision; a no-op in fp32 or when FSDP casts parameters."""
    if dtype == torch.float32 or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_inputs(mb: Batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(tokens, kwargs) of a micro-batch moved to ``device``."""
    kwargs = {k: mb[k].to(device, non_blocking=True) for k in SIDE_INPUTS if k in mb}
    return mb["tokens"].to(device, non_blocking=True), kwargs


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as a plain tensor (no-op for plain tensors)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def total_grad_norm(params: list[torch.Tensor], pp_group=None) -> torch.Tensor:
    """L2 norm of all gradients across every shard and pipeline stage (fp32 scalar).

    Gradients are grouped by kind (plain, or DTensor with a given mesh and placements)
    so each group is one foreach norm; a sharded group's norm is completed over its
    mesh; squared stage norms are summed over the pipeline group.
    """
    groups: dict = {}
    for p in params:
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if hasattr(g, "device_mesh") else None
        groups.setdefault(key, []).append(g)
    device = params[0].device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        sq = sq + plain(norm).float() ** 2
    if pp_group is not None:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pp_group)
    return sq.sqrt()


class TrainEngine:
    """Non-pipelined engine: one model part, micro-batches run one after another."""

    def __init__(self, model_parts: list[nn.Module], dims: ParallelDims, mesh, device: torch.device,
                 dtype: torch.dtype, sequence_parallel: bool = False, fsdp: bool = False,
                 compile_loss: bool = False):
        self.model_parts = model_parts
        self.model = model_parts[0]
        self.dims = dims
        self.mesh = mesh
        self.device = device
        self.dtype = dtype
        self.sequence_parallel = sequence_parallel and dims.tp > 1
        self.fsdp = fsdp
        self.is_last_stage = True
        # logits are plain tensors unless tp shards the vocabulary (then loss_parallel, eager)
        self.loss_fn = compiled_loss(cross_entropy) if compile_loss and dims.tp == 1 else cross_entropy

    # ------------------------------------------------------------ helpers

    def _amp(self) -> contextlib.AbstractContextManager:
        # FSDP2's mixed-precision policy already runs the blocks in the compute dtype
        return autocast_context(self.device, self.dtype, enabled=not self.fsdp)

    def _loss_ctx(self) -> contextlib.AbstractContextManager:
        """Vocab-parallel cross-entropy over tp-sharded logits (forward and backward)."""
        if self.dims.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel
            return loss_parallel()
        return contextlib.nullcontext()

    def _inputs(self, mb: Batch) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(tokens, side inputs, labels) on device; adds position_ids under sequence parallel."""
        tokens, kwargs = model_inputs(mb, self.device)
        if self.sequence_parallel:
            B, T = tokens.shape
            if T % self.dims.tp:
                raise LayoutError(f"sequence parallel: sequence length {T} is not divisible by "
                                  f"parallel.tensor={self.dims.tp}")
            if "position_ids" not in kwargs:
                # RoPE must index the global positions; the embedding output is a sequence shard
                kwargs["position_ids"] = torch.arange(T, device=self.device).expand(B, T)
        return tokens, kwargs, mb["labels"].to(self.device, non_blocking=True)

    def _loss(self, mb: Batch) -> torch.Tensor:
        tokens, kwargs, labels = self._inputs(mb)
        with self._amp():
            logits = self.model(tokens, **kwargs)                      # (B, T, V), maybe vocab-sharded
        return self.loss_fn(logits, labels)

    def _set_grad_sync(self, enabled: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)

    # ------------------------------------------------------------ interface

    def forward_backward(self, microbatches: list[Batch]) -> torch.Tensor:
        """Accumulate gradients over the step's micro-batches; mean loss over the dp group."""
        n = len(microbatches)
        total = torch.zeros((), device=self.device)
        for i, mb in enumerate(microbatches):
            self._set_grad_sync(i == n - 1)     # reduce-scatter only after the last micro-batch
            with self._loss_ctx():
                loss = self._loss(mb)
                (loss / n).backward()
            total += plain(loss.detach())
        return self.reduce_mean(total / n)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Batch]) -> float:
        """Mean validation loss over the given micro-batches and the dp group."""
        for m in self.model_parts:
            m.eval()
        total = torch.zeros((), device=self.device)
        for mb in microbatches:
            with self._loss_ctx():
                total += plain(self._loss(mb))
        for m in self.model_parts:
            m.train()
        return self.reduce_mean(total / max(len(microbatches), 1)).item()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a scalar over the data-parallel ranks."""
        if self.mesh is not None and self.dims.dp > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.mesh["dp"].get_group())
            value = value / self.dims.dp
        return value

    def _pp_group(self):
        return None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm (all shards, all stages); returns the norm before clipping."""
        params = [p for m in self.model_parts for p in m.parameters() if p.grad is not None]
        norm = total_grad_norm(params, self._pp_group())
        if max_norm > 0:
            coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
            groups: dict = {}
            for p in params:
                groups.setdefault((type(p.grad), getattr(p.grad, "device_mesh", None),
                                   tuple(getattr(p.grad, "placements", ()))), []).append(p.grad)
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
        return float(norm)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Unsharded copies of this rank's parameters by global FQN (a collective over the
        rank's dp/tp peers; every rank must call it)."""
        out = {}
        for part in self.model_parts:
            for name, p in part.named_parameters():
                out[name] = plain(p.detach()).clone().cpu()
        return out


class PipelineEngine(TrainEngine):
    """Pipelined engine: this rank's stage modules run under a ``torch.distributed.pipelining``
    schedule, with the step's micro-batches as the schedule's micro-batches."""

    def __init__(self, model_parts: list[nn.Module], stage_indices: list[int], dims: ParallelDims,
                 mesh, device: torch.device, dtype: torch.dtype, schedule: str,
                 sequence_parallel: bool = False, fsdp: bool = False, compile_loss: bool = False):
        super().__init__(model_parts, dims, mesh, device, dtype, sequence_parallel, fsdp, compile_loss)
        self.stage_indices = stage_indices
        self.schedule_name = schedule
        self.pp_group = mesh["pp"].get_group()
        self.is_first_stage = 0 in stage_indices
        self.is_last_stage = dims.num_stages - 1 in stage_indices
        self._schedules: dict[tuple[int, bool], object] = {}
        if dtype != torch.float32 and not fsdp:
            for part in model_parts:      # autocast each stage's forward only, not the backward
                part.forward = _autocast_forward(part.forward, device, dtype)

    def _pp_group(self):
        return self.pp_group

    def _schedule(self, n: int, train: bool):
        """Schedule for ``n`` micro-batches (cached; eval gets its own stages and schedule)."""
        key = (n, train)
        if key not in self._schedules:
            from torch.distributed.pipelining import PipelineStage
            from parallel.pipeline import schedule_class
            stages = [PipelineStage(part, idx, self.dims.num_stages, self.device, group=self.pp_group)
                      for part, idx in zip(self.model_parts, self.stage_indices)]

            def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                # the schedule sums micro-batch losses: divide so the sum is their mean
                return self.loss_fn(logits, labels) / n

            cls = schedule_class(self.schedule_name, self.dims.virtual_stages)
            single = self.dims.virtual_stages == 1 and cls.__name__ != "ScheduleInterleaved1F1B"
            try:
                self._schedules[key] = cls(stages[0] if single else stages, n_microbatches=n,
                                           loss_fn=loss_fn, scale_grads=False)
            except ValueError as e:
                raise LayoutError(f"pipeline schedule {cls.__name__} with {n} micro-batches per step "
                                  f"on {self.dims.pp} pipeline ranks: {e}") from e
        return self._schedules[key]

    def _run(self, microbatches: list[Batch], train: bool) -> torch.Tensor:
        """Run the schedule over the concatenated micro-batches; mean loss on every rank."""
        n = len(microbatches)
        parts = [self._inputs(mb) for mb in microbatches]
        tokens = torch.cat([p[0] for p in parts])                    # (n*B, T)
        labels = torch.cat([p[2] for p in parts])
        kwargs = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        args = (tokens,) if self.is_first_stage else ()
        target = labels if self.is_last_stage else None
        losses: list[torch.Tensor] = []
        schedule = self._schedule(n, train)
        with self._loss_ctx():
            if train:
                schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                schedule.eval(*args, target=target, losses=losses, **kwargs)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        if self.is_last_stage:
            total = sum(plain(l.detach()).float() for l in losses) + total
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.pp_group)   # from the last stage
        return self.reduce_mean(total)

    def forward_backward(self, microbatches: list[Batch]) -> torch.Tensor:
        """One pipelined step; FSDP gradient sync is left to the schedule (last backward only)."""
        return self._run(microbatches, train=True)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Batch]) -> float:
        if not microbatches:
            return float("nan")
        for m in self.model_parts:
            m.eval()
        try:
            return self._run(microbatches, train=False).item()
        finally:
            for m in self.model_parts:
                m.train()


def _autocast_forward(forward, device: torch.device, dtype: torch.dtype):
    """``forward`` run under autocast (pipeline stages are called by the schedule)."""
    def wrapped(*args, **kwargs):
        with autocast_context(device, dtype):
            return forward(*args, **kwargs)
    return wrapped


# ---------------------------------------------------------------- building

def parallelize(part: nn.Module, model_cfg: ModelConfig, pcfg: ParallelConfig, dims: ParallelDims,
                mesh, dtype: torch.dtype) -> bool:
    """Apply TP/SP -> activation checkpointing -> compile -> FSDP to one model part.

    Returns whether FSDP was applied.
    """
    if dims.tp > 1:
        from parallel.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(part, mesh["tp"], pcfg.sequence_parallel)
    apply_activation_checkpointing(part, pcfg.activation_checkpoint)
    if pcfg.compile:
        apply_compile(part)
    if dims.dp > 1:
        from parallel.fsdp import apply_fsdp
        reduce_dtype = torch.float32 if pcfg.fsdp_reduce_dtype == "fp32" else dtype
        reshard = {"auto": dims.pp == 1, "always": True, "never": False}[pcfg.fsdp_reshard_after_forward]
        apply_fsdp(part, mesh, dims, param_dtype=dtype, reduce_dtype=reduce_dtype,
                   reshard_after_forward=reshard)
        return True
    return False


def materialize(part: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-built (possibly sharded) part on ``device`` and initialize it."""
    part.to_empty(device=device)
    part.tie_weights()
    part.init_weights(seed)


def build_engine(model_cfg: ModelConfig, pcfg: ParallelConfig, dims: ParallelDims, mesh,
                 device: torch.device, dtype: torch.dtype, seed: int) -> TrainEngine:
    """Build the model on meta, apply parallelism, materialize on ``device`` and initialize."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    if dims.pp > 1:
        from parallel.pipeline import cut_stage, split_layers, stage_ids, stage_units
        blocks = sum(u.kind == "block" for u in model.units)
        stages = stage_units(model.units, split_layers(blocks, dims.num_stages, pcfg.pipeline_split or None))
        ids = stage_ids(mesh["pp"].get_local_rank(), dims.pp, dims.virtual_stages)
        parts = [cut_stage(model, stages, s) for s in ids]
    else:
        ids, parts = [0], [model]
    fsdp = False
    for part in parts:
        fsdp = parallelize(part, model_cfg, pcfg, dims, mesh, dtype)
    for part in parts:
        materialize(part, device, seed)
    sp = pcfg.sequence_parallel
    if dims.pp > 1:
        return PipelineEngine(parts, ids, dims, mesh, device, dtype, pcfg.pipeline_schedule, sp, fsdp,
                              pcfg.compile)
    return TrainEngine(parts, dims, mesh, device, dtype, sp, fsdp, pcfg.compile)
