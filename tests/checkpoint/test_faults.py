"""Everyday faults never lose a complete checkpoint, and resumed runs equal uninterrupted ones.

Each test runs ``launch/pretrain.py`` in subprocesses on the tiny fp32 CPU model of
:mod:`tests.checkpoint.runs` and checks, besides its own point, that no complete
checkpoint was lost and that every logged loss equals the uninterrupted run's bit for
bit where a resume happened.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from polytron.pretrain import checkpoint as ckpt
from tests.checkpoint import runs

ITERS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted run."""
    out = str(tmp_path_factory.mktemp("ref"))
    assert runs.run(out, ITERS, "checkpoint.interval=2") == 0, runs.output(out)
    return {it: v[0] for it, v in runs.losses(out).items()}


def _logged_once(out: str) -> dict[int, float]:
    """metrics.jsonl's training losses; each iteration must appear exactly once."""
    got = runs.losses(out)
    twice = [it for it, v in got.items() if len(v) != 1]
    assert not twice, f"iterations logged more than once: {twice}"
    return {it: v[0] for it, v in got.items()}


def _assert_equal_to(reference: dict[int, float], got: dict[int, float]) -> None:
    assert sorted(got) == sorted(reference)[:len(got)]
    for it, v in got.items():
        assert v == reference[it], f"iteration {it}: {v!r} != {reference[it]!r}"


def _resumed_from(text: str) -> str:
    m = re.findall(r"resumed from checkpoint \S+/(iter_\d+) ", text)
    return m[-1] if m else ""


def _one_error_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------- retention and resume

def test_incomplete_newer_checkpoint_is_reported_never_resumed_never_counted(tmp_path, reference):
    out = str(tmp_path)
    assert runs.run(out, ITERS, "checkpoint.interval=2", "checkpoint.keep_last=1",
                    env_extra={"POLYTRON_KILL_AT": "step:5"}) == -signal.SIGKILL, runs.output(out)
    broken = os.path.join(out, "checkpoints", "iter_0000006")
    shutil.copytree(os.path.join(out, "checkpoints", "iter_0000004"), broken)
    os.remove(os.path.join(broken, "manifest.json"))                      # a damaged copy
    assert runs.run(out, ITERS, "checkpoint.interval=2", "checkpoint.keep_last=1") == 0, runs.output(out)
    text = runs.last_output(out)
    assert _resumed_from(text) == "iter_0000004", text
    assert re.search(r"warning: checkpoint \S+iter_0000006 is incomplete", text), text
    assert runs.complete(out) == ["iter_0000004", "iter_0000008"]          # resumed-from + newest
    assert os.path.isdir(os.path.join(out, "checkpoints", "abandoned")), "the broken copy was deleted"
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "iter_0000008"
    _assert_equal_to(reference, _logged_once(out))


def test_rollback_starts_a_lineage_and_keeps_the_abandoned_one(tmp_path, reference):
    out = str(tmp_path)
    assert runs.run(out, ITERS, "checkpoint.interval=2", "checkpoint.keep_last=4") == 0, runs.output(out)
    root = os.path.join(out, "checkpoints")
    target = os.path.join(root, "iter_0000004")
    assert runs.run(out, ITERS, "checkpoint.interval=2", "checkpoint.keep_last=1",
                    f"training.resume={target}", env_extra={"POLYTRON_KILL_AT": "step:3"}
                    ) == -signal.SIGKILL, runs.output(out)          # killed in iteration 7
    text = runs.last_output(out)
    assert "new lineage from checkpoint" in text and "iter_0000006, iter_0000008" in text, text
    aside = sorted(os.path.basename(d) for d, _, files in os.walk(os.path.join(root, "abandoned"))
                   if "manifest.json" in files)
    assert aside == ["iter_0000006", "iter_0000008"], aside                 # kept, intact
    assert runs.complete(out) == ["iter_0000004", "iter_0000006"]           # resumed-from is protected
    assert runs.run(out, ITERS, "checkpoint.interval=2", "checkpoint.keep_last=1") == 0, runs.output(out)
    assert _resumed_from(runs.last_output(out)) == "iter_0000006"           # the new lineage
    _assert_equal_to(reference, _logged_once(out))
    abandoned = [json.loads(line) for line in open(os.path.join(out, "metrics-abandoned.jsonl"))]
    assert [r["iteration"] for r in abandoned if "loss" in r] == [5, 6, 7, 8]


# ---------------------------------------------------------------- settings that change weights

def test_changing_tied_embeddings_on_resume_is_refused(tmp_path):
    out = str(tmp_path)
    assert runs.run(out, 2, "checkpoint.interval=2") == 0, runs.output(out)
    before = runs.complete(out)
    p = runs.start(out, 4, "model.tie_embeddings=true")
    assert p.wait(timeout=180) == 2
    line = _one_error_line(runs.last_output(out))
    assert "model.tie_embeddings=False" in line and "model.tie_embeddings=True" in line, line
    assert runs.complete(out) == before


# ---------------------------------------------------------------- numerics

def test_non_finite_loss_stops_naming_the_iteration_and_saves_nothing_bad(tmp_path):
    out = str(tmp_path)
    p = runs.start(out, ITERS, "optimizer.lr=1e30", "schedule.warmup_iters=0", "optimizer.grad_clip=0",
                   "checkpoint.interval=1", "training.log_interval=4")
    assert p.wait(timeout=180) == 3, runs.output(out)
    line = _one_error_line(runs.output(out))
    m = re.search(r"non-finite (loss|gradient norm) at iteration (\d+)", line)
    assert m, line
    for name in runs.complete(out):                   # every checkpoint holds finite weights
        assert int(name[5:]) < int(m.group(2)), (name, line)
        tensors = ckpt.load_tensors(os.path.join(out, "checkpoints", name))
        assert all(torch.isfinite(t).all() for t in tensors.values()), name


def test_non_finite_steps_are_skipped_and_counted_under_skip(tmp_path):
    out = str(tmp_path)
    assert runs.run(out, 6, "optimizer.lr=1e30", "schedule.warmup_iters=0", "optimizer.grad_clip=0",
                    "training.nonfinite=skip") == 0, runs.output(out)
    recs = runs.records(out)
    assert recs[-1]["skipped_steps"] >= 1, recs[-1]
    assert "skipped iteration" in runs.output(out)


# ---------------------------------------------------------------- metrics after resume

def test_metrics_are_truncated_to_the_resumed_iteration(tmp_path, reference):
    out = str(tmp_path)
    p = runs.start(out, ITERS, "checkpoint.interval=4")
    assert runs.wait_until(p, lambda: len(runs.losses(out)) >= 6, timeout=180), runs.output(out)
    runs.kill_group(p)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"iteration": 7, "loss": 1.2')                          # a line cut by the kill
    assert runs.run(out, ITERS, "checkpoint.interval=4") == 0, runs.output(out)
    _assert_equal_to(reference, _logged_once(out))
    for line in open(os.path.join(out, "metrics.jsonl")):
        json.loads(line)
    plot = subprocess.run([sys.executable, os.path.join(runs.ROOT, "tools", "plot_metrics.py"), out],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr


# ---------------------------------------------------------------- the run lock

def test_second_run_in_the_same_directory_is_refused(tmp_path):
    out = str(tmp_path)
    first = runs.start(out, 10_000, "checkpoint.interval=0", "checkpoint.save_final=false")
    try:
        assert runs.wait_until(first, lambda: len(runs.losses(out)) >= 1, timeout=180), runs.output(out)
        second = runs.start(out, ITERS, logs=str(tmp_path / "second"))
        assert second.wait(timeout=180) == 2
        line = _one_error_line(runs.output(str(tmp_path / "second")))
        assert f"run directory {out} is in use by pid {first.pid}" in line, line
        seen = len(runs.losses(out))
        assert runs.wait_until(first, lambda: len(runs.losses(out)) > seen + 2, timeout=120), \
            "the first run stopped"
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=120) == 75, runs.output(out)
    finally:
        runs.kill_group(first)
    logged = _logged_once(out)                       # nothing interleaved from the second run
    assert sorted(logged) == list(range(1, len(logged) + 1))


def test_lock_of_a_killed_run_is_taken_over(tmp_path, reference):
    out = str(tmp_path)
    p = runs.start(out, ITERS, "checkpoint.interval=2")
    assert runs.wait_until(p, lambda: len(runs.complete(out)) >= 1, timeout=180), runs.output(out)
    runs.kill_group(p)                                                   # SIGKILL: no cleanup ran
    assert json.load(open(os.path.join(out, ".polytron.lock")))["pid"] == p.pid
    assert runs.run(out, ITERS, "checkpoint.interval=2") == 0, runs.output(out)
    assert "took over the run lock" in runs.last_output(out)
    _assert_equal_to(reference, _logged_once(out))


# ---------------------------------------------------------------- unwritable outputs, full disk

def test_unwritable_output_directory_is_one_error_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    p = runs.start(str(blocker / "run"), 2, logs=str(tmp_path / "logs"))
    assert p.wait(timeout=120) == 2
    line = _one_error_line(runs.output(str(tmp_path / "logs")))
    assert str(blocker) in line, line


def _small_filesystem(path: str, megabytes: int) -> bool:
    """Mount a tmpfs of ``megabytes`` at ``path`` (needs root); False when not permitted."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path],
                       capture_output=True)
    return r.returncode == 0


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, reference):
    """A checkpoint root on a file system with room for one checkpoint: the second save
    fails with one line, its partial directory is removed, the first stays complete and
    a later run resumes from it. Where mounting is not permitted, a per-file size limit
    (RLIMIT_FSIZE) makes the writes fail the same way (EFBIG instead of ENOSPC)."""
    out, ck = str(tmp_path / "run"), str(tmp_path / "ck")
    opts = ("checkpoint.interval=2", f"checkpoint.dir={ck}", "checkpoint.keep_last=1")
    mounted = _small_filesystem(ck, 9)            # one tiny checkpoint is ~6.4 MB
    try:
        if mounted:
            p = runs.start(out, ITERS, *opts)
        else:
            assert runs.run(out, 2, *opts) == 0, runs.output(out)
            p = subprocess.Popen(runs.command(out, ITERS, *opts), env=runs.env(), cwd=runs.ROOT,
                                 stdout=open(os.path.join(out, f"stdout-{time.time_ns()}.log"), "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=lambda: __import__("resource").setrlimit(
                                     __import__("resource").RLIMIT_FSIZE, (1 << 20, 1 << 20)))
        assert p.wait(timeout=240) == 2, runs.output(out)
        line = _one_error_line(runs.last_output(out))
        assert re.search(r"cannot write checkpoint \S+iter_0000004 \((0\.\d|\d+\.\d) MiB free on its "
                         r"file system\): rank 0: ", line), line
        assert "the partial save was removed, the newest complete checkpoint is iter_0000002" in line, line
        s = ckpt.scan(ck)
        assert s.complete == ["iter_0000002"] and not s.incomplete and not s.leftovers, s
        ckpt.verify_files(os.path.join(ck, "iter_0000002"), collective=False)
        saved = {it: v for it, v in _logged_once(out).items() if it <= 2}
    finally:
        if mounted:
            keep = str(tmp_path / "ck-copy")
            shutil.copytree(ck, keep)
            subprocess.run(["umount", ck], check=True)
            shutil.rmtree(ck)
            shutil.move(keep, ck)
    assert runs.run(out, ITERS, *opts) == 0, runs.output(out)
    assert _resumed_from(runs.last_output(out)) == "iter_0000002"
    _assert_equal_to(reference, _logged_once(out))
    assert all(reference[it] == v for it, v in saved.items())


# ---------------------------------------------------------------- kill -9 anywhere

#: Where a trial kills the run: a fault-injection site (pretrain/faults.py) and the hit
#: that fires it, or "time" (a random moment after the first logged step).
SITES = ["step:1", "step:2", "step:3", "save.write:1", "save.commit:1", "save.pointer:1",
         "retention:1", "time"]
FAULT_ITERS = 64
TRIALS = 20


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory) -> dict[int, float]:
    out = str(tmp_path_factory.mktemp("fault-ref"))
    assert runs.run(out, FAULT_ITERS, "checkpoint.interval=2") == 0, runs.output(out)
    return {it: v[0] for it, v in runs.losses(out).items()}


def _kill_trial(out: str, site: str, rng: random.Random) -> None:
    """One trial: run until the fault fires (or a timed SIGKILL), and make sure it died."""
    opts = ("checkpoint.interval=2", "checkpoint.keep_last=2")
    if site == "time":
        p = runs.start(out, FAULT_ITERS, *opts)
        logged = len(runs.losses(out))
        assert runs.wait_until(p, lambda: len(runs.losses(out)) > logged, timeout=180), runs.output(out)
        time.sleep(rng.uniform(0.0, 0.6))
        runs.kill_group(p)
    else:
        p = runs.start(out, FAULT_ITERS, *opts, env_extra={"POLYTRON_KILL_AT": site})
        p.wait(timeout=240)
    assert p.returncode == -signal.SIGKILL, f"trial {site} was not killed: {runs.last_output(out)}"


def test_kill_9_at_random_points_always_resumes_from_the_newest_complete(tmp_path, fault_reference):
    out = str(tmp_path)
    rng = random.Random(2026)
    newest_before = ""
    for trial in range(TRIALS):
        site = SITES[trial % len(SITES)] if trial < len(SITES) else rng.choice(SITES)
        _kill_trial(out, site, rng)
        done = runs.complete(out)
        newest = done[-1] if done else ""
        assert newest >= newest_before, f"trial {trial} ({site}): lost {newest_before}, have {done}"
        if trial:
            assert _resumed_from(runs.last_output(out)) == newest_before or not newest_before, \
                f"trial {trial} ({site}) did not resume from {newest_before}"
        newest_before = newest
        assert len(runs.losses(out)) < FAULT_ITERS, "the run finished: too few kill points"
    assert runs.run(out, FAULT_ITERS, "checkpoint.interval=2", "checkpoint.keep_last=2") == 0
    assert _resumed_from(runs.last_output(out)) == newest_before
    _assert_equal_to(fault_reference, _logged_once(out))
    assert sorted(_logged_once(out)) == list(range(1, FAULT_ITERS + 1))
    for line in open(os.path.join(out, "metrics-abandoned.jsonl")):    # the killed runs' own logs
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["loss"] == fault_reference[rec["iteration"]], rec
    s = ckpt.scan(os.path.join(out, "checkpoints"))
    # keep_last=2, plus the checkpoint the last run resumed from (never deleted by that run)
    assert s.complete == [newest_before, f"iter_{FAULT_ITERS - 2:07d}", f"iter_{FAULT_ITERS:07d}"]
    assert not s.incomplete and not s.leftovers, s
