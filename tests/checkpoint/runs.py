"""Run launch/pretrain.py in subprocesses on a tiny fp32 CPU model and read its metrics."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

from polytron.launch.env import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch", "pretrain.py")
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=128", "model.max_seq_len=64", "data.seq_len=64",
        "training.micro_batch_size=2", "training.global_batch_size=4", "training.log_interval=1",
        "training.eval_interval=0", "logging.wandb=false", "logging.progress_bar=false",
        "training.device=cpu", "precision.dtype=fp32", "schedule.warmup_iters=2"]


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # test-only plugins (model.plugins=[tests....]) import from the checkout, as a user's own
    # plugin package would from their PYTHONPATH
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    e.pop("WORLD_SIZE", None), e.pop("RANK", None), e.pop("SLURM_PROCID", None), e.pop("SLURM_NTASKS", None)
    return e


def command(out: str, iterations: int, *extra: str, nproc: int = 1) -> list[str]:
    args = ["--config", os.path.join(ROOT, "launch", "configs", "tiny.yaml"), *TINY,
            f"training.iterations={iterations}", f"training.output_dir={out}", *extra]
    if nproc == 1:
        return [sys.executable, LAUNCH, *args]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--nnodes=1", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", LAUNCH, *args]


def start(out: str, iterations: int, *extra: str, nproc: int = 1, env_extra: Optional[dict] = None,
          logs: Optional[str] = None) -> subprocess.Popen:
    """Start a run writing to ``out``; its console output goes to ``stdout-<ns>.log`` in
    ``logs`` (default ``out``). ``env_extra`` adds environment variables."""
    logs = logs or out
    os.makedirs(logs, exist_ok=True)
    log = open(os.path.join(logs, f"stdout-{time.time_ns()}.log"), "w")
    return subprocess.Popen(command(out, iterations, *extra, nproc=nproc), stdout=log,
                            stderr=subprocess.STDOUT, env=dict(env(), **(env_extra or {})), cwd=ROOT,
                            start_new_session=True)


def run(out: str, iterations: int, *extra: str, nproc: int = 1, timeout: float = 300,
        env_extra: Optional[dict] = None, logs: Optional[str] = None) -> int:
    """Run to completion; returns the exit status."""
    p = start(out, iterations, *extra, nproc=nproc, env_extra=env_extra, logs=logs)
    try:
        return p.wait(timeout=timeout)
    finally:
        kill_group(p)


def assert_resumed_loss(out: str, ckpt_dir: str, ref_loss: float, iterations: int, *extra: str,
                        nproc: int = 1, timeout: float = 300, label: str = "") -> None:
    """Resume ``ckpt_dir`` (saved at ``iterations - 1``) in the layout of ``extra`` and check
    that the one remaining step's loss is within 1e-5 relative of ``ref_loss``."""
    rc = run(out, iterations, f"training.resume={ckpt_dir}", "checkpoint.save_final=false", *extra,
             nproc=nproc, timeout=timeout)
    text = output(out)
    assert rc == 0, text
    assert f"resumed from checkpoint {ckpt_dir} at iteration {iterations - 1}" in text
    got = losses(out)
    assert sorted(got) == [iterations], got
    loss = got[iterations][0]
    print(f"step-{iterations} loss after resharding: {loss!r} vs {label} {ref_loss!r} "
          f"(relative difference {abs(loss - ref_loss) / abs(ref_loss):.2e})")
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the run's whole process group (torchrun and its workers)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(timeout=60)


def output(out: str) -> str:
    return "".join(open(f).read() for f in sorted(glob.glob(os.path.join(out, "stdout-*.log"))))


def last_output(out: str) -> str:
    """Console output of the most recent run that logged into ``out``."""
    files = sorted(glob.glob(os.path.join(out, "stdout-*.log")))
    return open(files[-1]).read() if files else ""


def records(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    recs = []
    for line in open(path).read().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:      # a line cut by SIGKILL
            pass
    return [r for r in recs if "loss" in r]


def losses(out: str) -> dict[int, list[float]]:
    """Every logged training loss per iteration (several when a killed run logged it too)."""
    got: dict[int, list[float]] = {}
    for r in records(out):
        got.setdefault(r["iteration"], []).append(r["loss"])
    return got


def wait_until(p: subprocess.Popen, cond: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if p.poll() is not None:
            return cond()
        time.sleep(poll)
    return False


def tmp_dirs(out: str) -> list[str]:
    return glob.glob(os.path.join(out, "checkpoints", "iter_*.tmp"))


def complete(out: str) -> list[str]:
    return sorted(os.path.basename(d) for d in glob.glob(os.path.join(out, "checkpoints", "iter_???????"))
                  if os.path.isfile(os.path.join(d, "manifest.json")))


__all__ = ["run", "start", "kill_group", "losses", "records", "output", "last_output", "wait_until",
           "tmp_dirs", "complete", "ROOT"]
