"""SLURM end to end: a real single-node cluster, the submit tool, the trainer, signal + requeue.

Starts munged/slurmctld/slurmd (tests/integration/slurm_cluster.py), submits the tiny
config as a 2-process job with ``launch/submit.py`` and checks the results on disk.
Skips, saying what to install, where the SLURM packages are missing or not root.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster, missing_requirements

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "launch" / "configs" / "tiny.yaml"
ITERATIONS = 40
#: Small and fast on 2 CPU cores: ~0.5 s per step, no eval, no periodic checkpoints.
FAST = [f"training.iterations={ITERATIONS}", "training.log_interval=2", "training.micro_batch_size=2",
        "training.global_batch_size=4", "data.seq_len=64", "training.eval_interval=0",
        "checkpoint.interval=1000", "logging.wandb=false", "logging.progress_bar=false"]

MISSING = missing_requirements()
pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(MISSING is not None, reason=f"skipped: {MISSING}")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One SLURM cluster for this module; always shut down, also when a test fails."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def submit(cluster: SlurmCluster, run_dir: Path, *extra: str) -> str:
    """Submit the tiny config as 1 node x 2 processes; return the job id."""
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--config", str(TINY),
           "--nodes", "1", "--procs-per-node", "2", "--time", "10", "--job-name", run_dir.name,
           f"training.output_dir={run_dir}", *FAST, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, cwd=run_dir.parent, timeout=120)
    assert r.returncode == 0, f"submit failed:\n{r.stdout}\n{r.stderr}"
    m = re.search(r"submitted job (\d+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


def metrics(run_dir: Path) -> list[dict]:
    """Parsed metrics.jsonl lines (empty when not written yet)."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def job_log(run_dir: Path, job_id: str) -> str:
    """The job's log file (one per job, appended across requeues)."""
    return (run_dir / "logs" / f"{run_dir.name}-{job_id}.out").read_text(errors="replace")


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def check_finished(cluster: SlurmCluster, job_id: str, run_dir: Path, timeout_s: float) -> dict:
    """Wait for the job; assert it completed with exit 0 and a final checkpoint."""
    info = cluster.wait_job(job_id, timeout_s)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    ckpts = run_dir / "checkpoints"
    final = f"iter_{ITERATIONS:07d}"
    assert (ckpts / "latest").read_text().strip() == final, log[-4000:]
    assert (ckpts / final).is_dir()
    assert metrics(run_dir)[-1]["iteration"] == ITERATIONS
    return info


@pytest.mark.timeout(300)
def test_job_trains_and_checkpoints(cluster, tmp_path):
    run_dir = tmp_path / "plain"
    job_id = submit(cluster, run_dir)
    info = check_finished(cluster, job_id, run_dir, timeout_s=240)
    assert info["Restarts"] == "0"
    losses = [m["loss"] for m in metrics(run_dir)]
    assert losses[-1] < losses[0] - 0.5, losses
    log = job_log(run_dir, job_id)
    assert f"job {job_id} restart 0" in log and "training step exited with status 0" in log


@pytest.mark.timeout(300)
def test_signal_saves_requeues_and_resumes(cluster, tmp_path):
    run_dir = tmp_path / "requeue"
    job_id = submit(cluster, run_dir)
    # Some progress first, then what SLURM does before the time limit: SIGUSR1 to the batch shell.
    wait_for(lambda: len(metrics(run_dir)) >= 2, 150, "the first metrics lines")
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(lambda: cluster.job_info(job_id).get("Restarts", "0") != "0", 120, "the job to requeue")
    check_finished(cluster, job_id, run_dir, timeout_s=200)

    log = job_log(run_dir, job_id)
    saved = re.search(r"saved at iteration (\d+), exiting with status 75", log)
    assert saved, log[-4000:]
    it = int(saved.group(1))
    assert 0 < it < ITERATIONS
    assert "got SIGUSR1" in log and f"requeueing job {job_id} (restart 1)" in log
    # The node agent passed the signal on and reported the workers' 75; nothing crashed.
    assert "[node_agent] workers saved a checkpoint and exited 75" in log, log[-4000:]
    assert "training step exited with status 75" in log and "Traceback" not in log, log[-4000:]
    assert f"job {job_id} restart 1" in log
    resumed = re.search(r"resumed from checkpoint (\S+) at iteration (\d+)", log)
    assert resumed and int(resumed.group(2)) == it, log[-4000:]
    assert Path(resumed.group(1)).name == f"iter_{it:07d}"
    assert (run_dir / "checkpoints" / f"iter_{it:07d}").is_dir()
    # The requeued run continued where the first stopped and ended on the same iteration
    # as an uninterrupted job.
    its = [m["iteration"] for m in metrics(run_dir)]
    assert its[-1] == ITERATIONS and max(its) == ITERATIONS
