#!/usr/bin/env python
"""One per node under ``srun``: ``launch/run.py`` (torchrun with save-on-signal) with SLURM's node rank.

    srun --ntasks-per-node=1 python launch/slurm/node_agent.py --nproc-per-node=8 \\
        launch/pretrain.py --config run.yaml [overrides]

What it adds to plain ``python -m torch.distributed.run``:

* ``--nnodes`` / ``--node-rank`` come from ``SLURM_NNODES`` / ``SLURM_NODEID`` of this
  srun task, and the static rendezvous from ``MASTER_ADDR`` / ``MASTER_PORT``
  (set by the batch script from the allocation), so one command line serves all nodes.
* From ``launch/run.py``: SIGUSR1 and SIGTERM are forwarded to the worker processes
  while the agent keeps monitoring them. (A bare torchrun agent dies from SIGUSR1,
  its default action, without telling the workers, and answers SIGTERM by
  terminating the workers itself after a 30 s grace.) The workers save a checkpoint
  and exit with :data:`EXIT_REQUEUE`.
* When workers exited with 75 (the others at most killed during teardown) the agent
  exits 75 too (torchrun alone turns any worker failure into status 1), so the batch
  script knows to requeue.
"""
from __future__ import annotations

import os
import sys

from polytron.launch.run import EXIT_REQUEUE, FORWARDED, child_pids, launch, requeue_requested  # noqa: E402,F401
from polytron.model.errors import BadInput
from polytron.tools.cli import command

#: Seconds node 0's agent waits for every node to join, and the others to reach node 0
#: (torchrun's static rendezvous, ``--rdzv-conf timeout=``); ``POLYTRON_RENDEZVOUS_TIMEOUT`` overrides.
RENDEZVOUS_TIMEOUT_VAR = "POLYTRON_RENDEZVOUS_TIMEOUT"
RENDEZVOUS_TIMEOUT_S = 900


def rendezvous_timeout(env: dict[str, str]) -> int:
    """The rendezvous timeout in seconds from the environment; ValueError naming the variable."""
    raw = env.get(RENDEZVOUS_TIMEOUT_VAR, str(RENDEZVOUS_TIMEOUT_S))
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{RENDEZVOUS_TIMEOUT_VAR}={raw!r} is not a whole number of seconds >= 1")
    return seconds


def torchrun_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """torchrun's command line: ours plus node count, node rank and rendezvous from SLURM.

    The rendezvous gets a timeout (:data:`RENDEZVOUS_TIMEOUT_VAR`) unless ``--rdzv-conf``
    is given, so a node that never starts stops the others with one line instead of a hang.
    """
    nnodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    node_rank = env.get("SLURM_NODEID", "0")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT", "29500")
    ours = [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={addr}",
            f"--master-port={port}", "--max-restarts=0"]
    if not any(a.split("=")[0] in ("--rdzv-conf", "--rdzv_conf") for a in argv):
        ours.append(f"--rdzv-conf=timeout={rendezvous_timeout(env)}")
    return [*ours, *argv]


@command
def main(argv: list[str]) -> int:
    """Run torchrun in this process with SLURM-derived arguments; return the job-facing status."""
    # Grace for the signals torchrun still handles itself (SIGINT, SIGHUP, SIGQUIT).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    try:
        args = torchrun_args(argv, dict(os.environ))
    except ValueError as e:
        raise BadInput(str(e)) from None
    return launch(args, tag="node_agent")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
