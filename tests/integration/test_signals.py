"""SIGTERM / SIGUSR1 to the launcher of a real 2-process CPU run: who saves, what exits how.

``python -m launch.run`` (torchrun's options, signals passed on) must end with the
workers' checkpoint and status 75, no traceback, no worker left. Plain ``torchrun``
is pinned to the behaviour docs/launch.md documents for torch 2.13: SIGTERM reaches
the workers (they save) but torchrun exits 1 with its SignalException traceback;
SIGUSR1 kills torchrun, and the workers, tied to it by PR_SET_PDEATHSIG, save and exit.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from polytron.launch.run import EXIT_REQUEUE, child_pids, failure_status, narrow_signals
from tests.checkpoint import runs

ITERATIONS = 100000          # never reached: every run here ends by a signal


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for every pid to exit; return the ones still alive."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture
def leftovers():
    """Worker pids to SIGKILL at teardown should a test fail while they still run."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def launch_and_signal(out: str, sig: int, front: bool, leftovers: list[int]) -> tuple[int, str, list[int]]:
    """Start 2 workers under torchrun or launch.run, signal the launcher pid once training
    runs, and return (launcher status, output so far, worker pids)."""
    cmd = runs.command(out, ITERATIONS, "checkpoint.interval=0", nproc=2)
    if front:
        cmd = [sys.executable, "-m", "launch.run", *cmd[1:]]
    os.makedirs(out)
    with open(os.path.join(out, "stdout-launcher.log"), "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=runs.env(), cwd=runs.ROOT,
                             start_new_session=True)
    try:
        assert runs.wait_until(p, lambda: len(runs.records(out)) >= 2, 240), runs.output(out)[-3000:]
        workers = child_pids(p.pid)
        leftovers += workers
        assert len(workers) == 2, workers
        os.kill(p.pid, sig)                      # the launcher only, not its process group
        status = p.wait(timeout=180)
        return status, runs.output(out), workers
    finally:
        runs.kill_group(p)


def saved_iteration(text: str, sig: int) -> int:
    """The iteration the workers reported saving at after signal ``sig``."""
    m = re.search(rf"signal {int(sig)}: saved at iteration (\d+), exiting with status 75", text)
    assert m, text[-3000:]
    return int(m.group(1))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_launch_run_saves_and_exits_75(tmp_path, sig, leftovers):
    out = str(tmp_path / "run")
    status, text, workers = launch_and_signal(out, sig, True, leftovers)
    assert status == EXIT_REQUEUE, text[-3000:]
    assert "Traceback" not in text
    assert f"[launch.run] {sig.name}: passing it to workers" in text
    assert "[launch.run] workers saved a checkpoint and exited 75" in text
    it = saved_iteration(text, sig)
    assert f"iter_{it:07d}" in runs.complete(out)
    assert runs.tmp_dirs(out) == []
    assert wait_gone(workers, 10) == [], "workers outlived the launcher"


@pytest.mark.timeout(300)
def test_plain_torchrun_sigterm_saves_but_exits_1(tmp_path, leftovers):
    """torchrun passes SIGTERM on (30 s before SIGKILL); its own status is 1, with a traceback."""
    out = str(tmp_path / "run")
    status, text, workers = launch_and_signal(out, signal.SIGTERM, False, leftovers)
    assert status == 1, text[-3000:]
    assert "SignalException" in text                       # torch's traceback, documented
    it = saved_iteration(text, signal.SIGTERM)
    assert f"iter_{it:07d}" in runs.complete(out)
    assert wait_gone(workers, 10) == [], "workers outlived torchrun"


@pytest.mark.timeout(300)
def test_plain_torchrun_sigusr1_workers_save_after_it_dies(tmp_path, leftovers):
    """torchrun dies of SIGUSR1; PR_SET_PDEATHSIG turns that into SIGTERM for the workers."""
    out = str(tmp_path / "run")
    status, _, workers = launch_and_signal(out, signal.SIGUSR1, False, leftovers)
    assert status == -signal.SIGUSR1
    assert wait_gone(workers, 120) == [], "orphaned workers kept running"
    text = runs.output(out)                                 # the workers' lines arrive after torchrun died
    it = saved_iteration(text, signal.SIGTERM)
    assert f"iter_{it:07d}" in runs.complete(out)


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from polytron.launch.env import follow_launcher
    print(follow_launcher(), flush=True)
    time.sleep(60)
""")
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
    print(child.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("under_torchrun", [True, False], ids=["torchelastic-worker", "plain-process"])
def test_follow_launcher_signals_orphan(under_torchrun):
    """A worker of a torchelastic agent gets SIGTERM when the agent dies; other processes do not."""
    env = runs.env()
    env.pop("TORCHELASTIC_RUN_ID", None)
    env.pop("POLYTRON_LAUNCHER_PID", None)
    if under_torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD.format(root=runs.ROOT)],
                              stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == str(under_torchrun)
        parent.kill()
        parent.wait(timeout=10)
        left = wait_gone([child], 10 if under_torchrun else 2)
        assert left == ([] if under_torchrun else [child])
    finally:
        runs.kill_group(parent)
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_failure_status_and_signal_list():
    assert failure_status({}) == (0, "workers finished")
    assert failure_status({0: 75, 1: 75})[0] == 75
    assert failure_status({0: -15, 1: 75})[0] == 75          # SIGTERMed while tearing down after the save
    assert failure_status({0: 75, 1: 2}) == (2, "training failed: rank 1 exited with status 2")
    assert failure_status({1: -9}) == (137, "training failed: rank 1 was killed by SIGKILL")
    assert narrow_signals("SIGTERM,SIGINT, SIGUSR1,SIGHUP") == "SIGINT,SIGHUP"


@pytest.mark.timeout(120)
def test_launch_run_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.run", "--max-restarts=3", "--nproc_per_node=2",
                        runs.LAUNCH], capture_output=True, text=True, env=runs.env(), cwd=runs.ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --max-restarts=3") and r.stderr.count("\n") == 1
    cmd = runs.command(str(tmp_path / "bad"), 3, "model.no_such_key=1", nproc=2)
    r = subprocess.run([sys.executable, "-m", "launch.run", *cmd[1:]], capture_output=True, text=True,
                       env=runs.env(), cwd=runs.ROOT, timeout=100)
    assert r.returncode == 2, r.stderr[-2000:]          # the workers' status, not torchrun's 1
    assert "error: unknown config key 'model.no_such_key'" in r.stderr and "Traceback" not in r.stderr
    assert re.search(r"\[launch.run\] training failed: rank \d exited with status 2\n$", r.stderr)
