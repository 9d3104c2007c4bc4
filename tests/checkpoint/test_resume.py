"""Kill / resume / SIGTERM: resumed runs reproduce an uninterrupted run bit for bit."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.checkpoint import runs

ITERS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted 8-step run (saving every 2 steps, like the others)."""
    out = str(tmp_path_factory.mktemp("ref"))
    assert runs.run(out, ITERS, "checkpoint.interval=2") == 0, runs.output(out)
    got = runs.losses(out)
    assert sorted(got) == list(range(1, ITERS + 1))
    return {it: v[0] for it, v in got.items()}


def _assert_same(out: str, reference: dict[int, float]) -> None:
    got = runs.losses(out)
    assert sorted(got) == sorted(reference), runs.output(out)
    for it, values in got.items():       # the killed run's records and the resumed run's
        for v in values:
            assert v == reference[it], f"iteration {it}: {v!r} != {reference[it]!r}"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_mid_training_then_resume_is_bitwise_equal(tmp_path, reference, mode):
    out = str(tmp_path)
    opts = ("checkpoint.interval=2", f"checkpoint.async_save={str(mode == 'async').lower()}")
    p = runs.start(out, ITERS, *opts)
    assert runs.wait_until(p, lambda: len(runs.losses(out)) >= 5, timeout=180), runs.output(out)
    runs.kill_group(p)
    assert max(runs.losses(out)) < ITERS, "the run finished before it was killed"
    assert runs.run(out, ITERS, *opts, "training.resume=auto") == 0, runs.output(out)
    assert "resumed from checkpoint" in runs.output(out)
    _assert_same(out, reference)


def test_sigkill_during_save_is_never_picked_up(tmp_path, reference):
    out = str(tmp_path)
    p = runs.start(out, ITERS, "checkpoint.interval=2")
    # kill at the first save of iteration >= 4 (one complete checkpoint exists by then)
    caught = runs.wait_until(p, lambda: any(re.search(r"iter_000000[4-8]\.tmp$", d)
                                            for d in runs.tmp_dirs(out)), timeout=180, poll=0.001)
    runs.kill_group(p)
    assert caught, "never saw a save in progress"
    torn = runs.tmp_dirs(out)
    assert torn, "the save finished before the kill"
    torn_name = os.path.basename(torn[0])[:-4]
    assert torn_name not in runs.complete(out)
    assert runs.run(out, ITERS, "checkpoint.interval=2", "training.resume=auto") == 0, runs.output(out)
    text = runs.output(out)
    resumed = re.search(r"resumed from checkpoint \S+/(iter_\d+) ", text)
    assert resumed and resumed.group(1) < torn_name, text
    assert not runs.tmp_dirs(out), "stale .tmp directory left behind"
    _assert_same(out, reference)


def test_sigterm_saves_and_exits_for_requeue(tmp_path):
    out = str(tmp_path)
    p = runs.start(out, 500, "checkpoint.interval=0", "checkpoint.save_final=false")
    assert runs.wait_until(p, lambda: len(runs.losses(out)) >= 3, timeout=180), runs.output(out)
    step_s = max(r["step_time_s"] for r in runs.records(out))
    logged = max(runs.losses(out))
    sent = time.monotonic()
    os.killpg(p.pid, signal.SIGTERM)
    rc = p.wait(timeout=120)
    took = time.monotonic() - sent
    text = runs.output(out)
    assert rc == 75, text
    m = re.search(r"signal 15: saved at iteration (\d+), exiting with status 75", text)
    assert m, text
    stopped = int(m.group(1))
    assert logged <= stopped <= logged + 2, (logged, stopped)   # finished the current step only
    assert runs.complete(out) == [f"iter_{stopped:07d}"]
    assert took < 2 * step_s + 30, f"exit took {took:.1f} s (step {step_s:.2f} s)"
