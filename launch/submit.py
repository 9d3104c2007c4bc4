#!/usr/bin/env python
"""Write and submit a SLURM batch job for a pre-training run.

    python -m launch.submit --config launch/configs/tiny.yaml --nodes 2 --gpus-per-node 8 \\
        --partition gpu --account proj --time 24:00:00 [section.key=value ...]
    python -m launch.submit ... --dry-run        # print the batch script, submit nothing
    python -m launch.submit preprocess --input 'corpus/*.jsonl' --output-prefix data/x --tokenizer t.model \\
        --tasks 16 --cpus-per-task 8     # tokenize as an array job + merge (launch/slurm/preprocess_job.py)

The job starts one node agent (torchrun) per node through ``srun``; the rendezvous
comes from the allocation; logs go to ``<log-dir>/<job-name>-<job id>.out`` (one file
per job, appended across requeues). SLURM sends SIGUSR1 ``--signal-seconds`` before
the time limit; the run saves, exits 75 and the job requeues itself, resuming from
the newest complete checkpoint (``training.resume=auto``). See docs/launch.md.

Exit status: 0 submitted (or printed); 2 bad input, printed as one ``error:`` line;
the status of ``sbatch`` when it refuses the job.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from polytron.model.errors import PolytronError
from polytron.tools.cli import command

REPO = Path(__file__).resolve().parent.parent

TEMPLATE = REPO / "launch" / "slurm" / "pretrain.sbatch.in"
NODE_AGENT = REPO / "launch" / "slurm" / "node_agent.py"
PRETRAIN = REPO / "launch" / "pretrain.py"


class SubmitError(PolytronError):
    """Bad input for the submit tool; the message is printed as one line."""


@dataclass
class Job:
    """Everything the batch script needs, validated."""
    config: Path
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    cpus_per_proc: int
    partition: str
    account: str
    time: str
    time_s: int
    signal_seconds: int
    job_name: str
    workdir: Path
    log_dir: Path
    python: str
    launcher: str
    command: str
    max_requeues: int
    sbatch_args: list[str]
    env: list[str]


# ------------------------------------------------------------------ parsing and checks

TIME_FORMS = (  # SLURM --time formats -> (days, hours, minutes, seconds) group names
    r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
    r"(?P<d>\d+)-(?P<h>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)",
    r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)")


def parse_time(text: str) -> int:
    """Seconds in a SLURM time limit (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``)."""
    for form in TIME_FORMS:
        m = re.fullmatch(form, text.strip())
        if m:
            g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
            secs = ((g.get("d", 0) * 24 + g.get("h", 0)) * 60 + g.get("m", 0)) * 60 + g.get("s", 0)
            if secs <= 0:
                break
            return secs
    raise SubmitError(f"--time {text!r} is not a positive SLURM time limit "
                      "(minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")


def positive(name: str, value: int, allow_zero: bool = False) -> int:
    """Check an integer option; SubmitError naming it otherwise."""
    if value < 0 or (value == 0 and not allow_zero):
        raise SubmitError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line of the submit tool."""
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0],
                                epilog="Trailing section.key=value arguments override the run config.")
    p.add_argument("--config", required=True, help="YAML run config (launch/configs/*.yaml)")
    p.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 for CPU jobs (default 0)")
    p.add_argument("--procs-per-node", type=int, default=0,
                   help="training processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-proc", type=int, default=1, help="CPU cores per training process (default 1)")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--account", default="", help="SLURM account to charge")
    p.add_argument("--time", default="01:00:00", help="time limit, e.g. 30, 04:00:00, 2-00:00:00")
    p.add_argument("--signal-seconds", type=int, default=0,
                   help="SIGUSR1 this many seconds before the time limit to save and requeue "
                        "(default: 300, at most a tenth of --time)")
    p.add_argument("--job-name", default="", help="job name (default: polytron-<run name>)")
    p.add_argument("--log-dir", default="", help="job logs directory (default: <output_dir>/logs)")
    p.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                   help="torchrun: one node agent per node (default); srun: one SLURM task per process")
    p.add_argument("--python", default=sys.executable, help="Python that runs the job (default: this one)")
    p.add_argument("--max-requeues", type=int, default=100, help="stop requeueing after this many restarts")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable exported in the job (repeatable)")
    p.add_argument("--command", default="",
                   help="run this shell command once per node instead of the trainer (debugging)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; do not submit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the run config")
    return p.parse_args(argv)


def load_run_config(config: Path, overrides: list[str], world_size: int):
    """Load and validate the run config and its layout for ``world_size`` processes."""
    from polytron.model.configlib import ConfigError
    from polytron.parallel.mesh import LayoutError, ParallelDims
    from polytron.pretrain.config import load_config

    try:
        cfg = load_config(str(config), overrides)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    try:
        ParallelDims.resolve(cfg.parallel, cfg.model, world_size)
    except (LayoutError, ConfigError) as e:
        raise SubmitError(f"{e} (the job has --nodes x --procs-per-node = {world_size} processes)") from None
    return cfg


def signal_seconds(requested: int, time_s: int) -> int:
    """Warning lead time: the requested one (must leave time to run) or min(300, time/10)."""
    if requested == 0:
        return max(1, min(300, time_s // 10))
    if not 0 < requested < time_s:
        raise SubmitError(f"--signal-seconds {requested} must be between 1 and the time limit ({time_s} s)")
    return requested


def build_job(a: argparse.Namespace) -> Job:
    """Validate the command line and the run config into a Job."""
    config = Path(a.config).resolve()
    if not config.is_file():
        raise SubmitError(f"config file {a.config} does not exist")
    nodes = positive("--nodes", a.nodes)
    gpus = positive("--gpus-per-node", a.gpus_per_node, allow_zero=True)
    procs = positive("--procs-per-node", a.procs_per_node or gpus or 1)
    if gpus and procs != gpus:
        raise SubmitError(f"--procs-per-node {procs} must equal --gpus-per-node {gpus} (one process per GPU)")
    time_s = parse_time(a.time)
    for item in a.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
            raise SubmitError(f"--env {item!r} is not NAME=VALUE")
    cfg = load_run_config(config, a.overrides, nodes * procs) if not a.command else None
    name = cfg.training.name if cfg else config.stem
    workdir = Path.cwd()
    out_dir = Path(cfg.training.output_dir) if cfg else Path("runs") / name
    log_dir = Path(a.log_dir) if a.log_dir else out_dir / "logs"
    return Job(
        config=config, overrides=list(a.overrides), nodes=nodes, gpus_per_node=gpus,
        procs_per_node=procs, cpus_per_proc=positive("--cpus-per-proc", a.cpus_per_proc),
        partition=a.partition, account=a.account, time=a.time.strip(), time_s=time_s,
        signal_seconds=signal_seconds(a.signal_seconds, time_s),
        job_name=a.job_name or f"polytron-{name}", workdir=workdir,
        log_dir=log_dir if log_dir.is_absolute() else workdir / log_dir, python=a.python,
        launcher=a.launcher, command=a.command,
        max_requeues=positive("--max-requeues", a.max_requeues, allow_zero=True),
        sbatch_args=list(a.sbatch_arg), env=list(a.env))


# ------------------------------------------------------------------ rendering

def q(value: object) -> str:
    """Shell-quote one word."""
    return shlex.quote(str(value))


def step_command(job: Job) -> str:
    """The srun line that starts training (or the --command) on every node."""
    train = [q(job.python), q(PRETRAIN), "--config", q(job.config), *map(q, job.overrides)]
    if job.command:
        return f"srun --ntasks-per-node=1 bash -c {q(job.command)}"
    if job.launcher == "srun":
        return f"srun --ntasks-per-node={job.procs_per_node} --cpus-per-task={job.cpus_per_proc} " \
               + " ".join(train)
    agent = [q(job.python), q(NODE_AGENT), f"--nproc-per-node={job.procs_per_node}"]
    return "srun --ntasks-per-node=1 " + " ".join(agent + train[1:])


def sbatch_lines(job: Job) -> str:
    """Optional #SBATCH lines: GPUs, partition, account, extras."""
    lines = []
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    lines += [f"#SBATCH {arg}" for arg in job.sbatch_args]
    return "\n".join(lines) if lines else "# (no partition/account/GPU options)"


def render(job: Job) -> str:
    """The batch script text for ``job``."""
    per_task = job.procs_per_node if job.launcher == "torchrun" or job.command else 1
    values = {
        "JOB_NAME": job.job_name, "NODES": job.nodes,
        "TASKS_PER_NODE": 1 if job.launcher == "torchrun" or job.command else job.procs_per_node,
        "CPUS_PER_TASK": per_task * job.cpus_per_proc, "TIME": job.time, "WORKDIR": job.workdir,
        "LOG_DIR": job.log_dir, "SIGNAL_SECONDS": job.signal_seconds, "SBATCH_EXTRA": sbatch_lines(job),
        "PYTHON": q(job.python), "REPO": q(REPO), "MAX_REQUEUES": job.max_requeues,
        "ENV_EXPORTS": "\n".join(f"export {k}={q(v)}" for k, v in (e.split("=", 1) for e in job.env)),
        "STEP_COMMAND": step_command(job)}
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise SubmitError(f"template {TEMPLATE} has unknown placeholders {left}")
    return text


# ------------------------------------------------------------------ submission

def submit(job: Job, script: str) -> int:
    """Write the script next to the logs and hand it to sbatch; print the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: run this on a SLURM login node "
                          "(or install slurm-wlm); --dry-run prints the script without it")
    job.log_dir.mkdir(parents=True, exist_ok=True)
    path = job.log_dir / f"{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    r = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"error: sbatch refused the job: {r.stderr.strip() or r.stdout.strip()}", file=sys.stderr)
        return r.returncode
    job_id = r.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {job.nodes} node(s) x {job.procs_per_node} process(es)")
    print(f"  script: {path}")
    print(f"  log:    {job.log_dir / f'{job.job_name}-{job_id}.out'}")
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, validate, render, then print (--dry-run) or submit."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["preprocess"]:
        from polytron.launch.slurm.preprocess_job import main as preprocess_main

        return preprocess_main(argv[1:])
    a = parse_args(argv)
    job = build_job(a)
    script = render(job)
    if a.dry_run:
        print(script, end="")
        return 0
    return submit(job, script)


if __name__ == "__main__":
    sys.exit(main())
