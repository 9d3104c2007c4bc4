"""Activation checkpointing, per-block ``torch.compile`` and the compiled loss.

Both act on each block's ``forward`` in place (no wrapper modules), so parameter
FQNs stay ``layers.<i>.…`` in every layout and checkpoints load across them.

Policies (``parallel.activation_checkpoint``):

* ``none``: keep all activations.
* ``full``: every block saves only its input; the block is recomputed in backward.
* ``selective``: every other block unit (global index 0, 2, 4, ...) is recomputed, the
  rest keep their activations: about half the activation memory of ``none`` for
  about half the recompute of ``full``. The choice is by *global* layer index, so a
  pipeline stage checkpoints the same blocks it would in the unsplit model.

Recompute uses non-reentrant ``torch.utils.checkpoint``; it reproduces the forward
exactly (no dropout in these models), so losses and gradients are bit-identical to
the run without checkpointing.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from polytron.model.spec import Unit

if TYPE_CHECKING:
    from polytron.model.transformer import Transformer


def _checkpointed_forward(block: nn.Module, forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_block(block: nn.Module) -> None:
    """Make ``block`` recompute its forward during backward."""
    block.forward = functools.partial(_checkpointed_forward, block, block.forward)


def apply_activation_checkpointing(model: Transformer, policy: str) -> int:
    """Apply ``policy`` to the block units of ``model``; returns how many blocks recompute."""
    if policy == "none":
        return 0
    if policy not in ("full", "selective"):
        raise ValueError(f"unknown activation_checkpoint policy {policy!r}")
    count = 0
    for unit, module in model.unit_modules():
        if unit.kind == "block" and (policy == "full" or block_index(model, unit) % 2 == 0):
            checkpoint_block(module)
            count += 1
    return count


def block_index(model: Transformer, unit: Unit) -> int:
    """Position of a block unit among the whole model's blocks (the same on every stage)."""
    blocks = [u.name for u in model.spec.units(model.cfg) if u.kind == "block"]
    return blocks.index(unit.name)


def apply_compile(model: Transformer) -> None:
    """``torch.compile`` each block unit separately (same graph for every block, compiled
    once), and the final norm when this part has it."""
    for unit, module in model.unit_modules():
        if unit.kind in ("block", "norm"):
            module.compile()


def compiled_loss(loss_fn: Callable) -> Callable:
    """``loss_fn`` compiled as one graph, so log-softmax, the label gather and their backward
    fuse (eager writes a full (B*T, V) log-prob tensor and zero-fills a full-size gradient).
    For plain tensors only: vocab-sharded DTensor logits (``loss_parallel``) stay eager."""
    return torch.compile(loss_fn)
