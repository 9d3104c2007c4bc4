"""A failing layout fails alone: the equivalence batch's isolation, shown with faults.

One 2-rank batch of five layouts (the test-only ``Layout.fault`` option, equivalence.py):
a passing layout, one whose last rank raises while the other blocks in training, one whose
last rank dies of SIGABRT (a C++ abort) while the other trains on, another passing layout,
and one whose ranks hang in communication. The passing layouts match one process; the
raising one reports its own rank's traceback; the aborting one names the dead rank, its
signal and what it printed to stderr, even when the surviving peer raised on the closed
connection; the hung one fails as timed out after its own budget; no spawn re-runs a
settled layout.
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
    Layout("aborts", 2, model=SMALL, fault="abort"),
    Layout("ok_fsdp2", 2, model=SMALL),
    Layout("hangs", 2, model=SMALL, fault="hang", budget_s=HANG_BUDGET_S),
]


@pytest.mark.timeout(120)   # a hang the harness missed fails here
def test_failing_layouts_fail_alone() -> None:
    start = time.monotonic()
    calls = [Call(layout.name, eq.run_layout, (layout,), layout.budget_s) for layout in LAYOUTS]
    batch = run_batch(calls, 2, base_s=60.0)
    elapsed = time.monotonic() - start

    assert batch.spawns == [["ok_tp2", "raises", "aborts", "ok_fsdp2", "hangs"],
                            ["aborts", "ok_fsdp2", "hangs"], ["ok_fsdp2", "hangs"]]
    ref = _reference(json.dumps(SMALL, sort_keys=True), "plain")
    for name in ("ok_tp2", "ok_fsdp2"):
        assert_matches(batch.get(name), ref)
    assert sorted(batch.errors) == ["aborts", "hangs", "raises"]

    raised = str(batch.errors["raises"])
    assert raised.startswith("raises: rank 1 raised:\n"), raised
    assert "LayoutFault: deliberate test fault on rank 1" in raised, raised
    with pytest.raises(AssertionError, match="^raises: rank 1 raised"):
        batch.get("raises")
    aborted = str(batch.errors["aborts"])
    assert aborted.startswith("aborts: rank 1 exited with signal SIGABRT without a result"), aborted
    assert "deliberate abort on rank 1" in aborted, aborted
    assert str(batch.errors["hangs"]) == "hangs: timed out after 3s; ranks still running: [0, 1]"
    assert elapsed < 60.0, f"the batch took {elapsed:.0f}s"
