"""Per-rank state that features checkpoint: a registry of named states.

A feature with state of its own on each rank (the RNG streams, FP8 delayed-scaling
histories, future ones) registers it under a name; every checkpoint then holds this
rank's ``<name>_rank<R>.pt`` (written with ``torch.save``, read with
``weights_only=True``), and a resume restores it. The trainer names no feature::

    states = RankStates(rank)
    states.register("rng", RngState(seed, rank))
    engine.register_rank_states(states)          # e.g. FP8 scaling state
    save(..., rank_files=states.files())
    states.restore(path, same_world_size, iteration)

A saved file is rank-specific: under another world size (or when a state saved nothing,
or only weights were loaded) the state is told :meth:`RankState.start_fresh` instead.
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional, Protocol

import numpy as np
import torch

from polytron.pretrain.checkpoint.common import CheckpointError
from polytron.pretrain.checkpoint.safe_read import load_rank_file


class RankState(Protocol):
    """One feature's checkpointed state on this rank."""

    def state_dict(self) -> dict:
        """The state to save (tensors and plain values only); empty saves no file."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by this rank."""
        ...

    def start_fresh(self, iteration: Optional[int]) -> None:
        """No saved state for this rank: a resume at ``iteration`` under another world size or
        without the file, or (``iteration`` None) a run that loaded only weights."""
        ...


def rank_file(name: str, rank: int) -> str:
    """The checkpoint file of state ``name`` of ``rank``."""
    return f"{name}_rank{rank}.pt"


class RankStates:
    """The named per-rank states of one run, in registration order."""

    def __init__(self, rank: int):
        self.rank = rank
        self.states: dict[str, RankState] = {}

    def register(self, name: str, state: RankState) -> None:
        if name in self.states:
            raise ValueError(f"per-rank state {name!r} is registered twice")
        self.states[name] = state

    def files(self) -> dict[str, Any]:
        """This rank's checkpoint files: file name -> state (states with nothing to save left out)."""
        out = {}
        for name, state in self.states.items():
            saved = state.state_dict()
            if saved:
                out[rank_file(name, self.rank)] = saved
        return out

    def restore(self, path: Optional[str], same_world_size: bool, iteration: Optional[int]) -> None:
        """Load every state's file of this rank from checkpoint ``path`` when it was saved under
        the same world size; otherwise (or ``path`` None: weights only) start it fresh."""
        for name, state in self.states.items():
            file = rank_file(name, self.rank)
            saved = load_rank_file(path, file) if path and same_world_size else None
            if saved is None:
                state.start_fresh(iteration)
                continue
            try:
                state.load_state_dict(saved)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint file {os.path.join(path or '', file)}: bad {name} "
                                      f"state ({type(e).__name__})") from None


# ---------------------------------------------------------------- the RNG streams

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, iteration: int, rank: int) -> int:
    """Seed for a rank that resumes without its own saved RNG state (world size changed)."""
    return (seed * 1_000_003 + iteration * 7919 + rank) % 2**63


def _numpy_state() -> tuple[str, np.ndarray, int, int, float]:
    """numpy's global RNG state in the legacy tuple form (its generator is MT19937)."""
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple), "numpy's global generator is not MT19937"
    return state


class RngState:
    """This rank's RNG streams (python, numpy, torch CPU/CUDA). Resumed under another world
    size, every rank reseeds with :func:`derived_seed` (seed, iteration, rank): deterministic.
    A weights-only load keeps the run's own seed."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = _numpy_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def start_fresh(self, iteration: Optional[int]) -> None:
        if iteration is not None:
            seed_everything(derived_seed(self.seed, iteration, self.rank))
