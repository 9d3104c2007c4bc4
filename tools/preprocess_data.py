#!/usr/bin/env python3
"""Tokenize text / JSONL (plain, .gz or .zst), Parquet, Arrow and ``datasets`` directories into
Megatron ``.bin/.idx`` indexed datasets.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' b.txt.gz --output-prefix data/mydata \\
        --tokenizer tok.model|hf_tokenizer_dir [--workers N] [--shard-size-mb 4096 | --shard-by-file]

Each JSONL line is one document (its ``--json-key`` field), and so is each row of a
Parquet file, Arrow file or ``datasets`` directory saved with ``save_to_disk`` (its
``--json-key`` column); in plain-text files a document is a paragraph (``--text-unit``).
An end-of-document token is appended to every document. Malformed lines are skipped
and reported with file and line (row, for tables), or stop the run with ``--strict``.
Writes PREFIX.bin, PREFIX.idx (or shards PREFIX_00000.*, ...) and PREFIX.summary.json
(with the tokenizer's ``tokenizer_fingerprint``, which training, merging and mixtures
check). A glob input skips this run's own outputs; an input that is one of them (by name
or by device and inode) is refused; ``.tmpPID`` files an earlier killed run left for the
same prefix are removed. ``--plan PLAN --task-index I`` runs one task of a SLURM array
(``python -m launch.submit preprocess``). Neither torch nor megatron-core is imported.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from polytron.data.errors import DataError
from polytron.data.inputs import read_input_list
from polytron.data.preprocess import ENCODERS, TEXT_UNITS, preprocess
from polytron.tools.cli import command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", default=[],
                   help="text, JSONL, .gz, .zst, .parquet or .arrow files, datasets save_to_disk "
                        "directories, or globs (quoted; ** recurses)")
    p.add_argument("--input-list", default="", help="file naming one input (or glob) per line")
    p.add_argument("--output-prefix", default="", help="writes PREFIX.bin / .idx / .summary.json")
    p.add_argument("--tokenizer", default="", help="SentencePiece .model file or Hugging Face tokenizer directory")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="tokenizing processes (default: CPU count)")
    p.add_argument("--json-key", default="text",
                   help="text field of JSONL records, text column of Parquet/Arrow/datasets inputs")
    p.add_argument("--text-unit", choices=TEXT_UNITS, default="paragraph",
                   help="one document of a plain-text file: a blank-line separated paragraph, a line, "
                        "or the whole file")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed document")
    p.add_argument("--shard-size-mb", type=float, default=0,
                   help="write shards PREFIX_00000.* of about this many MB of tokens each (0: one dataset)")
    p.add_argument("--shard-by-file", action="store_true", help="one shard per input file")
    p.add_argument("--encoder", choices=ENCODERS, default="auto",
                   help="auto: cached exact SentencePiece encoding where the model allows it; plain: never")
    p.add_argument("--chunk-mb", type=float, default=0.25, help="input MB handed to a worker at once")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plan", default="", help="SLURM array plan (written by python -m launch.submit preprocess)")
    p.add_argument("--task-index", type=int, default=-1,
                   help="with --plan: this task's index (default: $SLURM_ARRAY_TASK_ID)")
    return p.parse_args(argv)


def run_task(args: argparse.Namespace) -> int:
    """One SLURM array task: its files of the plan, each to its own shard, finished ones skipped."""
    from polytron.data.shard_plan import run_plan_task

    index = args.task_index if args.task_index >= 0 else int(os.environ.get("SLURM_ARRAY_TASK_ID", "-1"))
    if index < 0:
        raise DataError("--plan needs --task-index (or SLURM_ARRAY_TASK_ID)")
    run_plan_task(args.plan, index, workers=args.workers, chunk_bytes=_chunk_bytes(args))
    return 0


def _chunk_bytes(args: argparse.Namespace) -> int:
    """``--chunk-mb`` in bytes; :class:`DataError` unless a finite number > 0."""
    if not (math.isfinite(args.chunk_mb) and args.chunk_mb > 0):
        raise DataError(f"--chunk-mb {args.chunk_mb}: must be a finite number of MB > 0")
    return max(1, int(args.chunk_mb * (1 << 20)))


@command(interrupted="error: interrupted; no output written")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        return run_task(args)
    inputs = args.input + (read_input_list(args.input_list) if args.input_list else [])
    if not args.output_prefix or not args.tokenizer:
        raise DataError("--output-prefix and --tokenizer are required (or --plan)")
    if args.shard_by_file and args.shard_size_mb:
        raise DataError("--shard-size-mb and --shard-by-file exclude each other")
    summ = preprocess(inputs, args.output_prefix, args.tokenizer, workers=args.workers,
                      json_key=args.json_key, text_unit=args.text_unit, strict=args.strict,
                      show_progress=not args.no_progress, chunk_bytes=_chunk_bytes(args),
                      shard_mb=args.shard_size_mb, shard_by_file=args.shard_by_file,
                      encoder=args.encoder)
    print(summ.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
