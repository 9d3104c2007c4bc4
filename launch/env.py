"""Where this process sits in the job: rank, world size and rendezvous, from the launcher.

Three launchers are recognised, in this order:

* ``torchrun`` (``python -m torch.distributed.run``): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are already set.
* plain ``srun`` (one task per process): ranks come from ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master address is the first host of
  the step's node list; the port is ``MASTER_PORT`` or derived from the job id,
  so every task of a job computes the same one.
* nothing: a single process, rank 0 of 1, on a free port of ``127.0.0.1``.

``export_env`` writes the result back to the environment so that
``torch.distributed.init_process_group(init_method="env://")`` works the same
way under every launcher. ``choose_backend`` and ``check_master_reachable`` turn
the usual launch mistakes into one-line :class:`LaunchError` messages.
``follow_launcher`` ties a torchrun worker's life to its agent: when the agent
dies, the worker is sent SIGTERM (save and exit) instead of training on orphaned.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Mapping

from polytron.model.errors import PolytronError

Source = Literal["torchrun", "srun", "single"]

#: Ports derived from a SLURM job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN).
PORT_BASE = 15000
PORT_SPAN = 20000
#: Set by ``launch/run.py`` to its own pid, so a worker can tell its agent is already gone.
LAUNCHER_PID_VAR = "POLYTRON_LAUNCHER_PID"
#: prctl(2) option: signal to receive when the parent thread exits (linux/prctl.h).
PR_SET_PDEATHSIG = 1


class LaunchError(PolytronError, RuntimeError):
    """The launch environment cannot work; the message says what to change."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job and the rendezvous address of rank 0."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Source

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str) -> int:
    """Read an integer variable, or raise LaunchError naming it."""
    raw = env.get(key, "")
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {key}={raw!r} is not an integer") from None


def _port(env: Mapping[str, str], key: str = "MASTER_PORT") -> int:
    """Read a TCP port number from ``env[key]`` and check its range."""
    port = _int(env, key)
    if not 0 < port < 65536:
        raise LaunchError(f"environment variable {key}={port} is not a TCP port (1..65535)")
    return port


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first_host_python(nodelist: str) -> str:
    """First host of a SLURM hostlist such as ``gpu[007-009,012],cpu1`` (no scontrol needed)."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    if head is None or not head.group(1) and not head.group(3):
        raise LaunchError(f"cannot parse the SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list, expanded by ``scontrol show hostnames`` when present."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return _first_host_python(nodelist)


def tasks_on_node(tasks_per_node: str, node_index: int) -> int:
    """Tasks on node ``node_index`` from SLURM's compressed form, e.g. ``2(x3),1``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"cannot parse SLURM tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_index < len(counts):
        raise LaunchError(f"node index {node_index} is outside SLURM tasks per node {tasks_per_node!r}")
    return counts[node_index]


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    """Ranks and rendezvous exported by torchrun."""
    world = _int(env, "WORLD_SIZE")
    return LaunchEnv(
        rank=_int(env, "RANK"),
        local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
        world_size=world,
        local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(env) if "MASTER_PORT" in env else free_port(),
        source="torchrun")


def _slurm_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port every task of the job derives from SLURM_JOB_ID."""
    if "MASTER_PORT" in env:
        return _port(env)
    if "SLURM_JOB_ID" not in env:
        raise LaunchError("running under srun but neither MASTER_PORT nor SLURM_JOB_ID is set")
    return PORT_BASE + _int(env, "SLURM_JOB_ID") % PORT_SPAN


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    """Ranks from an srun step: one process per SLURM task."""
    world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
                or env.get("SLURM_NTASKS_PER_NODE") or str(world))
    node_index = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    if "MASTER_ADDR" in env:
        master = env["MASTER_ADDR"]
    elif nodelist:
        master = first_host(nodelist)
    else:
        raise LaunchError("running under srun but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
    return LaunchEnv(
        rank=_int(env, "SLURM_PROCID"),
        local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
        world_size=world,
        local_world_size=tasks_on_node(per_node, node_index),
        master_addr=master,
        master_port=_slurm_port(env),
        source="srun")


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """True inside a task started by srun (not in the batch script itself, which has no step rank)."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and (
        "SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env)


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Work out rank, world size and rendezvous from torchrun's, srun's or no launcher's environment."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        found = _from_torchrun(env)
    elif _in_srun_step(env):
        found = _from_slurm(env)
    else:
        found = LaunchEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                          master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=_port(env) if "MASTER_PORT" in env else free_port(),
                          source="single")
    _check_ranks(found)
    return found


def _check_ranks(e: LaunchEnv) -> None:
    """Reject rank numbers that cannot belong to the world size."""
    if e.world_size < 1:
        raise LaunchError(f"world size {e.world_size} from {e.source} must be >= 1")
    if not 0 <= e.rank < e.world_size:
        raise LaunchError(f"rank {e.rank} from {e.source} is outside world size {e.world_size}")
    if not 0 <= e.local_rank < max(e.local_world_size, 1):
        raise LaunchError(f"local rank {e.local_rank} from {e.source} is outside the "
                          f"{e.local_world_size} processes of this node")


def export_env(e: LaunchEnv) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for ``env://``."""
    os.environ.update({
        "RANK": str(e.rank), "WORLD_SIZE": str(e.world_size),
        "LOCAL_RANK": str(e.local_rank), "LOCAL_WORLD_SIZE": str(e.local_world_size),
        "MASTER_ADDR": e.master_addr, "MASTER_PORT": str(e.master_port)})


def choose_backend(requested: str) -> str:
    """``auto`` -> nccl with GPUs, else gloo; ``nccl`` without a GPU is a LaunchError."""
    import torch

    req = requested.strip().lower()
    if req not in ("auto", "nccl", "gloo"):
        raise LaunchError(f"distributed backend {requested!r} is not one of auto, nccl, gloo")
    has_gpu = torch.cuda.is_available()
    if req == "auto":
        return "nccl" if has_gpu else "gloo"
    if req == "nccl" and not has_gpu:
        raise LaunchError("backend 'nccl' was requested but no CUDA GPU is visible to this process "
                          "(torch.cuda.is_available() is False); use backend 'gloo' or 'auto' on CPU "
                          "machines, or check CUDA_VISIBLE_DEVICES and the GPU allocation (--gpus-per-node)")
    return req


def _connect_once(infos: list, timeout_s: float) -> OSError | None:
    """Try each resolved address once; None when one answered (accepted or refused)."""
    err: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout_s)
            try:
                s.connect(sockaddr)
                return None
            except ConnectionRefusedError:
                return None  # the host answered; rank 0 is just not listening yet
            except OSError as exc:
                err = exc
    return err


def check_master_reachable(e: LaunchEnv, timeout_s: float = 10) -> None:
    """For ranks other than 0: resolve the master host and check it answers on TCP.

    A refused connection counts as reachable (rank 0 may not listen yet); a name
    that does not resolve, or a host that does not answer within ``timeout_s``,
    raises a LaunchError naming the address.
    """
    if e.world_size <= 1 or e.rank == 0:
        return
    where = f"{e.master_addr}:{e.master_port}"
    try:
        infos = socket.getaddrinfo(e.master_addr, e.master_port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LaunchError(f"cannot resolve master address {where} ({exc.strerror}); rank {e.rank} of "
                          f"{e.world_size} (from {e.source}) needs MASTER_ADDR to name rank 0's host") from None
    deadline = time.monotonic() + timeout_s
    err = _connect_once(infos, max(timeout_s, 0.1))
    while err is not None and time.monotonic() < deadline:
        time.sleep(0.5)
        err = _connect_once(infos, max(deadline - time.monotonic(), 0.1))
    if err is not None:
        raise LaunchError(f"cannot reach master address {where} within {timeout_s:g} s ({err}); rank "
                          f"{e.rank} of {e.world_size} (from {e.source}): check MASTER_ADDR/MASTER_PORT, "
                          f"the network between nodes and firewalls")


#: Phrases of gloo's, NCCL's and the TCP store's errors when another process of the job is gone.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
              "socket timeout", "connection refused", "communicator was aborted", "watchdog caught")


def lost_peer(exc: BaseException) -> str | None:
    """One ``error:`` line when ``exc`` says another process of the job is gone, else None.

    A rank whose peer died (a node lost, a worker killed) fails in its next collective:
    gloo raises ``RuntimeError`` naming the closed connection, NCCL and the store raise
    ``torch.distributed.DistError`` subclasses. Other RuntimeErrors are not ours to reword.
    """
    dist_errors: tuple[type[BaseException], ...] = ()   # none in torch without distributed support
    try:
        from torch.distributed import DistError
        dist_errors = (DistError,)
    except ImportError:
        pass
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(exc, dist_errors) and not any(p in text.lower() for p in _PEER_LOST):
        return None
    first = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", first)     # gloo's source location prefix
    first = first.split(". This is typically caused")[0]
    return (f"lost contact with another process of the job ({first}): a node or a worker died, "
            f"or the network dropped (its own log says which); stopped without saving: restart or "
            f"requeue the job to resume from the newest complete checkpoint")


def follow_launcher(environ: Mapping[str, str] | None = None, sig: int = signal.SIGTERM) -> bool:
    """Under a torchrun agent, have Linux send ``sig`` to this process when the agent exits.

    torchrun starts each worker in its own session, so an agent that dies (SIGKILL,
    SIGUSR1's default action, a crash) leaves the workers running. With
    ``PR_SET_PDEATHSIG`` the kernel sends ``sig`` (SIGTERM: the trainer finishes its
    step, saves and exits) instead. Only workers of a torchelastic agent
    (``TORCHELASTIC_RUN_ID`` set) are tied; a run started from a shell is left alone.
    If the agent is already gone (the parent changed while arming, or the launcher
    pid in :data:`LAUNCHER_PID_VAR` is not our parent and no longer exists), ``sig``
    is sent at once.
    Returns True when armed.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if _agent_gone(env, parent):
        os.kill(os.getpid(), sig)
    return True


def _agent_gone(env: Mapping[str, str], parent: int) -> bool:
    """True when the agent exited before PR_SET_PDEATHSIG was armed (so it will never fire)."""
    if os.getppid() != parent:
        return True                      # reparented while arming
    agent = env.get(LAUNCHER_PID_VAR, "")
    if not agent.isdigit() or int(agent) == parent:
        return False
    # The variable names another process: our launcher, gone before we started, or a stale
    # value inherited from an outer launcher that is still alive (then we are not orphaned).
    return not os.path.exists(f"/proc/{agent}")
