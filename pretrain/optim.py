"""AdamW with decay only on matrices (the schedules are :mod:`pretrain.schedule`)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
from polytron.pretrain.schedule import build_schedule


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
    paths). DTensor parameters (TP/FSDP) use the foreach implementation on CUDA (one
    launch per group instead of one per tensor) and the per-tensor loop on CPU, where
    foreach has no kernels of its own and only adds dispatch (the same results; the
    equivalence layouts spend about a sixth less CPU time in their steps).
    """
    groups = param_groups(modules, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    from torch.distributed.tensor import DTensor
    fused = bool(params) and not any(isinstance(p, DTensor) for p in params)
    foreach = None if fused else all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused, foreach=foreach)


def lr_at(it: int, total: int, opt: OptimizerConfig, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``it`` (0-based) of ``total`` (see :mod:`pretrain.schedule`)."""
    return build_schedule(sched, opt, total).lr(it)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr
