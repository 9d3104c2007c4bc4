"""Run a function on N processes with a real process group; collect per-rank results.

    results = run_distributed(fn, 2, arg1, arg2, backend="gloo", timeout=120)

``fn(*args)`` runs on every rank after ``torch.distributed.init_process_group``
(rank, world size and a free TCP port are set in the environment, so ``fn`` can
build meshes exactly as under ``torchrun``). Its return value is pickled back;
``results[r]`` is rank r's. ``fn`` must be importable (a module-level function),
because workers are started with the ``spawn`` method.

Failure modes are made loud and fast, so a broken collective fails a test instead of
stalling CI:

* an exception on any rank raises :class:`DistributedTestError` carrying that rank's
  traceback, and the other ranks (likely blocked in a collective) are killed;
* a run that exceeds ``timeout`` seconds kills every rank and raises with the list of
  ranks that had not finished.

``backends(world_size)`` gives the backends to parametrize over: ``gloo`` always,
``nccl`` when that many GPUs exist (each rank then uses ``cuda:<rank>``).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from polytron.launch.env import free_port


class DistributedTestError(AssertionError):
    """A rank raised, died, or the run timed out."""


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


def _worker(rank: int, world_size: int, port: int, backend: str, threads: int, out_dir: str,
            fn: Callable, args: tuple, pg_timeout_s: float) -> None:
    """Body of one rank: init the process group, run ``fn``, pickle result or traceback."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        result = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)


def run_distributed(fn: Callable, world_size: int, *args: Any, backend: str = "gloo",
                    timeout: float = 180.0, threads: int = 1) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return the per-rank results.

    ``threads`` is each rank's intra-op thread count (1 keeps N ranks from
    oversubscribing a small CI machine).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="polytron-dist-") as out_dir:
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, port, backend, threads, out_dir, fn, args,
                                   max(timeout, 30.0)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            _wait(procs, out_dir, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        return [_read(out_dir, r) for r in range(world_size)]


def _wait(procs: list, out_dir: str, timeout: float) -> None:
    """Poll until every rank exits; on the first failure or on timeout, raise."""
    deadline = time.monotonic() + timeout
    while True:
        done = [p.exitcode is not None for p in procs]
        for r, p in enumerate(procs):
            if p.exitcode is not None and (p.exitcode != 0 or _status(out_dir, r) == "error"):
                raise DistributedTestError(_failure_text(out_dir, r, p.exitcode))
        if all(done):
            return
        if time.monotonic() > deadline:
            pending = [r for r, d in enumerate(done) if not d]
            raise DistributedTestError(
                f"distributed run timed out after {timeout:.0f}s; ranks still running: {pending}")
        time.sleep(0.05)


def _status(out_dir: str, rank: int) -> str | None:
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)[0]


def _failure_text(out_dir: str, rank: int, exitcode: int) -> str:
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            status, payload = pickle.load(f)
        if status == "error":
            return f"rank {rank} raised:\n{payload}"
    return f"rank {rank} exited with code {exitcode} without a result"


def _read(out_dir: str, rank: int) -> Any:
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
        status, payload = pickle.load(f)
    if status != "ok":
        raise DistributedTestError(f"rank {rank} raised:\n{payload}")
    return payload
