"""launch/submit.py without a cluster: the rendered batch script and bad-input messages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from polytron.launch.slurm.node_agent import requeue_requested, torchrun_args
from polytron.launch.submit import SubmitError, main, parse_time

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "launch" / "configs" / "tiny.yaml"


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The tool as users run it: a separate process."""
    return subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


def submit_here(capsys, *args: str) -> SimpleNamespace:
    """``launch.submit.main`` in this process (fast): returncode, stdout, stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_dry_run_renders_the_job():
    r = submit("--config", str(TINY), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
               "--account", "proj", "--time", "1-00:00:00", "--dry-run", "training.iterations=7")
    assert r.returncode == 0, r.stderr
    s = r.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append",
                 "/%x-%j.out", f"PYTHON={sys.executable}", "scontrol requeue", "trap 'on_signal USR1' USR1",
                 "node_agent.py --nproc-per-node=4", "training.iterations=7"):
        assert line in s, line
    assert "{{" not in s


def test_srun_launcher_runs_one_task_per_process(capsys):
    r = submit_here(capsys, "--config", str(TINY), "--procs-per-node", "2", "--launcher", "srun", "--time", "30",
               "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --ntasks-per-node=2" in r.stdout and "srun --ntasks-per-node=2" in r.stdout
    assert "#SBATCH --signal=B:USR1@180" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--config", str(TINY), "--nodes", "0"], "--nodes must be >= 1"),
    (["--config", str(TINY), "--time", "soon"], "--time 'soon' is not a positive SLURM time limit"),
    (["--config", str(TINY), "--time", "10", "--signal-seconds", "900"], "--signal-seconds 900 must be"),
    (["--config", str(TINY), "--gpus-per-node", "2", "--procs-per-node", "3"], "must equal --gpus-per-node"),
    (["--config", str(TINY), "--procs-per-node", "2", "parallel.tensor=4"], "2 processes"),
    (["--config", str(TINY), "training.nope=1"], "unknown config key 'training.nope'"),
])
def test_bad_input_is_one_line_and_status_2(capsys, args, message):
    r = submit_here(capsys, *args, "--dry-run")
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_sbatch_is_a_clear_error(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    r = submit("--config", str(TINY), env=env)
    assert r.returncode == 2 and "sbatch not found on PATH" in r.stderr


def test_time_formats():
    assert [parse_time(t) for t in ("30", "5:00", "01:00:00", "1-2", "1-0:30", "2-00:00:01")] == \
        [1800, 300, 3600, 93600, 88200, 172801]
    with pytest.raises(SubmitError):
        parse_time("0")


def test_node_agent_arguments_and_exit_75():
    args = torchrun_args(["--nproc-per-node=2", "train.py"],
                         {"SLURM_NNODES": "3", "SLURM_NODEID": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "123"})
    assert args[:4] == ["--nnodes=3", "--node-rank=1", "--master-addr=n0", "--master-port=123"]
    def fail(*codes):
        return SimpleNamespace(failures={i: SimpleNamespace(exitcode=c) for i, c in enumerate(codes)})
    assert requeue_requested(fail(75, 75)) and requeue_requested(fail(75, -15))
    assert not requeue_requested(fail(1, 75)) and not requeue_requested(fail(-9)) and not requeue_requested(fail())
