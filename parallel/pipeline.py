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

from torch import nn

from polytron.model.spec import Unit
from polytron.parallel.mesh import LayoutError


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


def cut_stage(model: nn.Module, stages: list[list[Unit]], s: int) -> nn.Module:
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
