#!/usr/bin/env python3
"""Tokenize text / JSONL (optionally .gz) into a Megatron ``.bin/.idx`` indexed dataset.

    python tools/preprocess_data.py --input a.jsonl b.txt.gz --output-prefix data/mydata \
        --tokenizer tok.model|hf_tokenizer_dir [--workers N] [--json-key text] [--strict]

Each JSONL line is one document (its ``--json-key`` field); in plain-text files a
document is a paragraph (``--text-unit``). An end-of-document token is appended to
every document. Malformed lines are skipped and reported with file and line (or stop
the run with ``--strict``). Writes PREFIX.bin, PREFIX.idx and PREFIX.summary.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.errors import DataError  # noqa: E402
from data.preprocess import TEXT_UNITS, preprocess  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text, JSONL or .gz files")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin / .idx / .summary.json")
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model file or Hugging Face tokenizer directory")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="tokenizing processes (default: CPU count)")
    p.add_argument("--json-key", default="text", help="text field of JSONL records")
    p.add_argument("--text-unit", choices=TEXT_UNITS, default="paragraph",
                   help="one document of a plain-text file: a blank-line separated paragraph, a line, "
                        "or the whole file")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed document")
    p.add_argument("--chunk-mb", type=float, default=0.25, help="input MB handed to a worker at once")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summ = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                          json_key=args.json_key, text_unit=args.text_unit, strict=args.strict,
                          show_progress=not args.no_progress,
                          chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    print(summ.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
