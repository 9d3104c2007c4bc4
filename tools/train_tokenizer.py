#!/usr/bin/env python3
"""Train a SentencePiece tokenizer (BPE or unigram, byte fallback) on text / JSONL files.

    python tools/train_tokenizer.py --input a.jsonl b.txt.gz --output tok/my --vocab-size 32000 \
        [--model-type bpe|unigram] [--json-key text] [--special-tokens "<A>,<B>"] [--instruction-markers]

Writes ``PREFIX.model`` (and ``PREFIX.vocab``). Input documents are read like
``tools/preprocess_data.py`` reads them (JSONL text field, plain text paragraphs, ``.gz``);
malformed lines are skipped and counted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

from polytron.data.errors import DataError
from polytron.data.files import check_input_files, name_inputs
from polytron.data.preprocess import TEXT_UNITS, _jsonl_docs, _text_docs, detect_format, iter_chunks
from polytron.data.tokenizer import INSTRUCTION_MARKERS, train_sentencepiece
from polytron.tools.cli import command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text, JSONL or .gz files")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.model / PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (>= 300)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--json-key", default="text", help="text field of JSONL records")
    p.add_argument("--text-unit", choices=TEXT_UNITS, default="paragraph",
                   help="what one document of a plain-text file is")
    p.add_argument("--special-tokens", default="",
                   help="comma-separated user-defined symbols, each kept as one token")
    p.add_argument("--instruction-markers", action="store_true",
                   help=f"add the instruction pre-training markers {', '.join(INSTRUCTION_MARKERS)}")
    p.add_argument("--max-sentences", type=int, default=4_000_000,
                   help="sample at most this many lines for training")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    return p.parse_args(argv)


def iter_documents(inputs: list[str], json_key: str, text_unit: str, counts: dict[str, int]) -> Iterator[str]:
    """Valid documents of all inputs.

    Counts them in ``counts['documents']``, the malformed ones in ``counts['skipped']``,
    and sets ``counts['finished']`` once every input was read.
    """
    for i, path in enumerate(inputs):
        fmt = detect_format(path)
        for chunk in iter_chunks(path, i, fmt, text_unit):
            skips: list = []
            texts, _ = (_jsonl_docs(chunk, json_key, skips) if fmt == "jsonl"
                        else _text_docs(chunk, text_unit, skips))
            counts["skipped"] += len(skips)
            counts["documents"] += len(texts)
            yield from texts
    counts["finished"] = 1


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vocab_size < 300:
        raise DataError(f"--vocab-size {args.vocab_size}: must be >= 300 (256 byte pieces + specials)")
    check_input_files(args.input)
    specials = [s for s in args.special_tokens.split(",") if s]
    if args.instruction_markers:
        specials += [m for m in INSTRUCTION_MARKERS if m not in specials]
    counts = {"documents": 0, "skipped": 0, "finished": 0}
    total = sum(os.path.getsize(p) for p in args.input)
    try:
        model = train_sentencepiece(iter_documents(args.input, args.json_key, args.text_unit, counts),
                                    args.output, args.vocab_size, model_type=args.model_type,
                                    special_tokens=specials, total_bytes=total,
                                    show_progress=not args.no_progress, max_sentences=args.max_sentences)
    except DataError:
        if counts["finished"] and counts["documents"] == 0:  # clearer than SentencePiece's check
            raise DataError(f"no tokenizer written: {name_inputs(args.input)} held no valid document "
                            f"({counts['skipped']} skipped)") from None
        raise
    print(f"wrote {model} (skipped {counts['skipped']} malformed documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
