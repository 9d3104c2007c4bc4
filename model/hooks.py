"""What model code may hand to the training step: auxiliary losses and per-step statistics.

Model code is written for one device and knows nothing of micro-batches, data
parallelism or pipeline stages. Two calls connect it to the step:

* ``x = add_aux_loss(x, loss, name)`` attaches an auxiliary loss (a router's
  load-balancing loss, a z-loss) to an activation ``x`` that continues through the
  network. Forward returns ``x`` unchanged; backward adds the gradient of ``loss``
  scaled exactly like the main loss of this micro-batch (the scale the running step
  set, see :func:`step_scope`). Because the loss rides on the activation's graph it
  needs no path to the last pipeline stage. Its value is reported as a statistic
  ``aux/<name>``.
* ``report(name, value, reduce="mean")`` records a detached statistic (expert load,
  dropped tokens), the same on every tensor-parallel rank. The step accumulates them on
  the device and reduces them over micro-batches, data-parallel ranks and pipeline
  stages only when a log line asks.

Outside a running step (evaluation, generation, a bare forward in a test) both are
harmless: the aux loss gets no gradient scale (0: it does not train) and statistics
are dropped.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

REDUCTIONS = ("mean", "sum", "max")


@dataclass
class StepScope:
    """The running step's settings: the aux-loss gradient scale and the statistics sink."""
    aux_scale: float = 0.0
    stats: Optional["StatsCollector"] = None


class StatsCollector:
    """Per-step statistics as device tensors: per name a running (sum, count) or max."""

    def __init__(self) -> None:
        self.values: dict[str, list] = {}     # name -> [reduce, accumulated tensor, count]

    def add(self, name: str, value: torch.Tensor, reduce: str) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"statistic {name}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        v = value.detach().float().reshape(())
        slot = self.values.get(name)
        if slot is None:
            self.values[name] = [reduce, v.clone(), 1]
        elif reduce == "max":
            slot[1] = torch.maximum(slot[1], v)
            slot[2] += 1
        else:
            slot[1] = slot[1] + v
            slot[2] += 1

    def clear(self) -> None:
        self.values = {}


_LOCAL = threading.local()


def current() -> StepScope:
    """The scope of the step running on this thread (an inert one outside a step)."""
    return getattr(_LOCAL, "scope", None) or StepScope()


@contextlib.contextmanager
def step_scope(aux_scale: float, stats: Optional[StatsCollector]) -> Iterator[StepScope]:
    """Make ``aux_scale`` and ``stats`` current for the forward and backward of a step."""
    previous = getattr(_LOCAL, "scope", None)
    _LOCAL.scope = StepScope(aux_scale, stats)
    try:
        yield _LOCAL.scope
    finally:
        _LOCAL.scope = previous


def _recording() -> bool:
    """Statistics are recorded in a training forward only: not with gradients off (evaluation,
    a pipeline schedule's shape inference) and not inside backward, where activation
    checkpointing replays forwards."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


def report(name: str, value: torch.Tensor, reduce: str = "mean") -> None:
    """Record a statistic of this micro-batch (dropped outside a training forward).

    The value must be the same on every tensor-parallel rank: compute it from replicated
    tensors, or from DTensors (whose reductions are global); the step reduces it over
    micro-batches, data-parallel ranks and pipeline stages."""
    stats = current().stats
    if stats is None or not _recording():
        return
    from torch.distributed.tensor import DTensor
    if isinstance(value, DTensor):                          # a DTensor scalar: replicate it
        value = value.full_tensor()
    stats.add(name, value, reduce)


class _AuxLoss(torch.autograd.Function):
    """Identity on ``x``; in backward, d(aux)/d(loss) = ``scale`` (the main loss's scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(loss.detach())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        loss, = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None     # a DTensor loss gets a DTensor grad


def add_aux_loss(x: torch.Tensor, loss: torch.Tensor, name: str) -> torch.Tensor:
    """Attach auxiliary ``loss`` (a scalar) to activation ``x``; returns ``x`` (see module doc)."""
    scope = current()
    report(f"aux/{name}", loss)
    if not torch.is_grad_enabled() or not loss.requires_grad:
        return x
    return _AuxLoss.apply(x, loss, scope.aux_scale)
