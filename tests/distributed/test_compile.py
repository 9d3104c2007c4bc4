"""torch.compile + activation checkpointing (in the engine's order) matches eager.

Compiling on CPU costs 30-90 s and gives no speedup there (docs/parallelism.md), so
this runs only with ``POLYTRON_TEST_COMPILE=1`` (set it on GPU runners or before
changing the compile path).
"""
from __future__ import annotations

import os

import pytest

from parallel.config import ParallelConfig
from tests.distributed import equivalence as eq

pytestmark = pytest.mark.skipif(os.environ.get("POLYTRON_TEST_COMPILE") != "1",
                                reason="set POLYTRON_TEST_COMPILE=1 (compiles for ~1 min on CPU)")


@pytest.mark.timeout(600)
def test_compile_with_selective_ac_matches_eager() -> None:
    model = eq.model_config(num_layers=2)
    got = eq.train(ParallelConfig(compile=True, activation_checkpoint="selective"), model, "plain", 1)
    want = eq.train(ParallelConfig(), model, "plain", 1)
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    for k, v in want["params"].items():
        assert float((got["params"][k] - v).norm() / v.norm()) <= 1e-5, k
