"""A failing layout fails alone: the equivalence batch's isolation, shown with faults.

One 2-rank batch of four layouts (the test-only ``Layout.fault`` option, equivalence.py):
a passing layout, one whose last rank raises while the other blocks in training, another
passing layout, and one whose ranks hang in communication. The passing layouts match
one process; the raising one reports its own rank's traceback; the hung one fails as
timed out after its own budget; the first spawn is never re-run and the second spawn
runs only what followed the failure.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.distributed import equivalence as eq
from tests.distributed.harness import Call, run_batch
from tests.distributed.layout import Layout
from tests.distributed.test_equivalence import _reference, assert_matches

SMALL = {"num_layers": 2}
HANG_BUDGET_S = 3.0
LAYOUTS = [
    Layout("ok_tp2", 2, parallel={"tensor": 2}, model=SMALL),
    Layout("raises", 2, parallel={"tensor": 2}, model=SMALL, fault="raise"),
    Layout("ok_fsdp2", 2, model=SMALL),
    Layout("hangs", 2, model=SMALL, fault="hang", budget_s=HANG_BUDGET_S),
]


@pytest.mark.timeout(120)   # a hang the harness missed fails here
def test_failing_layouts_fail_alone() -> None:
    start = time.monotonic()
    calls = [Call(layout.name, eq.run_layout, (layout,), layout.budget_s) for layout in LAYOUTS]
    batch = run_batch(calls, 2, base_s=60.0)
    elapsed = time.monotonic() - start

    assert batch.spawns == [["ok_tp2", "raises", "ok_fsdp2", "hangs"], ["ok_fsdp2", "hangs"]]
    ref = _reference(json.dumps(SMALL, sort_keys=True), "plain")
    for name in ("ok_tp2", "ok_fsdp2"):
        assert_matches(batch.get(name), ref)
    assert sorted(batch.errors) == ["hangs", "raises"]

    raised = str(batch.errors["raises"])
    assert raised.startswith("raises: rank 1 raised:\n"), raised
    assert "LayoutFault: deliberate test fault on rank 1" in raised, raised
    with pytest.raises(AssertionError, match="^raises: rank 1 raised"):
        batch.get("raises")
    assert str(batch.errors["hangs"]) == "hangs: timed out after 3s; ranks still running: [0, 1]"
    assert elapsed < 60.0, f"the batch took {elapsed:.0f}s"
