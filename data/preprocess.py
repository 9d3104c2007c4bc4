"""Text / JSONL (optionally gzip-compressed) -> Megatron ``.bin/.idx`` indexed datasets.

Pipeline: the main process reads each input file as bytes and cuts it into chunks of
whole documents (about ``chunk_bytes`` each); worker processes decode, parse, validate
and tokenize a chunk, returning one flat token array plus document lengths; the main
process writes results strictly in input order through megatron-core's
``IndexedDatasetBuilder``, so the output is byte-identical for any number of workers.
Every document ends with the tokenizer's end-of-document token.

Malformed input (invalid JSON, a missing or non-string text field, non-UTF-8 bytes,
empty documents) is skipped and recorded with file, line and reason -- or, with
``strict=True``, stops the run with a :class:`DataError`. A run that finds no valid
document at all, or cannot write its output location, fails with a one-line
:class:`DataError` and leaves nothing behind.
"""
from __future__ import annotations

import collections
import gc
import gzip
import io
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, Iterator

import numpy as np

from data.errors import DataError
from data.files import (check_input_files, ensure_writable_dir, missing_dirs, name_inputs,
                        os_reason, remove_empty_dirs, writing)
from data.tokenizer import Tokenizer, load_tokenizer

TEXT_UNITS = ("paragraph", "line", "file")
MAX_LISTED_SKIPS = 10_000


@dataclass
class Chunk:
    """Whole documents of one input file as one raw byte block (cut at a line end)."""
    file_idx: int
    fmt: str                 # "jsonl" or "text"
    first_line: int          # 1-based line number of the block's first line
    data: bytes
    disk_bytes: int          # on-disk (possibly compressed) bytes this chunk advanced

    @property
    def lines(self) -> list[bytes]:
        """The block's lines, newline kept (split on b"\\n" only)."""
        return io.BytesIO(self.data).readlines()


@dataclass
class ChunkResult:
    """Tokens of a chunk's valid documents and the reasons for skipped ones."""
    file_idx: int
    tokens: np.ndarray        # (sum(lengths),) all documents concatenated, EOD included
    lengths: list[int]        # tokens per document
    skips: list[tuple[int, str]]  # (line number, reason)
    text_bytes: int
    disk_bytes: int


@dataclass
class Summary:
    """What a preprocessing run produced; written as ``PREFIX.summary.json``."""
    output_prefix: str
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_lines: list[dict] = field(default_factory=list)
    input_files: list[str] = field(default_factory=list)
    input_bytes: int = 0
    seconds: float = 0.0
    mb_per_s: float = 0.0
    workers: int = 1
    tokenizer: str = ""
    vocab_size: int = 0
    eod_id: int = 0
    dtype: str = ""

    def record_skip(self, path: str, line: int, reason: str) -> None:
        self.skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        if len(self.skipped_lines) < MAX_LISTED_SKIPS:
            self.skipped_lines.append({"file": path, "line": line, "reason": reason})

    def report(self, max_lines: int = 20) -> str:
        """Human-readable multi-line summary."""
        out = [f"documents: {self.documents}", f"tokens: {self.tokens}",
               f"skipped: {self.skipped}" + (" (" + ", ".join(
                   f"{r}: {n}" for r, n in sorted(self.skipped_by_reason.items())) + ")"
                   if self.skipped else ""),
               f"input: {self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s "
               f"({self.mb_per_s:.2f} MB/s, {self.workers} worker{'s' if self.workers > 1 else ''})",
               f"output: {self.output_prefix}.bin / .idx ({self.dtype})"]
        for s in self.skipped_lines[:max_lines]:
            out.append(f"  skipped {s['file']}:{s['line']}: {s['reason']}")
        if self.skipped > max_lines:
            out.append(f"  ... {self.skipped - max_lines} more in {self.output_prefix}.summary.json")
        return "\n".join(out)


# ----------------------------------------------------------------------------- reading

def detect_format(path: str) -> str:
    """``jsonl`` for ``.jsonl``/``.json`` (optionally ``.gz``), else ``text``."""
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


class _CountingReader:
    """Opens a plain or gzip file; ``disk_pos()`` is the on-disk byte position."""

    def __init__(self, path: str) -> None:
        self.raw: BinaryIO = open(path, "rb")
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self.raw) if path.endswith(".gz") else self.raw

    def disk_pos(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def _cut(buf: bytes, fmt: str, text_unit: str) -> int:
    """Length of the longest prefix of ``buf`` made of whole documents (0: none yet)."""
    if fmt == "text" and text_unit == "file":
        return 0
    if fmt == "text" and text_unit == "paragraph":  # after a blank line
        a, b = buf.rfind(b"\n\n"), buf.rfind(b"\n\r\n")
        return max(a + 2 if a >= 0 else 0, b + 3 if b >= 0 else 0)
    return buf.rfind(b"\n") + 1


def iter_chunks(path: str, file_idx: int, fmt: str, text_unit: str,
                chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Cut one input file into byte blocks of whole documents, about ``chunk_bytes`` each.

    The main process only moves bytes (no per-line Python objects); parsing happens in
    the workers.
    """
    try:
        reader = _CountingReader(path)
    except OSError as e:
        raise DataError(f"input {path}: cannot read ({os_reason(e)})") from None
    try:
        line_no, last_pos = 1, 0
        parts: list[bytes] = []  # bytes read but not yet handed out (no boundary in them)
        while True:
            try:
                data = reader.stream.read(chunk_bytes)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DataError(f"{path}: cannot read (corrupt or truncated compressed file?): {e}") from None
            if data:
                tail = parts[-1][-2:] if parts else b""  # a boundary may straddle two reads
                cut = _cut(tail + data, fmt, text_unit) - len(tail)
                parts.append(data)
                if cut <= 0:
                    continue
                block = b"".join(parts[:-1]) + data[:cut]
                parts = [data[cut:]] if cut < len(data) else []
            else:
                block, parts = b"".join(parts), []
            pos = reader.disk_pos()
            if block or pos > last_pos:
                yield Chunk(file_idx, fmt, line_no, block, pos - last_pos)
            line_no += block.count(b"\n")
            last_pos = pos
            if not data:
                return
    finally:
        reader.close()


# ----------------------------------------------------------------------------- parsing

def _jsonl_docs(chunk: Chunk, json_key: str, skips: list) -> tuple[list[str], int]:
    """Valid texts of a JSONL chunk; appends (line, reason) for the others."""
    texts = []
    for i, raw in enumerate(chunk.lines):
        line = chunk.first_line + i
        if not raw.strip():
            skips.append((line, "empty line"))
            continue
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            skips.append((line, "invalid UTF-8"))
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            skips.append((line, "invalid JSON"))
            continue
        if not isinstance(obj, dict) or json_key not in obj:
            skips.append((line, f"missing field '{json_key}'"))
            continue
        text = obj[json_key]
        if not isinstance(text, str):
            skips.append((line, f"field '{json_key}' is not a string"))
            continue
        if not text.strip():
            skips.append((line, "empty document"))
            continue
        texts.append(text)
    return texts, len(chunk.data)


def _text_units(chunk: Chunk, unit: str) -> Iterator[tuple[int, list[bytes]]]:
    """(first line, lines) of each document of a plain-text chunk."""
    if unit == "file":
        yield chunk.first_line, chunk.lines
        return
    if unit == "line":
        for i, raw in enumerate(chunk.lines):
            yield chunk.first_line + i, [raw]
        return
    start, para = 0, []
    for i, raw in enumerate(chunk.lines):
        if raw.strip():
            if not para:
                start = chunk.first_line + i
            para.append(raw)
        elif para:
            yield start, para
            para = []
    if para:
        yield start, para


def _text_docs(chunk: Chunk, unit: str, skips: list) -> tuple[list[str], int]:
    """Valid texts of a plain-text chunk; appends (line, reason) for the others."""
    texts = []
    for line, parts in _text_units(chunk, unit):
        raw = b"".join(parts)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_line = line + raw[:e.start].count(b"\n")
            skips.append((bad_line, "invalid UTF-8"))
            continue
        text = text.rstrip("\r\n") if unit != "file" else text
        if not text.strip():
            skips.append((line, "empty document"))
            continue
        texts.append(text)
    return texts, len(chunk.data)


# ----------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(tokenizer_path: str, json_key: str, text_unit: str, dtype: str) -> None:
    """Load the tokenizer once per worker process."""
    _W.update(tok=load_tokenizer(tokenizer_path), key=json_key, unit=text_unit, dtype=np.dtype(dtype))


def encode_chunk(chunk: Chunk) -> ChunkResult:
    """Parse, validate and tokenize one chunk (runs in a worker process)."""
    tok: Tokenizer = _W["tok"]
    skips: list[tuple[int, str]] = []
    if chunk.fmt == "jsonl":
        texts, nbytes = _jsonl_docs(chunk, _W["key"], skips)
    else:
        texts, nbytes = _text_docs(chunk, _W["unit"], skips)
    ids = tok.encode_batch(texts)
    eod = tok.eod_id
    flat: list[int] = []
    lengths = []
    for doc in ids:
        flat.extend(doc)
        flat.append(eod)
        lengths.append(len(doc) + 1)
    return ChunkResult(chunk.file_idx, np.asarray(flat, dtype=_W["dtype"]), lengths,
                       skips, nbytes, chunk.disk_bytes)


# ----------------------------------------------------------------------------- driver

def _check_inputs(inputs: list[str], json_key: str, text_unit: str, workers: int) -> None:
    check_input_files(inputs)
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text unit {text_unit!r}: allowed: {', '.join(TEXT_UNITS)}")
    if workers < 1:
        raise DataError(f"workers {workers}: must be >= 1")
    if not json_key:
        raise DataError("json key must not be empty")


def encode_chunks(chunks: list[Chunk]) -> list[ChunkResult]:
    """Encode several (small) chunks in one task."""
    return [encode_chunk(c) for c in chunks]


def _batched(chunks: Iterator[Chunk], nbytes: int) -> Iterator[list[Chunk]]:
    """Group consecutive chunks (e.g. many small files) into tasks of about ``nbytes``."""
    group: list[Chunk] = []
    size = 0
    for c in chunks:
        group.append(c)
        size += len(c.data)
        if size >= nbytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def _results(chunks: Iterator[Chunk], workers: int, init_args: tuple,
             task_bytes: int) -> Iterator[ChunkResult]:
    """Encode chunks in order: in-process for 1 worker, else a bounded process pool."""
    if workers == 1:
        _init_worker(*init_args)
        for c in chunks:
            yield encode_chunk(c)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    gc.freeze()  # keep the parent's objects out of the children's copy-on-write traffic
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        gc.unfreeze()
        pending: collections.deque = collections.deque()
        for group in _batched(chunks, task_bytes):
            pending.append(pool.apply_async(encode_chunks, (group,)))
            if len(pending) >= 2 * workers + 2:  # bounded: never read far ahead of the writer
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def preprocess(inputs: list[str], output_prefix: str, tokenizer_path: str, *, workers: int = 1,
               json_key: str = "text", text_unit: str = "paragraph", strict: bool = False,
               show_progress: bool = False, chunk_bytes: int = 1 << 18) -> Summary:
    """Tokenize ``inputs`` into ``output_prefix.{bin,idx,summary.json}``; return the summary.

    Outputs are written to temporary names and renamed at the end, so a failed run
    leaves no partial dataset behind (nor the directories it created). An unwritable
    output location, or inputs without a single valid document, raise :class:`DataError`.
    """
    _check_inputs(inputs, json_key, text_unit, workers)
    tok = load_tokenizer(tokenizer_path)
    out = os.path.abspath(os.path.expanduser(output_prefix))
    summ = Summary(output_prefix=out, input_files=[os.path.abspath(p) for p in inputs],
                   workers=workers, tokenizer=tok.path, vocab_size=tok.vocab_size, eod_id=tok.eod_id)
    created = missing_dirs(os.path.dirname(out))
    try:
        ensure_writable_dir(os.path.dirname(out), f"output {out}")
        t0 = time.time()
        tmp = _write_dataset(inputs, tok, summ, workers=workers, json_key=json_key,
                             text_unit=text_unit, strict=strict, show_progress=show_progress,
                             chunk_bytes=chunk_bytes)
        summ.seconds = time.time() - t0
        summ.mb_per_s = summ.input_bytes / 1e6 / max(summ.seconds, 1e-9)
        _publish(out, tmp, summ)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return summ


def _write_dataset(inputs: list[str], tok: Tokenizer, summ: Summary, *, workers: int, json_key: str,
                   text_unit: str, strict: bool, show_progress: bool, chunk_bytes: int) -> tuple[str, str]:
    """Tokenize all inputs into temporary ``.bin``/``.idx`` files; return their paths.

    The temporary files are removed again if anything fails, including a run that
    found no valid document at all.
    """
    from data._megatron import DType, IndexedDatasetBuilder

    out = summ.output_prefix
    dtype = DType.optimal_dtype(tok.vocab_size)
    summ.dtype = np.dtype(dtype).name
    tmp_bin, tmp_idx = f"{out}.bin.tmp{os.getpid()}", f"{out}.idx.tmp{os.getpid()}"
    with writing(f"output {out}"):
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    bar = _progress_bar(inputs, show_progress)
    try:
        chunks = (c for i, p in enumerate(inputs)
                  for c in iter_chunks(p, i, detect_format(p), text_unit, chunk_bytes))
        init = (tok.path, json_key, text_unit, summ.dtype)
        for res in _results(chunks, workers, init, chunk_bytes):
            _write_result(res, builder, summ, inputs, strict)
            if bar is not None:
                bar.update(res.disk_bytes)
        _require_documents(inputs, summ)
        with writing(f"output {out}"):
            builder.finalize(tmp_idx)
    except BaseException:
        builder.data_file.close()
        _remove_files(tmp_bin, tmp_idx)
        raise
    finally:
        if bar is not None:
            bar.close()
    return tmp_bin, tmp_idx


def _require_documents(inputs: list[str], summ: Summary) -> None:
    """A dataset without documents is useless downstream: refuse to write one."""
    if summ.documents:
        return
    reasons = ", ".join(f"{r} x{n}" for r, n in sorted(summ.skipped_by_reason.items()))
    why = f"{summ.skipped} skipped: {reasons}" if summ.skipped else "no text"
    raise DataError(f"no documents written: {name_inputs(inputs)} held no valid document ({why}); "
                    f"nothing written to {summ.output_prefix}")


def _remove_files(*paths: str) -> None:
    """Remove temporary files that may or may not exist."""
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def _publish(out: str, tmp: tuple[str, str], summ: Summary) -> None:
    """Rename the temporary files into place, the summary written (to a temp name) first."""
    tmp_summary = f"{out}.summary.json.tmp{os.getpid()}"
    try:
        with writing(f"output {out}"):
            _dump_summary(summ, tmp_summary)
            os.replace(tmp[0], out + ".bin")
            os.replace(tmp[1], out + ".idx")
            os.replace(tmp_summary, out + ".summary.json")
    except BaseException:
        _remove_files(*tmp, tmp_summary)
        raise


def _write_result(res: ChunkResult, builder, summ: Summary, inputs: list[str], strict: bool) -> None:
    """Append one chunk's documents to the dataset and its skips to the summary."""
    path = inputs[res.file_idx]
    if res.skips and strict:
        line, reason = res.skips[0]
        raise DataError(f"{path}:{line}: {reason} (--strict stops at the first malformed document)")
    for line, reason in res.skips:
        summ.record_skip(path, line, reason)
    if res.lengths:
        # One write per chunk: the builder records one sequence per document; then mark each
        # sequence as its own document (the same index as one add_document call per document).
        n0 = len(builder.sequence_lengths)
        builder.add_document(res.tokens, res.lengths)
        del builder.document_indices[-1]
        builder.document_indices.extend(range(n0 + 1, n0 + len(res.lengths) + 1))
    summ.documents += len(res.lengths)
    summ.tokens += int(res.tokens.size)
    summ.input_bytes += res.text_bytes


def _progress_bar(inputs: list[str], show: bool):
    """A tqdm bar over on-disk input bytes (shows MB/s), or None."""
    if not show:
        return None
    from tqdm import tqdm

    total = sum(os.path.getsize(p) for p in inputs)
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _dump_summary(summ: Summary, path: str) -> None:
    """Write the summary JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(summ), f, indent=1)
