"""Every parallel layout trains exactly like one process (fp32, same init and data).

For each layout in :data:`equivalence.LAYOUTS`: three optimizer steps (AdamW with the
project's defaults, gradient clipping active) must give per-step losses and gradient
norms (and a final eval loss) within 1e-5 relative of the single-process run, and final parameters within
1e-5 relative (over the whole parameter vector; each tensor within 1e-4: AdamW turns
reduction-order noise at near-zero gradient elements into update differences of up to
a few 1e-6, which for the smallest tensors is ~1e-5 of their norm).

All layouts of one world size run in a single spawn of N gloo processes (the process
start dominates on a 2-core CI machine); each layout is still its own test: a layout that
raises, dies or hangs past its budget fails alone with its own error, and the layouts after
it run in a fresh spawn (tests/distributed/harness.py, run_batch). The batch's time limit is
a base plus every layout's budget (Layout.budget_s), so adding layouts never makes it time out.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from tests.distributed import equivalence as eq
from tests.distributed.harness import BatchResult, Call, backends, batch_timeout, run_batch
from tests.distributed.layout import Layout

REL = 1e-5
REL_PER_TENSOR = 1e-4
#: process start and rendezvous of a batch's spawn, on top of its layouts' budgets
BASE_S = 120.0
#: per test, on top of its batch: the single-process reference runs
REFERENCE_S = 300.0


def _batch(world_size: int) -> list[Layout]:
    return [layout for layout in eq.LAYOUTS.values() if layout.world == world_size]


@functools.lru_cache(maxsize=None)
def _results(world_size: int, backend: str) -> BatchResult:
    """Per-layout outcomes for every layout of ``world_size`` (one spawn, plus one per failure)."""
    calls = [Call(layout.name, eq.run_layout, (layout,), layout.budget_s) for layout in _batch(world_size)]
    return run_batch(calls, world_size, backend=backend, base_s=BASE_S)


@functools.lru_cache(maxsize=None)
def _reference(model_key: str, variant: str) -> dict:
    return eq.reference(json.loads(model_key), variant)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _cases() -> list:
    out = []
    for layout in eq.LAYOUTS.values():
        # whichever test of a world size comes first runs its whole batch
        limit = batch_timeout([b.budget_s for b in _batch(layout.world)], BASE_S) + REFERENCE_S
        for backend in backends(layout.world):
            out.append(pytest.param(layout.name, backend, id=f"{layout.name}-{backend}",
                                    marks=pytest.mark.timeout(int(limit))))
    return out


@pytest.mark.parametrize("name,backend", _cases())
def test_layout_matches_single_process(name: str, backend: str) -> None:
    layout = eq.LAYOUTS[name]
    ranks = _results(layout.world, backend).get(name)    # raises this layout's own failure
    assert_matches(ranks, _reference(json.dumps(layout.model, sort_keys=True), layout.data))


def assert_matches(ranks: list[dict], ref: dict) -> None:
    """One layout's per-rank results (eq.train) equal the single-process run ``ref``."""
    for r, res in enumerate(ranks):   # every rank reports the same loss and norm
        for step, (got, want) in enumerate(zip(res["losses"], ref["losses"])):
            assert _rel(got, want) <= REL, f"rank {r} step {step}: loss {got} vs {want}"
        for step, (got, want) in enumerate(zip(res["grad_norms"], ref["grad_norms"])):
            assert _rel(got, want) <= REL, f"rank {r} step {step}: grad norm {got} vs {want}"
        assert _rel(res["eval_loss"], ref["eval_loss"]) <= REL, f"rank {r}: eval loss"

    for r, res in enumerate(ranks):   # statistics reduced over dp ranks and pp stages
        assert sorted(res["stats"]) == sorted(ref["stats"]), f"rank {r}: statistics names"
        for key, want in ref["stats"].items():
            assert _rel(res["stats"][key], want) <= REL, f"rank {r}: statistic {key}"

    params: dict[str, torch.Tensor] = {}
    for res in ranks:                 # pipeline ranks each hold their stages' parameters
        params.update(res["params"])
    assert sorted(params) == sorted(ref["params"]), "parameter names differ from the unsplit model"
    diff = torch.cat([(params[k] - v).flatten() for k, v in ref["params"].items()])
    full = torch.cat([v.flatten() for v in ref["params"].values()])
    assert float(diff.norm() / full.norm()) <= REL, f"parameters differ: {float(diff.norm() / full.norm()):.2e}"
    for k, v in ref["params"].items():
        rel = float((params[k] - v).norm() / v.norm())
        assert rel <= REL_PER_TENSOR, f"{k}: relative difference {rel:.2e}"
