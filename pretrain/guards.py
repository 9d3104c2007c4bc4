"""Numerics guards: non-finite losses and gradient norms, and loss spikes.

Each step hands its loss and gradient norm to :class:`NumericsGuard` as device tensors.
Under the ``stop`` policy nothing is read back per step: :meth:`NumericsGuard.check`
runs at each log interval and before every save, so a non-finite step stops the run
(naming the first bad iteration) before any checkpoint can hold its weights. Under
``skip`` the step asks :meth:`NumericsGuard.finite` before the optimizer update, one
host synchronization per step, and a bad step's update is skipped and counted.
"""
from __future__ import annotations

import statistics
from collections import deque
from typing import Optional

import torch

from polytron.model.errors import PolytronError

#: Steps of loss history a spike is measured against.
SPIKE_WINDOW = 50


class NumericsError(PolytronError, RuntimeError):
    """A non-finite loss or gradient norm under ``training.nonfinite=stop``; exit status 3."""

    exit_code = 3


def finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Device bool scalar: both values are finite."""
    return torch.isfinite(loss) & torch.isfinite(grad_norm)


class NumericsGuard:
    """Collects per-step (iteration, loss, grad norm) and judges them at sync points."""

    def __init__(self, policy: str, spike_ratio: float):
        self.policy = policy
        self.spike_ratio = spike_ratio
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.history: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def record(self, iteration: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Remember one finished step (no synchronization)."""
        self.pending.append((iteration, loss.detach(), grad_norm.detach()))

    def check(self) -> list[tuple[int, float, float]]:
        """Read back the pending steps (one synchronization); returns loss spikes as
        (iteration, loss, median of the window before it). Raises :class:`NumericsError`
        under ``stop`` when a step was not finite."""
        if not self.pending:
            return []
        its = [it for it, _, _ in self.pending]
        values = torch.stack([torch.stack([loss.float(), g.float()]) for _, loss, g in self.pending]).cpu()
        self.pending = []
        spikes = []
        for it, (loss, norm) in zip(its, values.tolist()):
            if not (_finite(loss) and _finite(norm)):
                if self.policy == "stop":
                    raise NumericsError(f"non-finite {'loss' if not _finite(loss) else 'gradient norm'} "
                                        f"at iteration {it} (loss {loss}, grad norm {norm}); stopping "
                                        "(training.nonfinite=stop)")
                continue                       # skipped and counted by the step
            spike = self._spike(loss)
            if spike is not None:
                spikes.append((it, loss, spike))
            self.history.append(loss)
        return spikes

    def _spike(self, loss: float) -> Optional[float]:
        if not self.spike_ratio or len(self.history) < 10:
            return None
        median = statistics.median(self.history)
        return median if loss > self.spike_ratio * median else None


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
