"""Pipeline parallelism: cut the model into stages by its units and pick a schedule.

Stages are contiguous runs of the model's units (:mod:`model.spec`), counted in
``block`` units. ``pp * virtual_stages`` stages in all; pipeline rank ``r`` owns
stages ``r, r + pp, r + 2 pp, ...`` (the looped placement interleaved 1F1B expects).
A stage module is the single-device :class:`~model.transformer.Transformer` with the
units it does not own removed; units keep their global names, so parameter FQNs
(``layers.5.attention.wq.weight``) are the same as in the unsplit model and
checkpoints reshard across pipeline layouts.

Between stages travel the hidden state ``(B, T, d)`` (``(B, T/tp, d)`` with sequence
parallelism) and the live *carry* tensors: those produced on an earlier stage and
consumed on a later one (e.g. YOCO's shared key/value), as further positional
arguments in a fixed (sorted) order; ``torch.distributed.pipelining`` sends each
tensor. Per-sample side inputs (``position_ids``, ``doc_ids``) are not sent: every
pipeline rank of a data-parallel replica reads the same batch, so they are given to
each stage as keyword arguments and chunked per micro-batch by the schedule.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from polytron.model.spec import Unit
from polytron.parallel.mesh import LayoutError, ParallelDims

if TYPE_CHECKING:
    from polytron.model.transformer import Transformer


def split_layers(num_layers: int, num_stages: int, split: list[int] | None = None) -> list[list[int]]:
    """Global layer indices of each stage.

    ``split`` gives the layer count per stage (uneven allowed). Without it the split is
    even, and the ``num_layers % num_stages`` extra layers go to the *first* stages:
    the last stage also runs the output head and the loss, the heaviest non-block work.
    """
    if split:
        if len(split) != num_stages or sum(split) != num_layers or min(split) < 1:
            raise LayoutError(f"parallel.pipeline_split={split}: need {num_stages} positive layer "
                              f"counts summing to {num_layers}")
        counts = list(split)
    else:
        if num_stages > num_layers:
            raise LayoutError(f"{num_stages} pipeline stages but only {num_layers} layers")
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if s < extra else 0) for s in range(num_stages)]
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stage indices owned by pipeline rank ``pp_rank`` (looped placement)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def stage_units(units: list[Unit], layers: list[list[int]]) -> list[list[Unit]]:
    """Units of each stage. ``layers[s]`` are the block indices (position among the
    ``block`` units) of stage ``s``; units before the first block go to the first
    stage, units after the last block to the last stage, and any other non-block unit
    to the stage of the block that follows it."""
    stage_of_block = {b: s for s, blocks in enumerate(layers) for b in blocks}
    out: list[list[Unit]] = [[] for _ in layers]
    block, pending = 0, []
    for unit in units:
        if unit.kind != "block":
            pending.append(unit)
            continue
        s = stage_of_block[block]
        out[s] += pending + [unit]
        pending, block = [], block + 1
    out[-1] += pending
    return out


def stage_carry(stages: list[list[Unit]], s: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(carry names stage ``s`` receives, carry names it hands on)."""
    def produced(lo: int, hi: int) -> set[str]:
        return {n for st in stages[lo:hi] for u in st for n in u.produces}

    def consumed(lo: int, hi: int) -> set[str]:
        return {n for st in stages[lo:hi] for u in st for n in u.consumes}
    n = len(stages)
    carry_in = produced(0, s) & consumed(s, n)
    carry_out = produced(0, s + 1) & consumed(s + 1, n)
    return tuple(sorted(carry_in)), tuple(sorted(carry_out))


def cut_stage(model: Transformer, stages: list[list[Unit]], s: int) -> Transformer:
    """Stage ``s``: a deep copy of the (meta) ``model`` keeping only that stage's units."""
    stage = copy.deepcopy(model)
    carry_in, carry_out = stage_carry(stages, s)
    stage.keep_units([u.name for u in stages[s]], carry_in, carry_out)
    return stage


def schedule_class(name: str, virtual_stages: int):
    """The ``torch.distributed.pipelining`` schedule for ``parallel.pipeline_schedule``."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    if virtual_stages > 1:
        if name == "gpipe":
            raise LayoutError("parallel.pipeline_schedule=gpipe does not support virtual_stages > 1; "
                              "use interleaved_1f1b")
        return ScheduleInterleaved1F1B
    return {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe,
            "interleaved_1f1b": ScheduleInterleaved1F1B}[name]


# ---------------------------------------------------------------- tied parameters across stages

def tied_copies(part: nn.Module) -> dict[str, str]:
    """Tied parameters whose pair is split over pipeline stages, as this part holds them:
    local name -> the name the unsplit model uses (the source of the tie, e.g.
    ``{"output.weight": "tok_embeddings.weight"}`` on the last stage and
    ``{"tok_embeddings.weight": "tok_embeddings.weight"}`` on the first). Empty for a
    part holding both sides (no pipeline) or neither, and for modules without a spec."""
    spec, cfg = getattr(part, "spec", None), getattr(part, "cfg", None)
    if spec is None:
        return {}
    names = {n for n, _ in part.named_parameters(remove_duplicate=False)}
    return {(name if name in names else source): source for name, source in spec.tied(cfg)
            if (name in names) != (source in names)}


def tied_group(mesh, dims: ParallelDims):
    """Megatron's embedding group: the first and last pipeline ranks of this rank's model
    replica (same dp, cp and tp coordinates), or None for a rank that is neither. With the
    looped placement stage 0 is on pipeline rank 0 and the last stage on rank ``pp - 1``.
    Groups of their own, also at pp=2 (the "pp" group carries the schedule's messages);
    every rank creates every pair's group (a collective over the world)."""
    import torch.distributed as dist
    columns = mesh.mesh.reshape(dims.pp, -1)               # (pp, replicas): global ranks
    pairs = [[int(c[0]), int(c[-1])] for c in columns.t()]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group


def _tied_tensors(parts: Sequence[nn.Module], grads: bool) -> list[tuple[str, bool, torch.Tensor]]:
    """(name in the unsplit model, is the copy, local tensor) of each split tied parameter
    this rank holds, ordered by name so both ends of the pair issue the same collectives;
    the local shard of a DTensor (both copies are sharded alike: same shape and placements)."""
    from torch.distributed.tensor import DTensor  # here: the planner imports this module, not DTensor
    out = []
    for part in parts:
        for local, source in tied_copies(part).items():
            p = part.get_parameter(local)
            t = _grad_like_param(p) if grads else p
            out.append((source, local != source, t.to_local() if isinstance(t, DTensor) else t))
    return sorted(out, key=lambda e: e[0])


def _grad_like_param(p: nn.Parameter) -> torch.Tensor:
    """``p.grad``, made to exist and to share ``p``'s sharding: a vocab-parallel embedding's
    weight gradient comes back replicated (full rows on each tp rank), the head's sharded."""
    from torch.distributed.tensor import DTensor
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    elif isinstance(p.grad, DTensor) and isinstance(p, DTensor) and p.grad.placements != p.placements:
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)
    return p.grad


@torch.no_grad()
def init_tied_copies(parts: Sequence[nn.Module], group) -> None:
    """Give the last stage's copy the first stage's initial value: the copy is zeroed and the
    pair summed over the embedding group (exact in any dtype)."""
    import torch.distributed as dist
    for _, is_copy, t in _tied_tensors(parts, grads=False):
        if is_copy:
            t.zero_()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


@torch.no_grad()
def sync_tied_grads(parts: Sequence[nn.Module], group) -> None:
    """Sum the gradients of the two copies over the embedding group (after the backward of a
    step, before clipping and the optimizer), so both copies take the same update: the
    gradient the single tied parameter of the unsplit model gets."""
    import torch.distributed as dist
    for _, _, g in _tied_tensors(parts, grads=True):
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
