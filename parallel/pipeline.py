"""Pipeline parallelism: cut the model into stages by layers and pick a schedule.

Stages are contiguous runs of blocks. ``pp * virtual_stages`` stages in all; pipeline
rank ``r`` owns stages ``r, r + pp, r + 2 pp, ...`` (the looped placement interleaved
1F1B expects). A stage module is the single-device :class:`Transformer` with the
blocks it does not own deleted; the first stage keeps ``tok_embeddings``, the last
keeps ``norm`` and ``output``. Blocks keep their *global* ``ModuleDict`` keys, so
parameter FQNs (``layers.5.attention.wq.weight``) are the same as in the unsplit
model and checkpoints reshard across pipeline layouts.

Between stages travels the hidden state ``(B, T, d)`` (``(B, T/tp, d)`` with
sequence parallelism). Per-sample side inputs (``position_ids``, ``doc_ids``) are
not sent: every pipeline rank of a data-parallel replica reads the same batch, so
they are given to each stage as keyword arguments and chunked per micro-batch by
the schedule. A model whose stages must hand on more than the hidden state (e.g.
YOCO's shared KV cache) returns a tuple from a non-last stage and takes the same
tuple positionally in the next; ``torch.distributed.pipelining`` sends each tensor.
"""
from __future__ import annotations

import copy

from torch import nn

from parallel.mesh import LayoutError


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


def cut_stage(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """A stage module: deep copy of the (meta) ``model`` keeping only ``layer_ids``."""
    stage = copy.deepcopy(model)
    keep = {str(i) for i in layer_ids}
    for key in list(stage.layers.keys()):
        if key not in keep:
            del stage.layers[key]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
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
