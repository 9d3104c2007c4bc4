"""AdamW with decay only on matrices, and the learning-rate schedules."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from polytron.pretrain.config import OptimizerConfig, ScheduleConfig


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: >= 2-D weights decay; norms, biases and other 1-D params do not.

    Plain tensors and DTensors go into separate groups (the foreach kernels cannot mix
    them, and a layer may keep some parameters plain under tensor parallelism)."""
    from torch.distributed.tensor import DTensor
    groups: dict[tuple[bool, bool], list] = {}
    seen: set[int] = set()
    for module in modules:
        for _, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0}
            for (decay, _), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def build_optimizer(modules: Iterable[nn.Module], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the given model parts (one per pipeline stage on this rank).

    Uses the fused kernel when every parameter is a plain tensor (it has CPU and CUDA
    paths); DTensor parameters (TP/FSDP) use the foreach implementation.
    """
    groups = param_groups(modules, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    from torch.distributed.tensor import DTensor
    fused = bool(params) and not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused, foreach=None if fused else True)


def lr_at(it: int, total: int, opt: OptimizerConfig, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``it`` (0-based) of ``total``.

    Warmup is linear from lr/warmup to lr (step 0 already trains). ``cosine`` then
    decays over ``decay_iters`` (default: the rest of the run) to ``min_lr``; ``wsd``
    holds lr until the last ``decay_iters`` steps (default 20% of the run) and
    then decays to ``min_lr`` with the chosen shape; ``constant`` holds lr;
    ``two_stage`` is :func:`two_stage_lr`.
    """
    lr, min_lr, warm = opt.lr, opt.min_lr, sched.warmup_iters
    if warm and it < warm:
        return lr * (it + 1) / warm
    if sched.kind == "two_stage":
        return two_stage_lr(it, total, opt, sched)
    if sched.kind == "constant":
        return lr
    if sched.kind == "cosine":
        span = sched.decay_iters or max(total - warm, 1)
        frac = min((it - warm) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
    decay = sched.decay_iters or max(int(0.2 * total), 1)
    start = total - decay
    if it < start:
        return lr
    frac = min((it - start + 1) / decay, 1.0)
    shape = {"linear": frac, "cosine": 0.5 * (1 - math.cos(math.pi * frac)),
             "sqrt": math.sqrt(frac)}[sched.wsd_decay_shape]
    return lr - (lr - min_lr) * shape


def stage2_iteration(total: int, sched: ScheduleConfig) -> int:
    """First step of stage 2 of the ``two_stage`` schedule."""
    return int(round(sched.stage2_start * total))


def two_stage_lr(it: int, total: int, opt: OptimizerConfig, sched: ScheduleConfig) -> float:
    """BitNet b1.58's two-stage rate after warmup: stage 1 is the cosine from ``lr`` to
    ``min_lr`` over the whole run, cut at :func:`stage2_iteration`; stage 2 restarts lower, a
    cosine from ``stage2_lr`` to ``min_lr`` at the end of the run."""
    mid, warm = stage2_iteration(total, sched), sched.warmup_iters
    if it < mid:
        peak, frac = opt.lr, (it - warm) / max(total - warm, 1)
    else:
        peak, frac = sched.stage2_lr, (it - mid) / max(total - mid, 1)
    return opt.min_lr + 0.5 * (peak - opt.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def weight_decay_at(it: int, total: int, base: float, sched: ScheduleConfig) -> float:
    """Weight decay at step ``it`` of a parameter group created with ``base``: ``base``, except
    in stage 2 of the ``two_stage`` schedule (``schedule.stage2_weight_decay``)."""
    if sched.kind == "two_stage" and it >= stage2_iteration(total, sched):
        return sched.stage2_weight_decay
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr
