"""torch.compile + activation checkpointing (in the engine's order) matches eager.

Compiling this two-layer model takes ~12 s on the 2-core CI machine (more under
load), so it runs in CI like every other layout.
"""
from __future__ import annotations

import pytest

from polytron.parallel.config import ParallelConfig
from tests.distributed import equivalence as eq


@pytest.mark.timeout(600)
def test_compile_with_selective_ac_matches_eager() -> None:
    model = eq.model_config(num_layers=2)
    with eq.one_thread():
        got = eq.train(ParallelConfig(compile=True, activation_checkpoint="selective"), model, "plain", 1)
        want = eq.train(ParallelConfig(), model, "plain", 1)
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    for k, v in want["params"].items():
        assert float((got["params"][k] - v).norm() / v.norm()) <= 1e-5, k
