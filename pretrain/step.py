"""The training step: the one step loop of the project.

The trainer, ``tools/benchmark.py``, ``tools/bench_layout.py`` and the equivalence tests
all run :class:`TrainStep`: learning rate and weight decay of the iteration (asked of the
run's :class:`pretrain.schedule.Schedule`; the step knows no schedule kind), forward and backward over
the step's micro-batches (loss normalized by the step's global token count, auxiliary
losses of modules included), gradient clipping on the device, the optimizer update,
the post-optimizer hooks, and ``zero_grad``.

Nothing in a step reads a device value back to the host, so a GPU never waits for the
CPU between log intervals. The deliberate exceptions are marked with
:func:`host_sync` (a log line, an evaluation, a numerics check before a save, the
per-step control flags on the CPU, and the ``skip`` policy for non-finite steps, which
must decide before the update); a test counts every other read and expects none.

Post-optimizer hooks: any module of the model with a ``post_optimizer_step()`` method
(e.g. an aux-loss-free MoE router updating its bias from the observed load) is called
after each optimizer update, in module order; features that are not modules add
callables with :meth:`TrainStep.add_hook`; the engine's own (``engine.post_optimizer_hooks``,
e.g. the FP8 weight-scale precompute under FSDP2) are added that way. State such hooks
keep belongs in persistent buffers (or ``get_extra_state``) so that checkpoints carry it.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
from polytron.pretrain.guards import finite
from polytron.pretrain.optim import set_lr
from polytron.pretrain.schedule import LRSchedule, build_schedule

_LOCAL = threading.local()


@contextlib.contextmanager
def host_sync(reason: str) -> Iterator[None]:
    """Marks a deliberate device-to-host read (``reason`` names it, for readers and tests)."""
    depth = getattr(_LOCAL, "depth", 0)
    _LOCAL.depth = depth + 1
    try:
        yield
    finally:
        _LOCAL.depth = depth


def in_host_sync() -> bool:
    """True inside :func:`host_sync` (tests count device reads outside it)."""
    return getattr(_LOCAL, "depth", 0) > 0


@dataclass
class StepResult:
    """One step's outcome, as device tensors (read them back only at a log interval)."""
    loss: torch.Tensor          # token-mean loss of the step over every rank
    grad_norm: torch.Tensor     # gradient norm before clipping
    lr: float
    skipped: bool = False       # the update was skipped (non-finite, training.nonfinite=skip)


class TrainStep:
    """Runs optimizer steps of ``engine`` with ``optimizer`` (see the module docstring).

    ``schedule`` is the schedule config (built once into a :class:`pretrain.schedule.Schedule`
    over ``total_iterations``) or an already built :class:`LRSchedule`."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer, opt_cfg: OptimizerConfig,
                 schedule: ScheduleConfig | LRSchedule, total_iterations: int, nonfinite: str = "stop"):
        self.engine = engine
        self.optimizer = optimizer
        self.opt_cfg = opt_cfg
        self.schedule: LRSchedule = build_schedule(schedule, opt_cfg, total_iterations) \
            if isinstance(schedule, ScheduleConfig) else schedule
        self.total_iterations = total_iterations
        self.nonfinite = nonfinite
        # indices of the decaying (matrix) groups, whose weight decay the schedule gives;
        # indices survive load_state_dict
        self.decay_groups = [i for i, g in enumerate(optimizer.param_groups) if g["weight_decay"] > 0]
        self.hooks: list[Callable[[], None]] = [
            m.post_optimizer_step for part in engine.model_parts for m in part.modules()
            if hasattr(m, "post_optimizer_step")]
        for fn in getattr(engine, "post_optimizer_hooks", ()):   # the engine's features (FP8 scales)
            self.add_hook(fn)

    def add_hook(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` after every optimizer update (after the modules' own hooks)."""
        self.hooks.append(fn)

    def __call__(self, microbatches: list[dict], iteration: int) -> StepResult:
        """Step ``iteration`` (0-based) over this rank's micro-batches of the global batch."""
        lr = self.schedule.lr(iteration)
        set_lr(self.optimizer, lr)
        decay = self.schedule.weight_decay(iteration)
        for i in self.decay_groups:
            self.optimizer.param_groups[i]["weight_decay"] = decay
        loss = self.engine.forward_backward(microbatches)
        grad_norm = self.engine.clip_grad_norm_(self.opt_cfg.grad_clip)
        skipped = False
        if self.nonfinite == "skip":
            with host_sync("training.nonfinite=skip decides before the update"):
                skipped = not bool(finite(loss, grad_norm))
        if not skipped:
            self.optimizer.step()
            for hook in self.hooks:
                hook()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, skipped)
