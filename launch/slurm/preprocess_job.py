"""``python -m launch.submit preprocess``: tokenize a corpus with a SLURM array, then merge.

    python -m launch.submit preprocess --input 'corpus/*.jsonl.zst' --output-prefix data/web \\
        --tokenizer tok.model --tasks 64 --cpus-per-task 16 --time 04:00:00 [--partition cpu] [--dry-run]

Writes ``WORK/plan.json`` (default ``WORK`` = ``<output-prefix>.parts``, which must be on a
file system every node sees): the input files, their split over the tasks and the
settings. Then submits an array job whose task ``i`` runs
``tools/preprocess_data.py --plan WORK/plan.json --task-index i`` (one shard per input
file, finished files skipped after a requeue), and a merge job
(``tools/merge_datasets.py --plan``) that starts once every task succeeded
(``--dependency=afterok``). Logs: ``<log-dir>/<job-name>-<array id>_<task>.out`` and
``<job-name>-merge-<id>.out``. See docs/data.md.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from polytron.launch.submit import REPO, SubmitError, parse_time, positive, q
from polytron.tools.cli import command

ARRAY_TEMPLATE = REPO / "launch" / "slurm" / "preprocess.sbatch.in"
MERGE_TEMPLATE = REPO / "launch" / "slurm" / "merge.sbatch.in"
TOOL = REPO / "tools" / "preprocess_data.py"
MERGE_TOOL = REPO / "tools" / "merge_datasets.py"


@dataclass
class PreprocessJob:
    """The plan, the two batch scripts and where they go."""
    plan: object           # data.shard_plan.Plan
    plan_path: Path
    tasks: int
    files: int
    log_dir: Path
    job_name: str
    array_script: str
    merge_script: str


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line of ``python -m launch.submit preprocess``."""
    p = argparse.ArgumentParser(prog="python -m launch.submit preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", default=[], help="input files or globs (quoted), in dataset order")
    p.add_argument("--input-list", default="", help="file naming one input (or glob) per line")
    p.add_argument("--output-prefix", required=True, help="final dataset: PREFIX.bin / .idx / .summary.json")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer directory")
    p.add_argument("--tasks", type=int, default=1, help="array tasks (at most one per input file)")
    p.add_argument("--cpus-per-task", type=int, default=1, help="cores per task = tokenizing workers (default 1)")
    p.add_argument("--max-parallel", type=int, default=0, help="run at most this many tasks at once (0: no limit)")
    p.add_argument("--work-dir", default="", help="plan, shards, task summaries (default: PREFIX.parts)")
    p.add_argument("--json-key", default="text", help="text field of JSONL records")
    p.add_argument("--text-unit", default="paragraph", help="paragraph, line or file")
    p.add_argument("--strict", action="store_true", help="a task stops at the first malformed document")
    p.add_argument("--encoder", default="auto", help="auto or plain (see tools/preprocess_data.py)")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--account", default="", help="SLURM account to charge")
    p.add_argument("--time", default="01:00:00", help="time limit per task and for the merge")
    p.add_argument("--job-name", default="", help="job name (default: preprocess-<output name>)")
    p.add_argument("--log-dir", default="", help="job logs (default: WORK/logs)")
    p.add_argument("--python", default=sys.executable, help="Python that runs the jobs (default: this one)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line for both jobs, e.g. --sbatch-arg=--qos=low (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable exported in the jobs (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="write the plan, print both scripts; submit nothing")
    return p.parse_args(argv)


def make_plan(a: argparse.Namespace):
    """Validate inputs and settings into a plan (not written yet)."""
    # the plan code needs neither torch nor megatron-core (data/__init__.py loads lazily)
    from polytron.data.errors import DataError
    from polytron.data.inputs import read_input_list
    from polytron.data.shard_plan import make_plan as plan_of

    try:
        inputs = a.input + (read_input_list(a.input_list) if a.input_list else [])
        return plan_of(inputs, a.output_prefix, a.tokenizer, a.tasks, a.work_dir, a.json_key, a.text_unit,
                       a.strict, a.encoder)
    except DataError as e:
        raise SubmitError(str(e)) from None


def write_plan(plan) -> Path:
    """Write ``WORK/plan.json`` (creating the work directory); SubmitError when it cannot."""
    from polytron.data.errors import DataError
    from polytron.data.shard_plan import write_plan as write

    try:
        return Path(write(plan))
    except DataError as e:
        raise SubmitError(str(e)) from None


def fill(template: Path, values: dict) -> str:
    """``template`` with its ``{{KEY}}`` placeholders replaced."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise SubmitError(f"template {template} has unknown placeholders {left}")
    return text


def sbatch_extra(a: argparse.Namespace) -> str:
    """Optional #SBATCH lines: partition, account, extras."""
    lines = [f"#SBATCH --partition={a.partition}"] if a.partition else []
    lines += [f"#SBATCH --account={a.account}"] if a.account else []
    lines += [f"#SBATCH {arg}" for arg in a.sbatch_arg]
    return "\n".join(lines) if lines else "# (no partition/account options)"


def build(a: argparse.Namespace) -> PreprocessJob:
    """Check the command line, write the plan, render both scripts."""
    positive("--tasks", a.tasks)
    cpus = positive("--cpus-per-task", a.cpus_per_task)
    positive("--max-parallel", a.max_parallel, allow_zero=True)
    parse_time(a.time)
    for item in a.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
            raise SubmitError(f"--env {item!r} is not NAME=VALUE")
    plan = make_plan(a)
    work = Path(plan.work_dir)
    log_dir = Path(a.log_dir).resolve() if a.log_dir else work / "logs"
    name = a.job_name or f"preprocess-{Path(plan.output_prefix).name}"
    common = {"JOB_NAME": name, "TIME": a.time.strip(), "WORKDIR": Path.cwd(), "LOG_DIR": log_dir,
              "SBATCH_EXTRA": sbatch_extra(a), "PYTHON": q(a.python), "PLAN": q(work / "plan.json"),
              "ENV_EXPORTS": "\n".join(f"export {k}={q(v)}" for k, v in (e.split("=", 1) for e in a.env))}
    array = fill(ARRAY_TEMPLATE, {**common, "LAST_TASK": plan.tasks - 1, "CPUS_PER_TASK": cpus,
                                  "ARRAY_LIMIT": f"%{a.max_parallel}" if a.max_parallel else "",
                                  "TOOL": q(TOOL), "WORKERS": cpus})
    merge = fill(MERGE_TEMPLATE, {**common, "MERGE_TOOL": q(MERGE_TOOL)})
    return PreprocessJob(plan, work / "plan.json", plan.tasks, len(plan.inputs), log_dir, name, array, merge)


def sbatch(path: Path, *options: str) -> str:
    """Submit one script; its job id (SubmitError with sbatch's message when refused)."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch not found on PATH: run this on a SLURM login node "
                          "(or install slurm-wlm); --dry-run prints the scripts without it")
    r = subprocess.run([exe, "--parsable", *options, str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SubmitError(f"sbatch refused {path.name}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]


def submit(job: PreprocessJob) -> int:
    """Write the plan and both scripts, submit the array, then the merge depending on it."""
    write_plan(job.plan)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    array_path = job.log_dir / f"{job.job_name}-{stamp}.sbatch"
    merge_path = job.log_dir / f"{job.job_name}-merge-{stamp}.sbatch"
    array_path.write_text(job.array_script)
    merge_path.write_text(job.merge_script)
    array_id = sbatch(array_path)
    merge_id = sbatch(merge_path, f"--dependency=afterok:{array_id}")
    print(f"submitted array job {array_id}: {job.tasks} task(s) over {job.files} file(s)")
    print(f"submitted merge job {merge_id} (after array job {array_id} succeeds)")
    print(f"  plan:   {job.plan_path}")
    print(f"  logs:   {job.log_dir / f'{job.job_name}-{array_id}_<task>.out'}, "
          f"{job.log_dir / f'{job.job_name}-merge-{merge_id}.out'}")
    return 0


@command
def main(argv: list[str]) -> int:
    """Parse, plan, render; print (--dry-run: nothing written) or submit. Exit status as launch.submit."""
    a = parse_args(argv)
    job = build(a)
    if a.dry_run:
        print(f"# plan (not written): {job.plan_path} ({job.files} files, {job.tasks} tasks)")
        print(job.array_script, end="")
        print("# --- merge job (sbatch --dependency=afterok:<array job id>)")
        print(job.merge_script, end="")
        return 0
    return submit(job)
