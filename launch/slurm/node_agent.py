#!/usr/bin/env python
"""One per node under ``srun``: torchrun with SLURM's node rank, signal forwarding and exit 75 kept.

    srun --ntasks-per-node=1 python launch/slurm/node_agent.py --nproc-per-node=8 \\
        launch/pretrain.py --config run.yaml [overrides]

What it adds to plain ``python -m torch.distributed.run``:

* ``--nnodes`` / ``--node-rank`` come from ``SLURM_NNODES`` / ``SLURM_NODEID`` of this
  srun task, and the static rendezvous from ``MASTER_ADDR`` / ``MASTER_PORT``
  (set by the batch script from the allocation), so one command line serves all nodes.
* SIGUSR1 and SIGTERM are forwarded to the worker processes while the agent keeps
  monitoring them. (A bare torchrun agent dies from SIGUSR1, its default action,
  without telling the workers, and answers SIGTERM by terminating the workers
  itself after a 30 s grace.) The workers save a checkpoint and exit with
  :data:`EXIT_REQUEUE`.
* When workers exited with 75 (the others at most killed during teardown) the agent exits 75 too (torchrun alone
  turns any worker failure into status 1), so the batch script knows to requeue.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

EXIT_REQUEUE = 75
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def forward(signum: int, frame: object) -> None:
    """Pass the signal to the training workers (our children); the agent keeps monitoring them."""
    name = signal.Signals(signum).name
    kids = child_pids(os.getpid())
    print(f"[node_agent] {name}: forwarding to workers {kids}", file=sys.stderr, flush=True)
    for pid in kids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def torchrun_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """torchrun's command line: ours plus node count, node rank and rendezvous from SLURM."""
    nnodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    node_rank = env.get("SLURM_NODEID", "0")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT", "29500")
    return [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={addr}",
            f"--master-port={port}", "--max-restarts=0", *argv]


def requeue_requested(err: BaseException) -> bool:
    """True when torchrun stopped because workers saved and exited with EXIT_REQUEUE.

    The save is collective, so one worker exiting 75 means every rank saved. torchrun
    then sends SIGTERM to the workers still tearing down; those show up as killed by
    a signal (negative exit codes), which does not undo the save. Any other positive
    exit code is a real failure.
    """
    codes = [f.exitcode for f in (getattr(err, "failures", None) or {}).values()]
    return EXIT_REQUEUE in codes and all(c == EXIT_REQUEUE or c < 0 for c in codes)


def main(argv: list[str]) -> int:
    """Run torchrun in this process with SLURM-derived arguments; return the job-facing status."""
    # torchrun must not turn SIGTERM into "kill the workers now": leave it to forward().
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    for sig in FORWARDED:
        signal.signal(sig, forward)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(torchrun_args(argv, dict(os.environ)))
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        if requeue_requested(err):
            print(f"[node_agent] workers saved and asked for requeue (exit {EXIT_REQUEUE})",
                  file=sys.stderr, flush=True)
            return EXIT_REQUEUE
        first = min(err.failures.items())
        print(f"[node_agent] training failed: rank {first[0]} exit {first[1].exitcode}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
