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

A Parquet file or ``datasets`` directory larger than an even share (total bytes / tasks)
is split into parts of consecutive row groups / data files, each its own shard
``NNNNNN-FFFFFF`` (``FFFFFF``: its first unit) that any task may take.

:func:`merge_plan` (the job after the array) checks every shard's marker, then
concatenates the shards in input order: the same bytes as one process over all files.
"""
from __future__ import annotations

import glob
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, TypedDict

import numpy as np

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
from polytron.data.preprocess import MAX_LISTED_SKIPS, TEXT_UNITS, preprocess
from polytron.data.table_inputs import dataset_dir_kind, dataset_files, table_units

PLAN_VERSION = 1


@dataclass
class Plan:
    """Inputs, settings and the shard -> task assignment of one array run."""
    inputs: list[str]             # absolute paths, in dataset order
    sizes: list[int]              # on-disk bytes of each input
    tokenizer: str
    output_prefix: str            # where the merge writes the final dataset
    work_dir: str                 # plan.json, shards/, tasks/
    assignment: list[list[int]]   # shard indices of each task, ascending
    json_key: str = "text"
    text_unit: str = "paragraph"
    strict: bool = False
    encoder: str = "auto"
    version: int = PLAN_VERSION
    #: [input index, first unit, end unit] of each shard, in dataset order; end -1: the whole
    #: input; else row groups (Parquet) / data files (datasets directory) [first, end).
    #: Empty (plans written before parts existed): one shard per input.
    parts: list[list[int]] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return len(self.assignment)

    @property
    def shards(self) -> int:
        return len(self.parts) or len(self.inputs)

    def part(self, index: int) -> tuple[int, int, int]:
        """(input index, first unit, end unit) of shard ``index`` (end -1: the whole input)."""
        if not self.parts:
            return index, 0, -1
        i, first, end = self.parts[index]
        return i, first, end

    def shard(self, index: int) -> str:
        """Shard prefix of shard ``index`` (a whole input: the input's index)."""
        i, first, end = self.part(index)
        return os.path.join(self.work_dir, "shards", f"{i:06d}" if end < 0 else f"{i:06d}-{first:06d}")

    def describe(self, index: int) -> str:
        """The input of shard ``index``, with its units when it is a part."""
        i, first, end = self.part(index)
        unit = "data files" if os.path.isdir(self.inputs[i]) else "row groups"
        return self.inputs[i] + ("" if end < 0 else f" ({unit} {first}..{end - 1})")


def assign(sizes: list[int], tasks: int) -> list[list[int]]:
    """Input indices per task: largest file first onto the task with the fewest bytes (ties: lower index)."""
    load = [0] * tasks
    out: list[list[int]] = [[] for _ in range(tasks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        t = min(range(tasks), key=lambda t: (load[t], t))
        out[t].append(i)
        load[t] += sizes[i]
    return [sorted(a) for a in out]


def split_parts(files: list[str], sizes: list[int], tasks: int) -> tuple[list[list[int]], list[int]]:
    """Parts of each input ([input, first, end]) and their bytes: a Parquet file or ``datasets``
    directory above an even share of the bytes is cut into about size/share parts of
    consecutive row groups / data files; everything else stays whole."""
    share = sum(sizes) / max(tasks, 1)
    parts: list[list[int]] = []
    part_sizes: list[int] = []
    for i, (path, size) in enumerate(zip(files, sizes)):
        units = table_units(path) if tasks > 1 and size > share else []
        k = min(len(units), math.ceil(size / share)) if units else 1
        if k < 2:
            parts.append([i, 0, -1])
            part_sizes.append(size)
            continue
        ends = np.cumsum(units)
        edges = [0]
        for j in range(1, k):  # cut after the unit that reaches j/k of the bytes
            e = int(np.searchsorted(ends, ends[-1] * j / k)) + 1
            if edges[-1] < e < len(units):
                edges.append(e)
        edges.append(len(units))
        for a, b in zip(edges, edges[1:]):
            parts.append([i, a, b])
            part_sizes.append(int(sum(units[a:b])))
    return parts, part_sizes


def make_plan(inputs: list[str], output_prefix: str, tokenizer: str, tasks: int, work_dir: str = "",
              json_key: str = "text", text_unit: str = "paragraph", strict: bool = False,
              encoder: str = "auto") -> Plan:
    """Validate the inputs and split them over ``tasks`` (at most one task per shard)."""
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
    parts, part_sizes = split_parts(files, sizes, tasks)
    return Plan(files, sizes, tok, out, work, assign(part_sizes, min(tasks, len(parts))), json_key, text_unit,
                strict, encoder, parts=parts)


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
    """What finished shard ``index`` was made from."""
    def file_id(p: str) -> list:
        if dataset_dir_kind(p):  # a datasets directory: its data files and state.json
            stats = [os.stat(f) for f in [*dataset_files(p), os.path.join(p, "state.json")]]
            return [p, sum(st.st_size for st in stats), max(st.st_mtime_ns for st in stats)]
        st = os.stat(p)
        return [p, st.st_size, st.st_mtime_ns]
    i, first, end = plan.part(index)
    stamp = {"input": file_id(plan.inputs[i]), "tokenizer": file_id(plan.tokenizer),
             "json_key": plan.json_key, "text_unit": plan.text_unit, "strict": plan.strict}
    return stamp if end < 0 else {**stamp, "units": [first, end]}


def shard_done(plan: Plan, index: int) -> bool:
    """Whether shard ``index`` is finished and current (marker matches inputs and settings)."""
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
    files: list[int]             # indices of the plan's shards (whole inputs or parts) assigned to the task
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
    _log(task, f"restart {restart}: {len(mine)} files, {len(done)} already finished")  # files or parts
    t0 = time.time()
    report = TaskReport(task=task, files=mine, skipped_finished=done, processed=[], documents=0,
                        tokens=0, skipped=0, seconds=0.0)
    for n, i in enumerate(mine, 1):
        if i in done:
            _log(task, f"{n}/{len(mine)} {plan.describe(i)}: finished earlier, skipped")
            continue
        _remove_leftovers(plan.shard(i))
        source, first, end = plan.part(i)
        summ = preprocess([plan.inputs[source]], plan.shard(i), plan.tokenizer, workers=workers,
                          json_key=plan.json_key, text_unit=plan.text_unit, strict=plan.strict,
                          chunk_bytes=chunk_bytes, encoder=plan.encoder, allow_empty=True,
                          units=None if end < 0 else (first, end))
        _write_json(plan.shard(i) + ".done.json", _stamp(plan, i), f"shard {plan.shard(i)}")
        report["processed"].append(i)
        report["documents"] += summ.documents
        report["tokens"] += summ.tokens
        report["skipped"] += summ.skipped
        _log(task, f"{n}/{len(mine)} {plan.describe(i)}: {summ.documents} documents, {summ.tokens} tokens, "
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


def _join_parts(plan: Plan, summaries: list[dict]) -> list[dict]:
    """One summary per input: the summaries of consecutive parts of an input added up."""
    out: list[dict] = []
    for n, s in enumerate(summaries):
        if n == 0 or plan.part(n)[0] != plan.part(n - 1)[0]:
            out.append({**s, "files": [dict(f) for f in s["files"]],
                        "skipped_by_reason": dict(s["skipped_by_reason"]), "skipped_lines": list(s["skipped_lines"])})
            continue
        joined = out[-1]
        for key in ("documents", "tokens", "skipped", "input_bytes", "seconds"):
            joined[key] += s[key]
        for reason, count in s["skipped_by_reason"].items():
            joined["skipped_by_reason"][reason] = joined["skipped_by_reason"].get(reason, 0) + count
        joined["skipped_lines"] += s["skipped_lines"][:max(0, MAX_LISTED_SKIPS - len(joined["skipped_lines"]))]
        for key in ("documents", "tokens", "skipped", "disk_bytes", "text_bytes"):
            joined["files"][0][key] += s["files"][0][key]
    return out


def merge_plan(plan_path: str, output_prefix: str = "") -> dict:
    """Merge every shard of the plan, in input order, into its output prefix; return the summary."""
    plan = load_plan(plan_path)
    missing = [i for i in range(plan.shards) if not shard_done(plan, i)]
    if missing:
        owner = {i: t for t, files in enumerate(plan.assignment) for i in files}
        first = ", ".join(f"{plan.describe(i)} (task {owner[i]})" for i in missing[:3])
        raise DataError(f"plan {plan_path}: {len(missing)} of {plan.shards} shards are not finished: "
                        f"{first}{' ...' if len(missing) > 3 else ''}; rerun those tasks first")
    shard_summaries = [_shard_summary(plan, i) for i in range(plan.shards)]
    prefixes = [plan.shard(i) for i, s in enumerate(shard_summaries) if s["documents"] > 0]
    summaries = _join_parts(plan, shard_summaries)
    if not prefixes:
        skipped = sum(s["skipped"] for s in summaries)
        raise DataError(f"no documents written: the {len(plan.inputs)} inputs of plan {plan_path} held no "
                        f"valid document ({skipped} skipped); nothing written to {plan.output_prefix}")
    return merge_datasets(prefixes, output_prefix or plan.output_prefix, summaries)
