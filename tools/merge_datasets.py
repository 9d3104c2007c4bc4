#!/usr/bin/env python3
"""Concatenate Megatron ``.bin/.idx`` datasets (shards) into one.

    python tools/merge_datasets.py --input data/part_00000 data/part_00001 --output-prefix data/all
    python tools/merge_datasets.py --input 'data/part_*' --output-prefix data/all     # glob, sorted
    python tools/merge_datasets.py --input data/sharded_run --output-prefix data/all  # its summary lists the shards
    python tools/merge_datasets.py --plan data/all.parts/plan.json                    # after a SLURM array

The result holds the inputs' documents in the order given: byte for byte what one
``tools/preprocess_data.py`` pass over their inputs in that order writes. All inputs
must share one token dtype and, where their summaries record one, one tokenizer
fingerprint (inputs of two tokenizers are refused, naming both). Writes PREFIX.bin,
PREFIX.idx and PREFIX.summary.json (per-file counts combined from the inputs' summaries,
and the inputs' ``tokenizer_fingerprint``). The output must not be an input: compared as
files (device and inode), so an output prefix reached through a symlinked directory or a
hard link is refused too. Temporaries ``PREFIX.*.tmpPID`` of an earlier killed run are
removed. Needs neither torch nor megatron-core.
"""
from __future__ import annotations

import argparse
import sys

from polytron.data.errors import DataError
from polytron.data.merge import merge_datasets, resolve_inputs
from polytron.tools.cli import command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", default=[], help="dataset prefixes or globs over them, in order")
    p.add_argument("--output-prefix", default="", help="writes PREFIX.bin / .idx / .summary.json")
    p.add_argument("--plan", default="", help="merge the shards of a preprocessing plan (SLURM array run)")
    return p.parse_args(argv)


@command(interrupted="error: interrupted; no output written")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        from polytron.data.shard_plan import merge_plan

        summ = merge_plan(args.plan, args.output_prefix)
    else:
        if not args.input or not args.output_prefix:
            raise DataError("--input and --output-prefix are required (or --plan)")
        prefixes, summaries = resolve_inputs(args.input)
        summ = merge_datasets(prefixes, args.output_prefix, summaries)
    print(f"merged {summ['merged_from']} datasets: {summ['documents']} documents, {summ['tokens']} tokens "
          f"({summ['dtype']}) -> {summ['output_prefix']}.bin / .idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
