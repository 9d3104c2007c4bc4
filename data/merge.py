"""Concatenate indexed datasets (shards) into one, with a combined summary.

``merge_datasets(prefixes, out)`` writes ``out.bin/.idx`` (temporary names, renamed when
complete, summary last) holding the documents of ``prefixes`` in order: byte for byte
what one preprocessing pass over their inputs in that order writes. Numpy only.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time

from polytron.data.errors import DataError
from polytron.data.files import (
    check_output_prefix,
    ensure_writable_dir,
    file_id,
    missing_dirs,
    remove_empty_dirs,
    remove_stale_temps,
    writing,
)
from polytron.data.indexed import merge
from polytron.data.preprocess import MAX_LISTED_SKIPS


def resolve_inputs(patterns: list[str]) -> tuple[list[str], list[dict]]:
    """Dataset prefixes to merge, in order, and the preprocessing summaries that describe them.

    Each pattern is a dataset prefix (``PREFIX`` or ``PREFIX.idx``), a sharded run's prefix
    (its ``PREFIX.summary.json`` lists the shards), or a glob over prefixes (sorted).
    """
    prefixes: list[str] = []
    summaries: list[dict] = []
    runs: set[str] = set()  # sharded runs whose summary is already in summaries
    for p in patterns:
        p = p[:-4] if p.endswith((".idx", ".bin")) else p
        if os.path.isfile(p + ".idx"):
            found = [p]
        elif (run := read_summary(p)) and run.get("shards"):
            prefixes += [s["prefix"] for s in run["shards"]]
            summaries.append(run)
            runs.add(os.path.abspath(p))
            continue
        elif glob.has_magic(p):
            found = sorted(f[:-4] for f in glob.glob(os.path.expanduser(p) + ".idx", recursive=True))
            if not found:
                raise DataError(f"input {p}: matches no dataset (no {p}.idx)")
        else:
            raise DataError(f"input {p}: no such dataset ({p}.idx is missing)")
        prefixes += found
        summaries += [s for s in map(read_summary, found) if s]
    return prefixes, summaries + _run_summaries(prefixes, runs)


def _run_summaries(prefixes: list[str], known: set[str]) -> list[dict]:
    """Summaries of sharded runs (``RUN_00000`` ...) not in ``known`` whose shards are all merged here."""
    runs: dict[str, dict | None] = {}
    for p in prefixes:
        m = re.fullmatch(r"(.+)_\d{5}", os.path.abspath(p))
        if m and m.group(1) not in known and m.group(1) not in runs and not os.path.isfile(p + ".summary.json"):
            runs[m.group(1)] = read_summary(m.group(1))
    chosen = set(os.path.abspath(p) for p in prefixes)
    return [s for s in runs.values()
            if s and s.get("shards") and {os.path.abspath(x["prefix"]) for x in s["shards"]} <= chosen]


def read_summary(prefix: str) -> dict | None:
    """``PREFIX.summary.json`` as a dict, or None when there is none (or it is unreadable)."""
    try:
        with open(prefix + ".summary.json", encoding="utf-8") as f:
            s = json.load(f)
        return s if isinstance(s, dict) else None
    except (OSError, ValueError):
        return None


def combine_summaries(parts: list[dict], output_prefix: str) -> dict:
    """One summary for datasets merged from ``parts`` (preprocessing summaries, in merge order)."""
    counts = dict.fromkeys(("documents", "tokens", "skipped", "input_bytes"), 0)
    seconds = 0.0
    by_reason: dict[str, int] = {}
    skipped_lines: list[dict] = []
    input_files: list[str] = []
    files: list[dict] = []
    shared: dict[str, object] = {}  # first value of each tokenizer/format field any part records
    for s in parts:
        for key in counts:
            counts[key] += int(s.get(key, 0))
        seconds += float(s.get("seconds", 0.0))
        for reason, n in s.get("skipped_by_reason", {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        skipped_lines += s.get("skipped_lines", [])[:max(MAX_LISTED_SKIPS - len(skipped_lines), 0)]
        input_files += s.get("input_files", [])
        files += s.get("files", [])
        for key in ("workers", "tokenizer", "tokenizer_fingerprint", "vocab_size", "eod_id", "dtype", "encoder"):
            if key in s:
                shared.setdefault(key, s[key])
    # rates over the summed processing time of the parts, not the wall time of a job
    mb_per_s = counts["input_bytes"] / 1e6 / seconds if seconds > 0 else 0.0
    docs_per_s = counts["documents"] / seconds if seconds > 0 else 0.0
    return {"output_prefix": output_prefix, "documents": counts["documents"], "tokens": counts["tokens"],
            "skipped": counts["skipped"], "skipped_by_reason": by_reason, "skipped_lines": skipped_lines,
            "input_files": input_files, "input_bytes": counts["input_bytes"], "seconds": seconds,
            "mb_per_s": mb_per_s, "docs_per_s": docs_per_s, "files": files, "shards": [],
            "merged_from": len(parts), **shared}


def check_one_tokenizer(summaries: list[dict]) -> str:
    """The tokenizer fingerprint all ``summaries`` record (``""`` when none records one);
    :class:`DataError` naming two datasets whose fingerprints differ."""
    first: dict | None = None
    for s in summaries:
        fp = s.get("tokenizer_fingerprint")
        if not isinstance(fp, str) or not fp:
            continue
        if first is None:
            first = s
        elif fp != first["tokenizer_fingerprint"]:
            raise DataError(f"inputs of different tokenizers: {first.get('output_prefix')} was tokenized "
                            f"with {first['tokenizer_fingerprint']}, {s.get('output_prefix')} with {fp}; "
                            f"merge only datasets of one tokenizer")
    return first["tokenizer_fingerprint"] if first else ""


def _check_not_an_input(prefixes: list[str], out: str) -> None:
    """The output must not be an input: compared as files (device and inode, so also through
    a symlinked directory or a hard link), not as path strings."""
    outs = {file_id(out + ext) for ext in (".bin", ".idx")} - {None}
    for p in prefixes:
        if os.path.abspath(p) == out or outs & {file_id(p + ext) for ext in (".bin", ".idx")}:
            raise DataError(f"output {out}: is also an input ({p}: the same files); "
                            f"choose another --output-prefix")


def merge_datasets(prefixes: list[str], output_prefix: str, summaries: list[dict] | None = None) -> dict:
    """Merge ``prefixes`` (in order) into ``output_prefix``; return the written summary.

    ``summaries`` (preprocessing summaries of the inputs, in order) default to the prefixes'
    own ``.summary.json`` files; without any, the summary holds documents, tokens and dtype.
    Inputs whose summaries record different tokenizer fingerprints are refused.
    """
    t0 = time.time()
    out = check_output_prefix(output_prefix, "--output-prefix")
    _check_not_an_input(prefixes, out)
    if summaries is None:
        summaries = [s for s in map(read_summary, prefixes) if s is not None]
    summaries = [s for s in summaries if s]  # an empty summary has nothing to combine
    fingerprint = check_one_tokenizer(summaries)
    created = missing_dirs(os.path.dirname(out))
    tag = f".tmp{os.getpid()}"
    tmp = [out + ".bin" + tag, out + ".idx" + tag, out + ".summary.json" + tag]
    try:
        ensure_writable_dir(os.path.dirname(out), f"output {out}")
        remove_stale_temps(out)
        with writing(f"output {out}"):
            index = merge(prefixes, tmp[0], tmp[1])
        summ = combine_summaries(summaries, out)
        if fingerprint:
            summ["tokenizer_fingerprint"] = fingerprint
        summ.update(documents=int(index.lengths.size), tokens=index.tokens, dtype=index.dtype.name,
                    merged_from=len(prefixes), merge_seconds=round(time.time() - t0, 3))
        with writing(f"output {out}"):
            with open(tmp[2], "w", encoding="utf-8") as f:
                json.dump(summ, f, indent=1)
            os.replace(tmp[0], out + ".bin")
            os.replace(tmp[1], out + ".idx")
            os.replace(tmp[2], out + ".summary.json")
    except BaseException:
        for p in tmp:
            if os.path.exists(p):
                os.remove(p)
        remove_empty_dirs(created)
        raise
    return summ
