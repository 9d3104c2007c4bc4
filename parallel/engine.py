"""The training engine: a model with its parallelism applied, forward/backward of a step.

The step (:mod:`pretrain.step`) sees only the :class:`TrainEngine` interface:
``model_parts`` (the modules this rank owns, for the optimizer and checkpoints),
``forward_backward`` over the micro-batches of one optimizer step, ``eval_loss``,
``clip_grad_norm_`` and the step statistics (``stats`` / ``reduce_stats``).

``build_engine`` builds the single-device model on the meta device, cuts pipeline
stages when ``pp > 1``, then applies parallelism to each part in the fixed order

    tensor/sequence parallel -> activation checkpointing -> torch.compile -> FSDP2

and only then materializes and initializes the weights (each parameter from its
own (seed, name) generator, so every layout starts from the single-device weights).

Loss convention, identical in every layout: the loss of a step is the mean token
cross-entropy over every loss token of the step (all micro-batches, all data-parallel
ranks; labels of -100 and ``loss_mask == 0`` excluded). Each micro-batch contributes
its token *sum* divided by the step's global token count, counted on the device and
all-reduced over the data-parallel group before the first forward (no host wait), so a
loss mask with uneven counts per micro-batch or rank gives exactly the single-process
loss and gradients. FSDP averages gradients over the dp ranks, so each rank's sum is
multiplied by the dp size. Auxiliary losses that modules attach
(:func:`model.hooks.add_aux_loss`) are averaged over the micro-batches of the step and
the dp ranks with the same mechanics. With pipelining the last stage computes the
main loss and every rank returns it. Nothing here reads a value back to the host.

The loss itself is an object the engine receives (:mod:`parallel.loss`): it gives each
micro-batch's token-loss sum and may report statistics (reduced with the others, then
turned into logged values by its ``finish``). Batch keys it needs beyond the labels
(``extra_keys``, e.g. the per-source loss's ``source`` one-hot) are moved to the device
and, with pipelining, ride to the last stage as extra target columns. The default,
:class:`parallel.loss.PerSourceLoss`, logs each blended dataset's exact token mean
(``data.per_source_loss``) when the batches carry sources.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from polytron.model.config import ModelConfig
from polytron.model.hooks import StatsCollector, step_scope
from polytron.model.transformer import Transformer, cross_entropy_sum
from polytron.parallel.activation_checkpoint import apply_activation_checkpointing, apply_compile, compiled_loss
from polytron.parallel.config import ParallelConfig
from polytron.parallel.loss import TokenLoss, default_loss, plain
from polytron.parallel.mesh import LayoutError, ParallelDims
from polytron.parallel.runtime import autocast_context

if TYPE_CHECKING:
    from polytron.parallel.fp8 import FP8

Batch = dict[str, torch.Tensor]
SIDE_INPUTS = ("position_ids", "doc_ids")


def labels_of(mb: Batch) -> torch.Tensor:
    """The micro-batch's labels with ``loss_mask == 0`` positions set to -100 (B, T)."""
    labels = mb["labels"]
    if "loss_mask" in mb:
        labels = labels.masked_fill(mb["loss_mask"] == 0, -100)
    return labels


def model_inputs(mb: Batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(tokens, kwargs) of a micro-batch moved to ``device``."""
    kwargs = {k: mb[k].to(device, non_blocking=True) for k in SIDE_INPUTS if k in mb}
    return mb["tokens"].to(device, non_blocking=True), kwargs


def total_grad_norm(params: Sequence[torch.Tensor], pp_group=None) -> torch.Tensor:
    """L2 norm of all gradients across every shard and pipeline stage (fp32 scalar).

    Gradients are grouped by kind (plain, or DTensor with a given mesh and placements)
    so each group is one foreach norm; a sharded group's norm is completed over its
    mesh; squared stage norms are summed over the pipeline group.
    """
    from torch.distributed.tensor import DTensor
    groups: dict = {}
    for p in params:
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
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

    #: The FP8 plan applied to the parts (None: no FP8); set by :func:`build_engine`.
    fp8: Optional[FP8]
    #: Run after each optimizer update (:class:`pretrain.step.TrainStep`); set by :func:`build_engine`.
    post_optimizer_hooks: list[Callable[[], None]]
    #: Per-rank state of the engine's features, checkpointed per rank (name -> state).
    rank_states: dict[str, FP8]

    def __init__(self, model_parts: Sequence[nn.Module], dims: ParallelDims, mesh, device: torch.device,
                 dtype: torch.dtype, sequence_parallel: bool = False, fsdp: bool = False,
                 compile_loss: bool = False, loss: Optional[TokenLoss] = None):
        self.model_parts: list[nn.Module] = list(model_parts)
        self.model = model_parts[0]
        self.dims = dims
        self.mesh = mesh
        self.device = device
        self.dtype = dtype
        self.sequence_parallel = sequence_parallel and dims.tp > 1
        self.fsdp = fsdp
        self.is_last_stage = True
        self.stats = StatsCollector()
        # logits are plain tensors unless tp shards the vocabulary (then loss_parallel, eager)
        self.loss = default_loss(loss).with_sum_fn(
            compiled_loss(cross_entropy_sum) if compile_loss and dims.tp == 1 else cross_entropy_sum)

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
        return tokens, kwargs, labels_of(mb).to(self.device, non_blocking=True)

    def _loss_sum(self, mb: Batch) -> torch.Tensor:
        tokens, kwargs, labels = self._inputs(mb)
        with self._amp():
            logits = self.model(tokens, **kwargs)                      # (B, T, V), maybe vocab-sharded
        return self.loss.token_sum(logits, labels, self._loss_extra(mb))

    def _loss_extra(self, mb: Batch) -> Batch:
        """The loss's extra batch keys present in ``mb``, on the device (each (B, K))."""
        return {k: mb[k].to(self.device, non_blocking=True) for k in self.loss.extra_keys if k in mb}

    def _set_grad_sync(self, enabled: bool) -> None:
        from torch.distributed.fsdp import FSDPModule
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(enabled)

    def global_tokens(self, microbatches: list[Batch]) -> torch.Tensor:
        """Loss tokens of the whole step over the dp ranks (device scalar, >= 1; counted and
        all-reduced on the device, so the host never waits)."""
        count = torch.zeros((), device=self.device)
        for mb in microbatches:
            count += (labels_of(mb).to(self.device, non_blocking=True) != -100).sum()
        from polytron.parallel.context import TEST_FAULTS
        return self.reduce_sum(count, over_cp="per_rank_loss" not in TEST_FAULTS).clamp_min(1.0)

    # ------------------------------------------------------------ interface

    def forward_backward(self, microbatches: list[Batch]) -> torch.Tensor:
        """Accumulate the step's gradients; returns the step's token-mean loss (device scalar)."""
        microbatches = self.cp_shard(microbatches)
        n = len(microbatches)
        tokens = self.global_tokens(microbatches)
        scale = self.dims.dp / tokens                  # FSDP then averages over the dp ranks
        total = torch.zeros((), device=self.device)
        with step_scope(aux_scale=1.0 / n, stats=self.stats):
            for i, mb in enumerate(microbatches):
                self._set_grad_sync(i == n - 1)     # reduce-scatter only after the last micro-batch
                with self._loss_ctx():
                    loss = self._loss_sum(mb)
                    (loss * scale).backward()
                total += plain(loss.detach()).float()
        self.sync_cp_grads()
        return self.reduce_sum(total) / tokens

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Batch]) -> torch.Tensor:
        """Token-mean validation loss over the given micro-batches and the dp group (device)."""
        for m in self.model_parts:
            m.eval()
        microbatches = self.cp_shard(microbatches)
        tokens = self.global_tokens(microbatches)
        total = torch.zeros((), device=self.device)
        for mb in microbatches:
            with self._loss_ctx():
                total += plain(self._loss_sum(mb)).float()
        for m in self.model_parts:
            m.train()
        return self.reduce_sum(total) / tokens

    def reduce_sum(self, value: torch.Tensor, over_cp: bool = True) -> torch.Tensor:
        """Sum a device scalar over the data-parallel ranks, and the context-parallel ranks
        (each holds part of every sequence) unless ``over_cp`` is false (asynchronous)."""
        if self.mesh is not None and self.dims.cp > 1 and over_cp:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.mesh["dp_cp"].get_group())
        elif self.mesh is not None and self.dims.dp > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.mesh["dp"].get_group())
        return value

    def cp_shard(self, microbatches: list[Batch]) -> list[Batch]:
        """Under context parallelism, this rank's two chunks of every token-indexed key."""
        if self.dims.cp == 1:
            return microbatches
        from polytron.parallel.context import shard_batch
        rank = self.mesh["cp"].get_local_rank()
        return [shard_batch(mb, self.dims.cp, rank) for mb in microbatches]

    def sync_cp_grads(self) -> None:
        """Sum the gradients over the cp ranks (each computed them from its own tokens; the
        loss is already normalized by the whole sequence's token count). One flat all-reduce
        per group (expert groups spanning cp ranks: parallel/expert_parallel.cp_grad_groups)."""
        if self.dims.cp == 1:
            return
        from torch.distributed.tensor import DTensor

        from polytron.parallel.expert_parallel import cp_grad_groups
        for params, group in cp_grad_groups(self.model_parts, self.mesh, self.dims):
            grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                     for p in params if p.grad is not None]
            if not grads:
                continue
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))

    def _pp_group(self):
        return None

    def _counted(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters the gradient norm counts (each parameter of the model once)."""
        return params

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (all shards, all stages) on the device; returns the
        norm before clipping as a device scalar (nothing is read back)."""
        params = [p for m in self.model_parts for p in m.parameters() if p.grad is not None]
        norm = total_grad_norm(self._counted(params), self._pp_group())
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            groups: dict = {}
            for p in params:
                groups.setdefault((type(p.grad), getattr(p.grad, "device_mesh", None),
                                   tuple(getattr(p.grad, "placements", ()))), []).append(p.grad)
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
        return norm

    def reduce_stats(self) -> dict[str, float]:
        """The statistics modules reported since the last call, reduced over micro-batches,
        steps, data-parallel ranks and pipeline stages (a host synchronization: call it at
        log intervals only). ``mean`` averages over every report, ``sum`` adds them, ``max``
        takes the largest. Values are the same on tensor-parallel peers (model.hooks)."""
        local = dict(self.stats.values)
        self.stats.clear()
        kinds = _gather_kinds({n: v[0] for n, v in local.items()})
        if not kinds:
            return {}
        names = sorted(kinds)
        sums = torch.zeros(len(names), 2, device=self.device)           # (names, [sum, count])
        maxes = torch.full((len(names),), float("-inf"), device=self.device)
        for i, n in enumerate(names):
            if n in local:
                kind, value, count = local[n]
                sums[i, 1] = count
                if kind == "max":
                    maxes[i] = value
                else:
                    sums[i, 0] = value
        if self.mesh is not None:
            group = self.mesh["pp_dp_cp" if self.dims.cp > 1 else "pp_dp"].get_group()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        out = {}
        for n, (total, count), top in zip(names, sums.tolist(), maxes.tolist()):
            kind = kinds[n]
            out[n] = top if kind == "max" else (total / count if kind == "mean" else total)
        return self.loss.finish(out)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Unsharded copies of this rank's parameters by global FQN (a collective over the
        rank's dp/tp peers; every rank must call it)."""
        out = {}
        for part in self.model_parts:
            for name, p in part.named_parameters():
                out[name] = plain(p.detach()).clone().cpu()
        return out


def _gather_kinds(mine: dict[str, str]) -> dict[str, str]:
    """Statistic name -> reduction, over the names reported on any rank."""
    everyone: list[Optional[dict[str, str]]] = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return {n: k for d in everyone for n, k in (d or {}).items()}


class PipelineEngine(TrainEngine):
    """Pipelined engine: this rank's stage modules run under a ``torch.distributed.pipelining``
    schedule, with the step's micro-batches as the schedule's micro-batches."""

    def __init__(self, model_parts: Sequence[nn.Module], stage_indices: list[int], dims: ParallelDims,
                 mesh, device: torch.device, dtype: torch.dtype, schedule: str,
                 sequence_parallel: bool = False, fsdp: bool = False, compile_loss: bool = False,
                 loss: Optional[TokenLoss] = None):
        super().__init__(model_parts, dims, mesh, device, dtype, sequence_parallel, fsdp, compile_loss, loss)
        self.stage_indices = stage_indices
        self.schedule_name = schedule
        self.pp_group = mesh["pp"].get_group()
        self.is_first_stage = 0 in stage_indices
        self.is_last_stage = dims.num_stages - 1 in stage_indices
        self._schedules: dict[tuple[int, bool], object] = {}
        self._scale = torch.ones((), device=device)     # this step's loss scale (dp / tokens)
        self._extra_widths: list[tuple[str, int]] = []  # the loss's extra columns in the target
        self.tied_group = None      # the embedding group, when a tied pair spans stages (build_engine)
        if dtype != torch.float32 and not fsdp:
            for part in model_parts:      # autocast each stage's forward only, not the backward
                part.forward = _autocast_forward(part.forward, device, dtype)

    def _pp_group(self):
        return self.pp_group

    def _counted(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """Without the last stage's copies of tied parameters (the first stage counts them)."""
        from polytron.parallel.pipeline import tied_copies
        copies = {id(part.get_parameter(local)) for part in self.model_parts
                  for local, source in tied_copies(part).items() if local != source}
        return [p for p in params if id(p) not in copies]

    def _schedule(self, n: int, train: bool):
        """Schedule for ``n`` micro-batches (cached; eval gets its own stages and schedule)."""
        key = (n, train)
        if key not in self._schedules:
            from torch.distributed.pipelining import PipelineStage

            from polytron.parallel.pipeline import schedule_class
            stages = [PipelineStage(part, idx, self.dims.num_stages, self.device, group=self.pp_group)
                      for part, idx in zip(self.model_parts, self.stage_indices)]
            for stage in stages:
                _quiet_metadata_inference(stage)

            def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                # token sum x (dp / global tokens): the schedule's sum over micro-batches is the mean
                labels, extra = self._split_target(target)
                return self.loss.token_sum(logits, labels, extra) * self._scale

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
        """Run the schedule over the concatenated micro-batches; token-mean loss on every rank."""
        microbatches = self.cp_shard(microbatches)
        n = len(microbatches)
        tokens_total = self.global_tokens(microbatches)
        self._scale = self.dims.dp / tokens_total
        parts = [self._inputs(mb) for mb in microbatches]
        tokens = torch.cat([p[0] for p in parts])                    # (n*B, T)
        labels = torch.cat([p[2] for p in parts])
        labels = self._join_target(labels, microbatches)
        kwargs = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        args = (tokens,) if self.is_first_stage else ()
        target = labels if self.is_last_stage else None
        losses: list[torch.Tensor] = []
        schedule = self._schedule(n, train)
        with self._loss_ctx(), step_scope(aux_scale=1.0 / n, stats=self.stats if train else None):
            if train:
                schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                schedule.eval(*args, target=target, losses=losses, **kwargs)
        if train:
            self.sync_cp_grads()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        if self.is_last_stage:
            total = sum(plain(loss.detach()).float() for loss in losses) / self.dims.dp + total
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.pp_group)   # from the last stage
        return self.reduce_sum(total)

    def _join_target(self, labels: torch.Tensor, microbatches: list[Batch]) -> torch.Tensor:
        """(n*B, T + sum K): the loss's extra keys ride after the labels as target columns."""
        keys = [k for k in self.loss.extra_keys if k in microbatches[0]]
        self._extra_widths = [(k, microbatches[0][k].shape[1]) for k in keys]
        extra = [torch.cat([mb[k] for mb in microbatches]).to(self.device, labels.dtype) for k in keys]
        return torch.cat([labels, *extra], dim=1) if extra else labels

    def _split_target(self, target: torch.Tensor) -> tuple[torch.Tensor, Batch]:
        """Inverse of :meth:`_join_target` on a micro-batch's target: (labels (B, T), extras)."""
        width = sum(w for _, w in self._extra_widths)
        labels, extra, start = target[:, :target.shape[1] - width], {}, target.shape[1] - width
        for key, w in self._extra_widths:
            extra[key], start = target[:, start:start + w], start + w
        return labels, extra

    def forward_backward(self, microbatches: list[Batch]) -> torch.Tensor:
        """One pipelined step; FSDP gradient sync is left to the schedule (last backward only);
        the copies of a tied pair then get their summed gradient."""
        loss = self._run(microbatches, train=True)
        if self.tied_group is not None:
            from polytron.parallel.pipeline import sync_tied_grads
            sync_tied_grads(self.model_parts, self.tied_group)
        return loss

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """As :meth:`TrainEngine.full_parameters`; a tied copy under the unsplit model's name."""
        from polytron.parallel.pipeline import tied_copies
        out = super().full_parameters()
        for part in self.model_parts:
            for local, source in tied_copies(part).items():
                out[source] = out.pop(local)
        return out

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Batch]) -> torch.Tensor:
        for m in self.model_parts:
            m.eval()
        try:
            return self._run(microbatches, train=False)
        finally:
            for m in self.model_parts:
                m.train()


def _quiet_metadata_inference(stage) -> None:
    """The schedule's first step runs each stage once on placeholder inputs to learn the
    shapes it sends; nothing of that forward may reach the step statistics."""
    for name in ("_forward_metadata_inference", "_shape_inference"):   # torch >= 2.12 / older
        inner = getattr(stage, name, None)
        if inner is not None:
            setattr(stage, name, _without_stats(inner))


def _without_stats(fn):
    def wrapped(*args, **kwargs):
        with step_scope(aux_scale=0.0, stats=None):
            return fn(*args, **kwargs)
    return wrapped


def _autocast_forward(forward, device: torch.device, dtype: torch.dtype):
    """``forward`` run under autocast (pipeline stages are called by the schedule)."""
    def wrapped(*args, **kwargs):
        with autocast_context(device, dtype):
            return forward(*args, **kwargs)
    return wrapped


# ---------------------------------------------------------------- building

def parallelize(part: Transformer, model_cfg: ModelConfig, pcfg: ParallelConfig, dims: ParallelDims,
                mesh, dtype: torch.dtype, fp8=None) -> bool:
    """Apply FP8 -> TP/SP -> activation checkpointing -> compile -> FSDP to one model part.

    ``fp8`` (a :class:`parallel.fp8.FP8` plan) converts the selected projections first:
    the tensor-parallel styles then see the FP8 modules. Returns whether FSDP was applied.
    """
    if fp8 is not None:
        fp8.convert(part)
    if dims.tp > 1:
        from polytron.parallel.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(part, mesh["tp"], pcfg.sequence_parallel)
    apply_activation_checkpointing(part, pcfg.activation_checkpoint)
    if pcfg.compile:
        apply_compile(part)
    if dims.dp > 1 or dims.ep > 1:     # ep > 1 at dp = 1: expert groups of cp ranks
        from polytron.parallel.fsdp import apply_fsdp
        reduce_dtype = torch.float32 if pcfg.fsdp_reduce_dtype == "fp32" else dtype
        reshard = {"auto": dims.pp == 1, "always": True, "never": False}[pcfg.fsdp_reshard_after_forward]
        apply_fsdp(part, mesh, dims, param_dtype=dtype, reduce_dtype=reduce_dtype,
                   reshard_after_forward=reshard)
        return True
    return False


def materialize(part: Transformer, device: torch.device, seed: int) -> None:
    """Allocate a meta-built (possibly sharded) part on ``device`` and initialize it."""
    part.to_empty(device=device)
    part.tie_weights()
    part.init_weights(seed)


def _tie_stages(parts: Sequence[nn.Module], model_cfg: ModelConfig, dims: ParallelDims, mesh):
    """With tied parameters under pipelining (the embedding on the first stage, the head on
    the last): the embedding group, with the last stage's copy set to the first stage's
    initial value. None for an untied model; every rank decides alike (from the config)."""
    from polytron.model.spec import get_spec
    from polytron.parallel.pipeline import init_tied_copies, tied_group
    if not get_spec(model_cfg.arch).tied(model_cfg):
        return None
    group = tied_group(mesh, dims)
    init_tied_copies(parts, group)           # nothing to do on a middle pipeline rank
    return group


def build_engine(model_cfg: ModelConfig, pcfg: ParallelConfig, dims: ParallelDims, mesh,
                 device: torch.device, dtype: torch.dtype, seed: int, fp8_cfg=None,
                 loss: Optional[TokenLoss] = None) -> TrainEngine:
    """Build the model on meta, apply parallelism, materialize on ``device`` and initialize.

    ``fp8_cfg`` (``precision.fp8``) makes the engine's ``fp8`` plan; its post-optimizer
    hooks are the engine's ``post_optimizer_hooks`` (run by :class:`pretrain.step.TrainStep`)
    and its scaling state one of the engine's ``rank_states`` (checkpointed per rank).
    ``loss`` is the training loss (:mod:`parallel.loss`; default: per-source aware)."""
    from polytron.parallel.fp8 import build_fp8
    fp8 = build_fp8(fp8_cfg, dims, mesh, device)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    if dims.pp > 1:
        from polytron.parallel.pipeline import cut_stage, split_layers, stage_ids, stage_units
        blocks = sum(u.kind == "block" for u in model.units)
        stages = stage_units(model.units, split_layers(blocks, dims.num_stages, pcfg.pipeline_split or None))
        ids = stage_ids(mesh["pp"].get_local_rank(), dims.pp, dims.virtual_stages)
        parts = [cut_stage(model, stages, s) for s in ids]
    else:
        ids, parts = [0], [model]
    fsdp = False
    for part in parts:
        fsdp = parallelize(part, model_cfg, pcfg, dims, mesh, dtype, fp8)
    if dims.cp > 1:
        from polytron.parallel.context import apply_context_parallel
        for part in parts:
            apply_context_parallel(part, mesh["cp"].get_group(), pcfg.context_kind)
    for part in parts:
        materialize(part, device, seed)
    sp = pcfg.sequence_parallel
    engine: TrainEngine
    if dims.pp > 1:
        engine = PipelineEngine(parts, ids, dims, mesh, device, dtype, pcfg.pipeline_schedule, sp, fsdp,
                                pcfg.compile, loss)
        engine.tied_group = _tie_stages(parts, model_cfg, dims, mesh)
    else:
        engine = TrainEngine(parts, dims, mesh, device, dtype, sp, fsdp, pcfg.compile, loss)
    engine.fp8 = fp8
    engine.post_optimizer_hooks = fp8.post_optimizer_hooks() if fp8 is not None else []
    # per-rank state the engine's features checkpoint (pretrain.checkpoint.rank_state)
    engine.rank_states = {"fp8": fp8} if fp8 is not None else {}
    return engine
