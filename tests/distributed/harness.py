"""Run functions on N processes with a real process group; collect per-rank results.

    results = run_distributed(fn, 2, arg1, arg2, backend="gloo", timeout=120)
    batch = run_batch([Call("a", fn, (x,), budget_s=60), Call("b", fn, (y,))], 2, base_s=60)
    batch.get("a")          # a's per-rank results, or raises a's own failure

``fn(*args)`` runs on every rank after ``torch.distributed.init_process_group``
(rank, world size and a free TCP port are set in the environment, so ``fn`` can
build meshes exactly as under ``torchrun``). Its return value is pickled back;
``results[r]`` is rank r's. ``fn`` must be importable (a module-level function),
because workers are started with the ``spawn`` method.

A batch runs its calls in order in one spawn of N processes (the process start
dominates on a 2-core CI machine). Failures are loud, fast and the failing call's own:

* an exception on any rank fails that call with the traceback of the rank that raised
  first (peers that fail later, e.g. on a closed connection, are not the cause);
* a rank that dies without a result (a C++ abort, a signal) fails the call it was running,
  and is named as the cause even when a peer then raised on the closed connection; the
  failure shows the exit code (and signal) and the tail of the dead rank's stderr (each
  rank's stderr goes to a file of the batch);
* a call that runs past its ``budget_s`` (counted from the end of the previous call; the
  first call also gets ``base_s`` for process start and rendezvous) fails as timed out
  with the ranks still running, so a hung collective fails its test instead of stalling CI.

The process groups of every call's meshes stay alive until the spawn ends (torch caches
them by name: destroying them breaks later calls), and each gloo group holds threads and
sockets: by the end of the world-2 equivalence batch a rank holds ~1,000 descriptors, so
workers raise their descriptor limit to the hard limit.

After a failure every rank is killed (peers are likely blocked in a collective) and a
fresh spawn runs only the calls after the failed one: calls that passed are neither
re-run nor affected, and a batch's total time limit grows with its number of calls.
:func:`run_distributed` is a batch of one call that raises its failure.

``backends(world_size)`` gives the backends to parametrize over: ``gloo`` always,
``nccl`` when that many GPUs exist (each rank then uses ``cuda:<rank>``).
"""
from __future__ import annotations

import os
import pickle
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.multiprocessing as mp

from polytron.launch.env import free_port

#: how often the parent looks at the ranks' result files
POLL_S = 0.05


class DistributedTestError(AssertionError):
    """A rank raised, died, or the run timed out."""


@dataclass(frozen=True)
class Call:
    """One call of a batch: ``fn(*args)`` on every rank, within ``budget_s`` seconds."""
    name: str
    fn: Callable
    args: tuple = ()
    budget_s: float = 180.0


@dataclass
class BatchResult:
    """Per-call outcomes of :func:`run_batch`."""
    results: dict[str, list[Any]] = field(default_factory=dict)   # name -> per-rank results
    errors: dict[str, DistributedTestError] = field(default_factory=dict)
    spawns: list[list[str]] = field(default_factory=list)         # the calls each spawn was given

    def get(self, name: str) -> list[Any]:
        """``name``'s per-rank results; raises its own failure if it failed."""
        if name in self.errors:
            raise self.errors[name]
        return self.results[name]


def backends(world_size: int) -> list[str]:
    """Backends a test over ``world_size`` ranks can run on here."""
    out = ["gloo"]
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        out.append("nccl")
    return out


def device_for(backend: str) -> torch.device:
    """This rank's device: ``cuda:<local rank>`` under NCCL, else CPU."""
    if backend == "nccl":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def run_distributed(fn: Callable, world_size: int, *args: Any, backend: str = "gloo",
                    timeout: float = 180.0, threads: int = 1) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return the per-rank results.

    ``threads`` is each rank's intra-op thread count (1 keeps N ranks from
    oversubscribing a small CI machine).
    """
    batch = run_batch([Call("run", fn, args, timeout)], world_size, backend=backend, base_s=0.0,
                      threads=threads)
    return batch.get("run")


def run_batch(calls: Sequence[Call], world_size: int, *, backend: str = "gloo", base_s: float = 60.0,
              threads: int = 1) -> BatchResult:
    """Run ``calls`` in order on ``world_size`` processes; each call passes or fails on its own."""
    names = [c.name for c in calls]
    assert len(set(names)) == len(names), f"duplicate call names in {names}"
    out = BatchResult()
    pending = list(calls)
    while pending:
        out.spawns.append([c.name for c in pending])
        pending = pending[_spawn(pending, world_size, backend, base_s, threads, out):]
    return out


def batch_timeout(budgets: Sequence[float], base_s: float) -> float:
    """Longest a batch of calls with these budgets can take (every call at its limit)."""
    return base_s + sum(budgets)


def _spawn(calls: list[Call], world_size: int, backend: str, base_s: float, threads: int,
           out: BatchResult) -> int:
    """One spawn of ``world_size`` ranks over ``calls``; returns how many calls it settled."""
    ctx = mp.get_context("spawn")
    port = free_port()
    pg_timeout_s = max(batch_timeout([c.budget_s for c in calls], base_s), 30.0)  # the parent decides first
    with tempfile.TemporaryDirectory(prefix="polytron-dist-") as out_dir:
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, port, backend, threads, out_dir, calls, pg_timeout_s))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            return _follow(procs, out_dir, calls, base_s, out)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)


def _follow(procs: list, out_dir: str, calls: list[Call], base_s: float, out: BatchResult) -> int:
    """Settle the calls in order; stop at the first failure. Returns the number settled."""
    start, grace = time.monotonic(), base_s          # process start counts against the first call
    for i, call in enumerate(calls):
        failure = _await_call(procs, out_dir, i, start + grace + call.budget_s, call.budget_s + grace)
        if failure is not None:
            out.errors[call.name] = DistributedTestError(f"{call.name}: {failure}")
            return i + 1
        out.results[call.name] = [_payload(out_dir, r, i) for r in range(len(procs))]
        start, grace = time.monotonic(), 0.0
    return len(calls)


def _await_call(procs: list, out_dir: str, i: int, deadline: float, limit: float) -> Optional[str]:
    """Poll until every rank has a result for call ``i``; the failure text, or None."""
    status: list[Optional[str]] = [None] * len(procs)
    while True:
        status = [s or _status(out_dir, r, i) for r, s in enumerate(status)]   # results are final
        raised = [r for r, s in enumerate(status) if s == "error"]
        if raised:
            time.sleep(0.5)           # a peer that died first is the cause: let its exit show
            dead = _dead(procs, out_dir, i)
            first = min(raised, key=lambda r: (os.stat(_path(out_dir, r, i)).st_mtime_ns, r))
            raised_text = f"rank {first} raised:\n{_payload(out_dir, first, i)}"
            return f"{dead}\nthen {raised_text}" if dead else raised_text
        if all(s == "ok" for s in status):
            return None
        dead = _dead(procs, out_dir, i)
        if dead:
            return dead
        if time.monotonic() > deadline:
            pending = [r for r, s in enumerate(status) if s is None]
            return f"timed out after {limit:.0f}s; ranks still running: {pending}"
        time.sleep(POLL_S)


def _dead(procs: list, out_dir: str, i: int) -> Optional[str]:
    """The first rank that exited without a result for call ``i`` (exit code, signal and the
    tail of its stderr), or None."""
    for r, p in enumerate(procs):   # re-read: a rank writes its result before it exits
        if p.exitcode is not None and _status(out_dir, r, i) is None:
            code = p.exitcode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
            return f"rank {r} exited with {how} without a result; its stderr ends:\n{_stderr_tail(out_dir, r)}"
    return None


def _stderr_tail(out_dir: str, rank: int, lines: int = 30) -> str:
    try:
        with open(os.path.join(out_dir, f"rank{rank}.stderr"), errors="replace") as f:
            return "".join(f.readlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no stderr file)"


def _worker(rank: int, world_size: int, port: int, backend: str, threads: int, out_dir: str,
            calls: list[Call], pg_timeout_s: float) -> None:
    """Body of one rank: init the process group, run the calls in order, pickle each result
    or traceback; stop at the first error (the parent then ends this spawn)."""
    import resource

    import torch.distributed as dist
    _stderr_to_file(out_dir, rank)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # gloo: a socket per peer per group
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
    except BaseException:  # noqa: BLE001 - charged to the first call, with the traceback
        _write(out_dir, rank, 0, ("error", traceback.format_exc()))
        return
    try:
        for i, call in enumerate(calls):
            result = _run(call)
            _write(out_dir, rank, i, result)
            if result[0] == "error":
                break
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _stderr_to_file(out_dir: str, rank: int) -> None:
    """Send this rank's stderr (Python and C++ alike: file descriptor 2) to a file of the
    batch, so the parent can show what a rank printed before it died."""
    fd = os.open(os.path.join(out_dir, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def _run(call: Call) -> tuple[str, Any]:
    try:
        return "ok", call.fn(*call.args)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        return "error", traceback.format_exc()


def _path(out_dir: str, rank: int, i: int) -> str:
    return os.path.join(out_dir, f"rank{rank}.call{i}.pkl")


def _write(out_dir: str, rank: int, i: int, result: tuple[str, Any]) -> None:
    path = _path(out_dir, rank, i)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)


def _status(out_dir: str, rank: int, i: int) -> Optional[str]:
    path = _path(out_dir, rank, i)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)[0]


def _payload(out_dir: str, rank: int, i: int) -> Any:
    with open(_path(out_dir, rank, i), "rb") as f:
        return pickle.load(f)[1]
