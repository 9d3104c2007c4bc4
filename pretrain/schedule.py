"""Learning-rate and weight-decay schedules: one object per run, built from the config.

:class:`TrainStep` asks its :class:`Schedule` for ``lr(it)`` and ``weight_decay(it)`` (the
decay of the matrix parameter groups) at every step and knows no schedule kind. Kinds are
registered by name (``schedule.kind``): ``cosine``, ``wsd``, ``constant`` and BitNet b1.58's
``two_stage`` here; an architecture folder or a ``model.plugins`` module registers another
with :func:`register_schedule`::

    @register_schedule("my_kind")
    class MySchedule(Schedule):
        def after_warmup(self, it: int) -> float: ...

Every kind warms up linearly from lr/warmup to lr (step 0 already trains); iterations are
0-based and run to ``total``.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

from polytron.pretrain.config import OptimizerConfig, ScheduleConfig


class LRSchedule(Protocol):
    """What the training step needs of a schedule."""

    def lr(self, it: int) -> float:
        """Learning rate of optimizer step ``it`` (0-based)."""
        ...

    def weight_decay(self, it: int) -> float:
        """Weight decay of the decaying (matrix) parameter groups at step ``it``."""
        ...


class Schedule:
    """Base schedule: linear warmup, then :meth:`after_warmup`; constant weight decay."""

    def __init__(self, opt: OptimizerConfig, sched: ScheduleConfig, total: int):
        self.opt, self.cfg, self.total = opt, sched, total

    def lr(self, it: int) -> float:
        warm = self.cfg.warmup_iters
        if warm and it < warm:
            return self.opt.lr * (it + 1) / warm
        return self.after_warmup(it)

    def after_warmup(self, it: int) -> float:
        """Learning rate of step ``it`` >= ``schedule.warmup_iters``."""
        raise NotImplementedError

    def weight_decay(self, it: int) -> float:
        return self.opt.weight_decay

    @classmethod
    def validate(cls, sched: ScheduleConfig) -> None:
        """Refuse settings this kind cannot run with (a ConfigError naming the key)."""


SCHEDULES: dict[str, type[Schedule]] = {}


def register_schedule(kind: str) -> Callable[[type[Schedule]], type[Schedule]]:
    """Class decorator: make ``schedule.kind=<kind>`` build the class."""
    def add(cls: type[Schedule]) -> type[Schedule]:
        SCHEDULES[kind] = cls
        return cls
    return add


def build_schedule(sched: ScheduleConfig, opt: OptimizerConfig, total: int) -> Schedule:
    """The run's schedule over ``total`` iterations (``sched.kind`` must be registered)."""
    return SCHEDULES[sched.kind](opt, sched, total)


def cosine_between(peak: float, floor: float, frac: float) -> float:
    """Half-cosine from ``peak`` (frac 0) to ``floor`` (frac >= 1)."""
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


@register_schedule("constant")
class Constant(Schedule):
    """Warmup, then lr."""

    def after_warmup(self, it: int) -> float:
        return self.opt.lr


@register_schedule("cosine")
class Cosine(Schedule):
    """Warmup, then a cosine to min_lr over ``decay_iters`` (default: the rest of the run)."""

    def after_warmup(self, it: int) -> float:
        warm = self.cfg.warmup_iters
        span = self.cfg.decay_iters or max(self.total - warm, 1)
        return cosine_between(self.opt.lr, self.opt.min_lr, (it - warm) / span)


@register_schedule("wsd")
class WarmupStableDecay(Schedule):
    """Warmup, lr until the last ``decay_iters`` steps (default 20% of the run), then a decay to
    min_lr of shape ``wsd_decay_shape``."""

    SHAPES: dict[str, Callable[[float], float]] = {
        "linear": lambda f: f, "cosine": lambda f: 0.5 * (1 - math.cos(math.pi * f)), "sqrt": math.sqrt}

    def after_warmup(self, it: int) -> float:
        lr, min_lr = self.opt.lr, self.opt.min_lr
        decay = self.cfg.decay_iters or max(int(0.2 * self.total), 1)
        start = self.total - decay
        if it < start:
            return lr
        frac = min((it - start + 1) / decay, 1.0)
        return lr - (lr - min_lr) * self.SHAPES[self.cfg.wsd_decay_shape](frac)


@register_schedule("two_stage")
class TwoStage(Schedule):
    """BitNet b1.58's recipe after warmup: stage 1 is the cosine from ``lr`` to ``min_lr`` over
    the whole run, cut at :attr:`stage2`; stage 2 restarts lower, a cosine from ``stage2_lr`` to
    ``min_lr`` at the end of the run, with the matrices' weight decay ``stage2_weight_decay``."""

    @property
    def stage2(self) -> int:
        """First step of stage 2."""
        return int(round(self.cfg.stage2_start * self.total))

    def after_warmup(self, it: int) -> float:
        mid, warm = self.stage2, self.cfg.warmup_iters
        if it < mid:
            return cosine_between(self.opt.lr, self.opt.min_lr, (it - warm) / max(self.total - warm, 1))
        return cosine_between(self.cfg.stage2_lr, self.opt.min_lr, (it - mid) / max(self.total - mid, 1))

    def weight_decay(self, it: int) -> float:
        return self.cfg.stage2_weight_decay if it >= self.stage2 else self.opt.weight_decay

    @classmethod
    def validate(cls, sched: ScheduleConfig) -> None:
        from polytron.model.configlib import bad
        if not 0 < sched.stage2_start < 1:
            raise bad("schedule.stage2_start", sched.stage2_start, "a fraction in (0, 1)")
        if sched.stage2_lr <= 0:
            raise bad("schedule.stage2_lr", sched.stage2_lr, "a positive number with schedule.kind=two_stage")
        if sched.stage2_weight_decay < 0:
            raise bad("schedule.stage2_weight_decay", sched.stage2_weight_decay, "a number >= 0")
