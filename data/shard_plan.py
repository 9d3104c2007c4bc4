"""Preprocessing split over many nodes: a plan, resumable array tasks, one merge.

``make_plan`` spreads the input files over ``tasks`` (largest first onto the least loaded
task) and records everything a task needs in ``WORK/plan.json``. Task ``i``
(:func:`run_plan_task`, one SLURM array element) tokenizes each of its files into its
own shard ``WORK/shards/NNNNNN`` (the file's position in the input list) with
:func:`data.preprocess.preprocess`, which publishes ``.bin``, ``.idx`` and the summary by
renames, and then writes ``NNNNNN.done.json`` naming the input file (size, mtime), the
tokenizer and the settings. A shard counts as finished only through that marker, so:

* a requeued task skips its finished files and redoes the one it was killed in (the
  killed run's temporary ``*.tmp<pid>`` files are removed first, never read);
* a changed input, tokenizer or setting makes the shard stale, and it is redone.

:func:`merge_plan` (the job after the array) checks every shard's marker, then
concatenates the shards in input order: the same bytes as one process over all files.
"""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Mapping, TypedDict

from polytron.data.errors import DataError
from polytron.data.files import (
    check_output_prefix,
    ensure_writable_dir,
    os_reason,
    refuse_outputs_as_inputs,
    writing,
)
from polytron.data.inputs import check_inputs, expand_inputs, input_size
from polytron.data.merge import merge_datasets, read_summary
from polytron.data.preprocess import TEXT_UNITS, preprocess
from polytron.data.table_inputs import dataset_dir_kind, dataset_files

PLAN_VERSION = 1


@dataclass
class Plan:
    """Inputs, settings and the file -> task assignment of one array run."""
    inputs: list[str]             # absolute paths, in dataset order
    sizes: list[int]              # on-disk bytes of each input
    tokenizer: str
    output_prefix: str            # where the merge writes the final dataset
    work_dir: str                 # plan.json, shards/, tasks/
    assignment: list[list[int]]   # input indices of each task, ascending
    json_key: str = "text"
    text_unit: str = "paragraph"
    strict: bool = False
    encoder: str = "auto"
    version: int = PLAN_VERSION

    @property
    def tasks(self) -> int:
        return len(self.assignment)

    def shard(self, index: int) -> str:
        """Shard prefix of input ``index``."""
        return os.path.join(self.work_dir, "shards", f"{index:06d}")


def assign(sizes: list[int], tasks: int) -> list[list[int]]:
    """Input indices per task: largest file first onto the task with the fewest bytes (ties: lower index)."""
    load = [0] * tasks
    out: list[list[int]] = [[] for _ in range(tasks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        t = min(range(tasks), key=lambda t: (load[t], t))
        out[t].append(i)
        load[t] += sizes[i]
    return [sorted(a) for a in out]


def make_plan(inputs: list[str], output_prefix: str, tokenizer: str, tasks: int, work_dir: str = "",
              json_key: str = "text", text_unit: str = "paragraph", strict: bool = False,
              encoder: str = "auto") -> Plan:
    """Validate the inputs and split them over ``tasks`` (at most one task per file)."""
    out = check_output_prefix(output_prefix)
    files = [os.path.abspath(p) for p in expand_inputs(inputs, out)]
    check_inputs(files)
    refuse_outputs_as_inputs(files, out)
    if tasks < 1:
        raise DataError(f"tasks {tasks}: must be >= 1")
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text unit {text_unit!r}: allowed: {', '.join(TEXT_UNITS)}")
    tok = os.path.abspath(os.path.expanduser(tokenizer))
    if not os.path.exists(tok):
        raise DataError(f"tokenizer {tok}: no such file or directory")
    work = os.path.abspath(os.path.expanduser(work_dir or out + ".parts"))
    sizes = [input_size(p) for p in files]
    return Plan(files, sizes, tok, out, work, assign(sizes, min(tasks, len(files))), json_key, text_unit,
                strict, encoder)


def write_plan(plan: Plan) -> str:
    """Create the work directory and write ``plan.json`` into it (atomically); return its path."""
    ensure_writable_dir(os.path.join(plan.work_dir, "shards"), f"work directory {plan.work_dir}")
    ensure_writable_dir(os.path.join(plan.work_dir, "tasks"), f"work directory {plan.work_dir}")
    path = os.path.join(plan.work_dir, "plan.json")
    _write_json(path, asdict(plan), f"plan {path}")
    return path


def load_plan(path: str) -> Plan:
    """Read ``plan.json``; :class:`DataError` when missing or not a plan of this version."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("version") != PLAN_VERSION:
            raise DataError(f"plan {path}: version {raw.get('version')!r}, expected {PLAN_VERSION}")
        return Plan(**raw)
    except OSError as e:
        raise DataError(f"plan {path}: cannot read ({os_reason(e)})") from None
    except (ValueError, TypeError, AttributeError):
        raise DataError(f"plan {path}: not a preprocessing plan (bad JSON or fields)") from None


def _write_json(path: str, obj: Mapping[str, object], what: str) -> None:
    """Write JSON to a temporary name, then rename (readers see all of it or nothing)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(what):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)


def _stamp(plan: Plan, index: int) -> dict:
    """What a finished shard of input ``index`` was made from."""
    def file_id(p: str) -> list:
        if dataset_dir_kind(p):  # a datasets directory: its data files and state.json
            stats = [os.stat(f) for f in [*dataset_files(p), os.path.join(p, "state.json")]]
            return [p, sum(st.st_size for st in stats), max(st.st_mtime_ns for st in stats)]
        st = os.stat(p)
        return [p, st.st_size, st.st_mtime_ns]
    return {"input": file_id(plan.inputs[index]), "tokenizer": file_id(plan.tokenizer),
            "json_key": plan.json_key, "text_unit": plan.text_unit, "strict": plan.strict}


def shard_done(plan: Plan, index: int) -> bool:
    """Whether input ``index`` has a finished, current shard (marker matches inputs and settings)."""
    try:
        with open(plan.shard(index) + ".done.json", encoding="utf-8") as f:
            marker = json.load(f)
        return marker == _stamp(plan, index) and read_summary(plan.shard(index)) is not None
    except (OSError, ValueError):
        return False


def _remove_leftovers(prefix: str) -> None:
    """Delete what a killed or stale run left for this shard (temporary files, old outputs)."""
    for p in glob.glob(glob.escape(prefix) + ".*"):
        os.remove(p)


def _log(task: int, message: str) -> None:
    print(f"[preprocess task {task}] {message}", flush=True)


class TaskReport(TypedDict):
    """What one task of a plan did (``tasks/NNNNN.summary.json`` in the plan's work dir)."""
    task: int
    files: list[int]             # indices of the plan's inputs assigned to the task
    skipped_finished: list[int]  # those already finished by an earlier run
    processed: list[int]         # those tokenized by this run
    documents: int               # documents, tokens and skipped documents of the processed files
    tokens: int
    skipped: int
    seconds: float               # wall time of this run


def run_plan_task(plan_path: str, task: int, *, workers: int = 1, chunk_bytes: int = 1 << 18) -> TaskReport:
    """Tokenize task ``task``'s files of the plan, skipping finished ones; return the task summary."""
    plan = load_plan(plan_path)
    if not 0 <= task < plan.tasks:
        raise DataError(f"task index {task}: the plan has tasks 0..{plan.tasks - 1}")
    mine = plan.assignment[task]
    done = [i for i in mine if shard_done(plan, i)]
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    _log(task, f"restart {restart}: {len(mine)} files, {len(done)} already finished")
    t0 = time.time()
    report = TaskReport(task=task, files=mine, skipped_finished=done, processed=[], documents=0,
                        tokens=0, skipped=0, seconds=0.0)
    for n, i in enumerate(mine, 1):
        if i in done:
            _log(task, f"{n}/{len(mine)} {plan.inputs[i]}: finished earlier, skipped")
            continue
        _remove_leftovers(plan.shard(i))
        summ = preprocess([plan.inputs[i]], plan.shard(i), plan.tokenizer, workers=workers,
                          json_key=plan.json_key, text_unit=plan.text_unit, strict=plan.strict,
                          chunk_bytes=chunk_bytes, encoder=plan.encoder, allow_empty=True)
        _write_json(plan.shard(i) + ".done.json", _stamp(plan, i), f"shard {plan.shard(i)}")
        report["processed"].append(i)
        report["documents"] += summ.documents
        report["tokens"] += summ.tokens
        report["skipped"] += summ.skipped
        _log(task, f"{n}/{len(mine)} {plan.inputs[i]}: {summ.documents} documents, {summ.tokens} tokens, "
                   f"{summ.skipped} skipped, {summ.seconds:.1f} s ({summ.mb_per_s:.2f} MB/s)")
    report["seconds"] = round(time.time() - t0, 3)
    _write_json(os.path.join(plan.work_dir, "tasks", f"{task:05d}.summary.json"), report,
                f"task summary in {plan.work_dir}")
    _log(task, f"done: {len(report['processed'])} files tokenized, {len(done)} skipped as finished")
    return report


def _shard_summary(plan: Plan, index: int) -> dict:
    """The summary of a finished shard (:func:`shard_done` checked it is there)."""
    summary = read_summary(plan.shard(index))
    if summary is None:
        raise DataError(f"shard {plan.shard(index)}: its summary is missing or unreadable; rerun its task")
    return summary


def merge_plan(plan_path: str, output_prefix: str = "") -> dict:
    """Merge every shard of the plan, in input order, into its output prefix; return the summary."""
    plan = load_plan(plan_path)
    missing = [i for i in range(len(plan.inputs)) if not shard_done(plan, i)]
    if missing:
        owner = {i: t for t, files in enumerate(plan.assignment) for i in files}
        first = ", ".join(f"{plan.inputs[i]} (task {owner[i]})" for i in missing[:3])
        raise DataError(f"plan {plan_path}: {len(missing)} of {len(plan.inputs)} shards are not finished: "
                        f"{first}{' ...' if len(missing) > 3 else ''}; rerun those tasks first")
    summaries = [_shard_summary(plan, i) for i in range(len(plan.inputs))]
    prefixes = [plan.shard(i) for i, s in enumerate(summaries) if s["documents"] > 0]
    if not prefixes:
        skipped = sum(s["skipped"] for s in summaries)
        raise DataError(f"no documents written: the {len(plan.inputs)} inputs of plan {plan_path} held no "
                        f"valid document ({skipped} skipped); nothing written to {plan.output_prefix}")
    return merge_datasets(prefixes, output_prefix or plan.output_prefix, summaries)
