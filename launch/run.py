#!/usr/bin/env python
"""torchrun that lets the workers save on SIGTERM / SIGUSR1 and exits with their status.

    python -m launch.run --nproc_per_node=2 launch/pretrain.py --config launch/configs/tiny.yaml
    python launch/run.py --nproc_per_node=2 launch/pretrain.py --config ...     # the same

Every torchrun option works: this runs ``torch.distributed.run`` in this process.
What differs from ``torchrun``:

* SIGTERM and SIGUSR1 are sent on to each worker process and the launcher keeps
  monitoring them, with no kill timeout: the trainers finish their step, save a
  checkpoint and exit 75. (torchrun itself dies from SIGUSR1, its default action,
  and answers SIGTERM with SIGTERM to the workers and SIGKILL 30 s later.)
* The exit status is the workers': 0 done; 75 (:data:`EXIT_REQUEUE`) when they saved
  and asked to be requeued; otherwise the status of the lowest failing rank, or
  128 + N for a worker killed by signal N. One line on stderr says which, never a
  traceback. (torchrun exits 1 for every worker failure and with a traceback after
  a signal.)
* SIGINT, SIGHUP and SIGQUIT keep torchrun's handling (the signal to the workers,
  SIGKILL after ``--shutdown-timeout``); the launcher then exits 128 + N.
* ``--max-restarts`` must be 0: a worker that saved and exited 75 must not be
  restarted by the agent; requeueing is the scheduler's job.

``launch/slurm/node_agent.py`` is this with the node rank and rendezvous taken from SLURM.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Mapping

from polytron.launch.env import LAUNCHER_PID_VAR  # noqa: E402
from polytron.model.errors import BadInput, Failure, error_line
from polytron.tools.cli import command

EXIT_REQUEUE = 75
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return sorted(pids)


class Forwarder:
    """Signal handler that passes SIGTERM / SIGUSR1 on to the workers (this process's children)."""

    def __init__(self, tag: str):
        self.tag = tag

    def install(self) -> None:
        """Take over the forwarded signals in this (main) thread."""
        for sig in FORWARDED:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        """Send the signal to every worker; with no worker started yet, stop the agent as torchrun would."""
        name = signal.Signals(signum).name
        kids = child_pids(os.getpid())
        if not kids:
            from torch.distributed.elastic.multiprocessing.api import SignalException
            raise SignalException(f"{name} before any worker started", sigval=signal.Signals(signum))
        note(self.tag, f"{name}: passing it to workers {kids}; they save and exit {EXIT_REQUEUE}")
        for pid in kids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def note(tag: str, text: str) -> None:
    """One status line on stderr."""
    print(f"[{tag}] {text}", file=sys.stderr, flush=True)


def narrow_signals(spec: str) -> str:
    """torchrun's ``--signals-to-handle`` without the signals this launcher forwards itself."""
    ours = {s.name for s in FORWARDED}
    return ",".join(s.strip() for s in spec.split(",") if s.strip() and s.strip() not in ours)


def requeue_requested(err: BaseException) -> bool:
    """True when torchrun stopped because workers saved and exited with EXIT_REQUEUE.

    The save is collective, so one worker exiting 75 means every rank saved. torchrun
    then sends SIGTERM to the workers still tearing down; those show up as killed by
    a signal (negative exit codes), which does not undo the save. Any other positive
    exit code is a real failure.
    """
    codes = [f.exitcode for f in (getattr(err, "failures", None) or {}).values()]
    return EXIT_REQUEUE in codes and all(c == EXIT_REQUEUE or c < 0 for c in codes)


def failure_status(codes: Mapping[int, int]) -> tuple[int, str]:
    """(exit status, one-line reason) for the workers' exit codes by global rank (0s omitted)."""
    if not codes:
        return 0, "workers finished"
    failures = {rank: codes[rank] for rank in sorted(codes)}
    if EXIT_REQUEUE in failures.values() and all(c == EXIT_REQUEUE or c < 0 for c in failures.values()):
        return EXIT_REQUEUE, f"workers saved a checkpoint and exited {EXIT_REQUEUE}: requeue to resume"
    for rank, code in failures.items():
        if code > 0 and code != EXIT_REQUEUE:
            return code, f"training failed: rank {rank} exited with status {code}"
    rank, code = next((r, c) for r, c in failures.items() if c < 0)
    return 128 - code, f"training failed: rank {rank} was killed by {signal.Signals(-code).name}"


def parse(argv: list[str]):
    """torchrun's own argument parsing, plus this launcher's rule on restarts."""
    from torch.distributed import run as torchrun
    args = torchrun.parse_args(argv)
    if args.max_restarts != 0:
        raise ValueError(f"--max-restarts={args.max_restarts}: must be 0 here, since a worker that saved "
                         f"and exited {EXIT_REQUEUE} would be restarted by the agent; requeue the job instead")
    args.signals_to_handle = narrow_signals(args.signals_to_handle)
    return args


def launch(argv: list[str], tag: str = "launch.run") -> int:
    """Run torchrun's agent in this process with forwarding; return the job-facing status.

    Bad options raise :class:`BadInput`, a failed rendezvous :class:`Failure` (exit 1).
    """
    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    try:
        args = parse(argv)
    except ValueError as e:
        raise BadInput(str(e)) from None
    os.environ[LAUNCHER_PID_VAR] = str(os.getpid())
    Forwarder(tag).install()
    try:
        torchrun.run(args)
    except ValueError as e:                      # torchrun's own checks of its options
        raise BadInput(error_line(e)) from None
    except (RendezvousError, DistError) as e:    # e.g. the master port is taken
        raise Failure(f"torchrun rendezvous failed: {error_line(e)}") from None
    except ChildFailedError as err:
        status, reason = failure_status({rank: f.exitcode for rank, f in err.failures.items()})
        note(tag, reason)
        return status
    except SignalException as e:
        note(tag, f"stopped by {e.sigval.name} (torchrun passed it to any workers; nothing saved)")
        return 128 + int(e.sigval)
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m launch.run [torchrun options] SCRIPT [script args]``."""
    return launch(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
