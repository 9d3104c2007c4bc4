"""A real SLURM cluster for tests: munged + slurmctld + one slurmd per node on this machine.

``SlurmCluster(workdir, nodes=2)`` runs two slurmd daemons (nodes ``n0``, ``n1``, own
ports, spools and logs; names that do not resolve, so jobs need ``MASTER_ADDR=127.0.0.1``).

``SlurmCluster(workdir).start()`` writes a ``slurm.conf`` for this host (its
short host name, all CPUs, the free memory, free TCP ports, state and spool
directories under ``workdir``), starts a private ``munged`` (its own socket and
key copy, run as user ``munge``), then ``slurmctld`` and ``slurmd`` in the
foreground as child processes, and waits until the node is idle. ``stop()``
always runs ``scontrol shutdown`` and then kills whatever is still alive, so a
failed test leaves no daemons behind. ``cred_expire=10`` shortens the wait before a
requeued job may start again (SLURM's default is 120 s). Client commands find the cluster through
``cluster.env`` (``SLURM_CONF`` points at the generated file).

Needs root and the Debian packages ``slurm-wlm`` and ``munge``;
:func:`missing_requirements` says what is missing so tests can skip with it.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from polytron.launch.env import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
INSTALL_HINT = "apt-get install slurm-wlm munge (as root)"


def _which(name: str) -> str | None:
    """Find a program on PATH or in the sbin directories Debian installs daemons to."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_requirements() -> str | None:
    """None when a cluster can start here, else why not (with the install command)."""
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return f"SLURM test cluster needs {', '.join(missing)}: {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "SLURM test cluster must start munged/slurmctld/slurmd as root (run the tests as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"user 'munge' does not exist: {INSTALL_HINT}"
    if not Path("/etc/munge/munge.key").is_file() and _which("mungekey") is None:
        return f"no /etc/munge/munge.key and no mungekey to create one: {INSTALL_HINT}"
    return None


def _free_memory_mb() -> int:
    """MemAvailable from /proc/meminfo in MiB, minus headroom, at least 1024."""
    text = Path("/proc/meminfo").read_text()
    kb = int(re.search(r"MemAvailable:\s+(\d+)", text).group(1))
    return max(1024, kb // 1024 - 1024)


SLURM_CONF = """\
ClusterName=polytrontest
SlurmctldHost={host}({addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd-%n.pid
SlurmctldLogFile={run}/slurmctld.log
SlurmdLogFile={run}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd for one host, configured under ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, nodes: int = 1):
        self.root = Path(workdir).resolve()
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip() \
            or socket.gethostname().split(".")[0]
        #: One slurmd per node name. Several nodes on this host are n0, n1, ... (each its own
        #: slurmd, port and spool directory; all CPUs each); their names do not resolve, so
        #: jobs must be given MASTER_ADDR=127.0.0.1.
        self.nodes = [self.host] if nodes == 1 else [f"n{i}" for i in range(nodes)]
        self.conf = self.root / "etc" / "slurm.conf"
        # munged runs as user munge and must reach its socket directory, so that lives in its
        # own world-searchable temporary directory (pytest's tmp_path parents are mode 0700).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="polytron-munge-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.munged_pid: int | None = None
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 60) -> None:
        """Write the config, start the three daemons, wait for an idle node; stop all on failure."""
        try:
            self._write_conf()
            self._start_munged()
            self._spawn("slurmctld", ["-D", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["-D", "-f", str(self.conf), "-N", node], program="slurmd")
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """``scontrol shutdown``, then end every daemon this cluster started (never others)."""
        if self.procs:
            try:
                self.scontrol("shutdown", check=False, timeout=15)
            except (subprocess.SubprocessError, OSError):
                pass
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            self.procs.pop(name)
        self._kill_stray_steps()
        self._stop_munged()

    # ------------------------------------------------------------ helpers

    def _write_conf(self) -> None:
        """Generate slurm.conf with this host's name, CPUs, memory and free ports."""
        run = self.root / "run"
        for d in (self.conf.parent, self.root / "state", self.root / "spool", run):
            d.mkdir(parents=True, exist_ok=True)
        cpus, mem = os.cpu_count() or 1, _free_memory_mb()
        lines = [f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} "
                 f"RealMemory={mem // len(self.nodes)} State=UNKNOWN" for n in self.nodes]
        if len(self.nodes) == 1:
            lines = [f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN"]
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, addr="127.0.0.1", ctld_port=free_port(), slurmd_port=free_port(),
            munge_socket=self.munge_dir / "munge.socket", state=self.root / "state",
            spool=self.root / "spool", run=run, node_lines="\n".join(lines), node_names=",".join(self.nodes)))

    def _start_munged(self) -> None:
        """A private munged (own socket, pid and key copy) running as user munge."""
        munge = pwd.getpwnam("munge")
        os.chmod(self.munge_dir, 0o755)  # munged: the socket directory must be searchable by all
        key = self.munge_dir / "munge.key"
        if Path("/etc/munge/munge.key").is_file():
            shutil.copyfile("/etc/munge/munge.key", key)
        else:
            subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True)
        os.chmod(key, 0o400)
        for p in (self.munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        m = self.munge_dir
        cmd = [_which("munged"), f"--socket={m / 'munge.socket'}", f"--key-file={key}",
               f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
               f"--seed-file={m / 'munged.seed'}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                           user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        if r.returncode != 0:
            raise RuntimeError(f"munged failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        self.munged_pid = int((m / "munged.pid").read_text().split()[0])

    def _stop_munged(self) -> None:
        """End the munged this cluster started, by its pid, and remove its directory."""
        if self.munged_pid is None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            return
        try:
            os.kill(self.munged_pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(self.munged_pid, 0)
                time.sleep(0.1)
            os.kill(self.munged_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.munged_pid = None
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _spawn(self, name: str, args: list[str], program: str | None = None) -> None:
        """Start a SLURM daemon in the foreground as our child; its output goes to run/<name>.out."""
        out = open(self.root / "run" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen([_which(program or name), *args], stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def _kill_stray_steps(self) -> None:
        """Processes that outlived the daemons and carry this cluster's SLURM_CONF (steps, jobs)."""
        mark = f"SLURM_CONF={self.conf}".encode() + b"\0"
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mark not in (proc / "environ").read_bytes() + b"\0":
                    continue
                os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue

    def _wait_idle(self, timeout_s: float) -> None:
        """Poll sinfo until every node is idle; raise with the daemon logs if one never gets there."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            r = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%T"], capture_output=True,
                               text=True, env=self.env, timeout=10)
            state = r.stdout.strip()
            states = state.split()
            if r.returncode == 0 and len(states) == len(self.nodes) and all(s.startswith("idle") for s in states):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node not idle after {timeout_s} s (state {state!r}):\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for f in sorted((self.root / "run").glob("*.log")) + sorted(self.munge_dir.glob("*.log")) \
                + sorted((self.root / "run").glob("*.out")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------ client commands

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, scontrol, ...) against this cluster."""
        return subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                              env=self.env, check=check, timeout=timeout)

    def scontrol(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """``scontrol ARGS`` against this cluster."""
        return self.run("scontrol", *args, check=check, timeout=timeout)

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.scontrol("show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout_s: float, states: tuple[str, ...] = (
            "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; return its info (raise on timeout)."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout_s} s: {info}\n{self.logs()}")
