"""Every parallel layout trains exactly like one process (fp32, same init and data).

For each layout in :data:`equivalence.LAYOUTS`: three optimizer steps (AdamW with the
project's defaults, gradient clipping active) must give per-step losses and gradient
norms (and a final eval loss) within 1e-5 relative of the single-process run, and final parameters within
1e-5 relative (over the whole parameter vector; each tensor within 1e-4: AdamW turns
reduction-order noise at near-zero gradient elements into update differences of up to
a few 1e-6, which for the smallest tensors is ~1e-5 of their norm).

All layouts of one world size run in a single spawn of N gloo processes (the process
start dominates on a 2-core CI machine); each layout is still its own test.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from tests.distributed import equivalence as eq
from tests.distributed.harness import backends, run_distributed

REL = 1e-5
REL_PER_TENSOR = 1e-4


@functools.lru_cache(maxsize=None)
def _results(world_size: int, backend: str) -> dict[str, list[dict]]:
    """Per-layout per-rank results for every layout of ``world_size`` (one spawn)."""
    names = [n for n, spec in eq.LAYOUTS.items() if spec[0] == world_size]
    per_rank = run_distributed(eq.run_layouts, world_size, names, backend=backend, timeout=420)
    return {n: [r[n] for r in per_rank] for n in names}


@functools.lru_cache(maxsize=None)
def _reference(model_key: str, variant: str) -> dict:
    return eq.reference(json.loads(model_key), variant)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _cases() -> list:
    out = []
    for name, (world, *_rest) in eq.LAYOUTS.items():
        for backend in backends(world):
            out.append(pytest.param(name, backend, id=f"{name}-{backend}"))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,backend", _cases())
def test_layout_matches_single_process(name: str, backend: str) -> None:
    world, _par, model_over, variant = eq.LAYOUTS[name]
    ranks = _results(world, backend)[name]
    ref = _reference(json.dumps(model_over, sort_keys=True), variant)

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
