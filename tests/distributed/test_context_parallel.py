"""Context parallelism: bad layouts refused before any process group, and the equivalence
checks shown to catch a ring that drops one block and a loss normalized per rank.

The layouts themselves (dense CP2/CP4 with documents, all-gather, x TP2, x PP2, x FSDP2,
DHA, BitNet) are in tests/distributed/layouts_cp.py, MoE CP2 x EP2 and MH-MoE CP2 in
tests/distributed/layouts_moe_cp.py; they run with the equivalence suite.
"""
from __future__ import annotations

import pytest

from polytron.parallel.config import ParallelConfig
from polytron.parallel.mesh import LayoutError, ParallelDims
from tests.distributed import equivalence as eq
from tests.distributed.harness import Call, run_batch
from tests.distributed.test_equivalence import assert_matches


@pytest.mark.parametrize("parallel,model,seq_len,needle", [
    ({"context": 2}, {}, 10, "data.seq_len=10 must be divisible by 2 x parallel.context = 4"),
    ({"context": 2, "compile": True}, {}, 16, "parallel.compile=true"),
    ({"context": 2}, {"arch": "moe", "moe": {"capacity_factor": 1.0}}, 16, "model.moe.capacity_factor=1.0"),
    ({"context": 2, "expert": 2}, {"arch": "moe"}, 16, "parallel.expert=2 must divide the data-parallel shard"),
])
def test_bad_cp_layout_is_one_line(parallel: dict, model: dict, seq_len: int, needle: str) -> None:
    with pytest.raises(LayoutError) as err:
        ParallelDims.resolve(ParallelConfig(**parallel), eq.model_config(**model), 2, seq_len)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cp_layout_accepted() -> None:
    dims = ParallelDims.resolve(ParallelConfig(context=2), eq.model_config(), 4, 16)
    assert (dims.cp, dims.dp) == (2, 2)


def _faulty(fault: str) -> dict:
    """cp2_docs trained with one test-only fault switched on (parallel/context.py TEST_FAULTS)."""
    from polytron.parallel.context import TEST_FAULTS
    TEST_FAULTS.add(fault)
    return eq.run_layout(eq.LAYOUTS["cp2_docs"])


@pytest.mark.timeout(600)
def test_equivalence_catches_cp_faults() -> None:
    faults = ("skip_block", "per_rank_loss")
    result = run_batch([Call(f, _faulty, (f,), 120.0) for f in faults], 2, base_s=120.0)
    ref = eq.reference({}, "docs")
    for fault in faults:
        with pytest.raises(AssertionError):
            assert_matches(result.get(fault), ref)
