"""Text / JSONL (plain, ``.gz`` or ``.zst``), Parquet, Arrow and ``datasets`` directories ->
Megatron ``.bin/.idx`` indexed datasets.

Pipeline: the main process reads each input file as bytes and cuts it into chunks of
whole documents (about ``chunk_bytes`` each); worker processes decode, parse, validate
and tokenize a chunk (:mod:`data.segment_cache`), returning the token ids of all its
documents as one byte block plus their lengths; the main process writes blocks strictly
in input order (:mod:`data.indexed`, numpy only), so the output is byte-identical for
any number of workers and to megatron-core's own writer. Every document ends with the
tokenizer's end-of-document token. Nothing here imports torch or megatron-core.

Output is one dataset ``PREFIX.{bin,idx}`` or shards ``PREFIX_00000.{bin,idx}, ...`` cut
by size (``shard_mb``) or one per input file (``shard_by_file``); concatenating the shards
(``tools/merge_datasets.py``) gives the unsharded dataset byte for byte.
``PREFIX.summary.json`` records documents, tokens and skipped lines per input file.

A Parquet/Arrow input's text column arrives as chunks of its UTF-8 bytes with offsets
(:mod:`data.table_inputs`); its documents go through the same checks and encoder, so the
same documents give the same bytes whatever file format held them.

Malformed input (invalid JSON, a missing or non-string text field, non-UTF-8 bytes,
empty documents, null table values) is skipped and recorded with file, line and reason -- or, with
``strict=True``, stops the run with a :class:`DataError`. A run that finds no valid
document at all, or cannot write its output location, fails with a one-line
:class:`DataError` and leaves nothing behind.
"""
from __future__ import annotations

import collections
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from polytron.data.errors import DataError
from polytron.data.files import (
    check_output_prefix,
    ensure_writable_dir,
    missing_dirs,
    name_inputs,
    refuse_outputs_as_inputs,
    remove_empty_dirs,
    remove_stale_temps,
    writing,
)
from polytron.data.indexed import DatasetWriter, optimal_dtype
from polytron.data.inputs import Chunk, check_inputs, detect_format, expand_inputs, input_size, iter_chunks
from polytron.data.segment_cache import build_encoder
from polytron.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

TEXT_UNITS = ("paragraph", "line", "file")
ENCODERS = ("auto", "plain")
MAX_LISTED_SKIPS = 10_000
_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() removes
#: A paragraph: one or more lines holding something besides ASCII whitespace.
#: Anchored at line starts and possessive, so long whitespace runs cost linear time.
_PARAGRAPH = re.compile("(?m)^(?:[ \t\r\x0b\x0c]*+[^ \t\r\x0b\x0c\n][^\n]*+(?:\n|\\Z))+")


@dataclass
class ChunkResult:
    """Tokens of a chunk's valid documents and the reasons for skipped ones."""
    file_idx: int
    tokens: bytes             # ids of all documents back to back in the output dtype, EOD included
    lengths: np.ndarray       # (documents,) int32 tokens per document
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
    docs_per_s: float = 0.0
    workers: int = 1
    tokenizer: str = ""
    #: what the tokenizer is (data.tokenizer fingerprint): training, merging and mixtures
    #: refuse to combine this dataset with another tokenizer
    tokenizer_fingerprint: str = ""
    vocab_size: int = 0
    eod_id: int = 0
    dtype: str = ""
    encoder: str = ""
    #: per input file: path, documents, tokens, skipped, disk_bytes, text_bytes
    files: list[dict] = field(default_factory=list)
    #: when sharded: prefix, documents, tokens, files (indices into input_files) of each shard;
    #: empty: one dataset at output_prefix
    shards: list[dict] = field(default_factory=list)

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
               f"input: {self.input_bytes / 1e6:.2f} MB in {len(self.input_files)} file"
               f"{'s' if len(self.input_files) != 1 else ''}, {self.seconds:.2f} s "
               f"({self.mb_per_s:.2f} MB/s, {self.docs_per_s:.0f} docs/s, {self.workers} worker"
               f"{'s' if self.workers > 1 else ''}, {self.encoder} encoder)"]
        if self.shards:
            out.append(f"output: {len(self.shards)} shards {self.shards[0]['prefix']} .. "
                       f"{self.shards[-1]['prefix']} .bin / .idx ({self.dtype})")
        else:
            out.append(f"output: {self.output_prefix}.bin / .idx ({self.dtype})")
        for s in self.skipped_lines[:max_lines]:
            out.append(f"  skipped {s['file']}:{s['line']}: {s['reason']}")
        if self.skipped > max_lines:
            out.append(f"  ... {self.skipped - max_lines} more in {self.output_prefix}.summary.json")
        return "\n".join(out)


# ----------------------------------------------------------------------------- parsing

def _split_lines(text: str) -> list[str]:
    """Lines of a decoded chunk without their ``\\n`` (split on ``\\n`` only, as bytes.readlines)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _check_record(line: str, json_key: str) -> tuple[str | None, str]:
    """(text, "") of one JSONL line, or (None, reason it is skipped)."""
    if not line.strip(_ASCII_SPACE):
        return None, "empty line"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None, "invalid JSON"
    if not isinstance(obj, dict) or json_key not in obj:
        return None, f"missing field '{json_key}'"
    text = obj[json_key]
    if not isinstance(text, str):
        return None, f"field '{json_key}' is not a string"
    if not text.strip():
        return None, "empty document"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid Unicode (lone surrogate escape)"
    return text, ""


def _jsonl_docs(chunk: Chunk, json_key: str, skips: list) -> tuple[list[str], int]:
    """Valid texts of a JSONL chunk; appends (line, reason) for the others."""
    try:
        decoded = chunk.data.decode("utf-8")
    except UnicodeDecodeError:  # some line is not UTF-8: find which, line by line
        return _jsonl_docs_by_line(chunk, json_key, skips), len(chunk.data)
    texts = []
    for i, line in enumerate(_split_lines(decoded)):
        text, reason = _check_record(line, json_key)
        if text is None:
            skips.append((chunk.first_line + i, reason))
        else:
            texts.append(text)
    return texts, len(chunk.data)


def _jsonl_docs_by_line(chunk: Chunk, json_key: str, skips: list) -> list[str]:
    """Valid texts of a JSONL chunk holding invalid UTF-8, decoded line by line."""
    texts = []
    for i, raw in enumerate(chunk.lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            reason = "empty line" if not raw.strip() else "invalid UTF-8"
            skips.append((chunk.first_line + i, reason))
            continue
        text, reason = _check_record(line, json_key)
        if text is None:
            skips.append((chunk.first_line + i, reason))
        else:
            texts.append(text)
    return texts


def _table_docs(chunk: Chunk, json_key: str, skips: list) -> tuple[list[str], int]:
    """Valid texts of a table chunk (UTF-8 values back to back at ``chunk.offsets``)."""
    data, nulls = chunk.data, chunk.nulls
    assert chunk.offsets is not None, "_table_docs on a chunk without offsets"
    offsets = chunk.offsets.tolist()
    try:
        whole = data.decode("utf-8")
    except UnicodeDecodeError:
        whole = ""
    ascii_only = len(whole) == len(data)  # all ASCII: byte offsets are str offsets
    texts = []
    for i in range(len(offsets) - 1):
        if nulls is not None and nulls[i]:
            skips.append((chunk.first_line + i, f"field '{json_key}' is null"))
            continue
        a, b = offsets[i], offsets[i + 1]
        if ascii_only:
            text = whole[a:b]
        else:
            try:
                text = data[a:b].decode("utf-8")
            except UnicodeDecodeError:
                skips.append((chunk.first_line + i, "invalid UTF-8"))
                continue
        if not text.strip():
            skips.append((chunk.first_line + i, "empty document"))
            continue
        texts.append(text)
    return texts, len(data)


def _text_units(chunk: Chunk, unit: str) -> Iterator[tuple[int, list[bytes]]]:
    """(first line, lines) of each document of a plain-text chunk."""
    if unit == "file":
        yield chunk.first_line, chunk.lines
        return
    if unit == "line":
        for i, raw in enumerate(chunk.lines):
            yield chunk.first_line + i, [raw]
        return
    start = 0
    para: list[bytes] = []
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


def _decoded_units(chunk: Chunk, text: str, unit: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of each document of a chunk that decoded as a whole."""
    if unit == "file":
        yield chunk.first_line, text
    elif unit == "line":
        for i, line in enumerate(_split_lines(text)):
            yield chunk.first_line + i, line
    else:
        first, pos = chunk.first_line, 0  # first: the line number where paragraph m starts
        for m in _PARAGRAPH.finditer(text):
            first += text.count("\n", pos, m.start())
            pos = m.start()
            yield first, m.group()


def _text_docs(chunk: Chunk, unit: str, skips: list) -> tuple[list[str], int]:
    """Valid texts of a plain-text chunk; appends (line, reason) for the others."""
    try:
        decoded = chunk.data.decode("utf-8")
    except UnicodeDecodeError:
        return _text_docs_by_unit(chunk, unit, skips), len(chunk.data)
    texts = []
    for line, text in _decoded_units(chunk, decoded, unit):
        text = text.rstrip("\r\n") if unit != "file" else text
        if not text.strip():
            skips.append((line, "empty document"))
            continue
        texts.append(text)
    return texts, len(chunk.data)


def _text_docs_by_unit(chunk: Chunk, unit: str, skips: list) -> list[str]:
    """Valid texts of a plain-text chunk holding invalid UTF-8, decoded document by document."""
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
    return texts


# ----------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(tokenizer_path: str, json_key: str, text_unit: str, dtype: str, encoder: str,
                 *file_stamp: int) -> None:
    """Load the tokenizer and build the encoder once per process (a forked worker inherits it).

    ``file_stamp`` (size, mtime of the tokenizer) makes a changed file load again.
    """
    args = (tokenizer_path, json_key, text_unit, dtype, encoder, *file_stamp)
    if _W.get("args") != args:
        _prepare_worker(load_tokenizer(tokenizer_path), args)


def _prepare_worker(tok: Tokenizer, args: tuple) -> None:
    """Set this process's encoder for ``args`` (the arguments of :func:`_init_worker`) from ``tok``."""
    _, json_key, text_unit, dtype, encoder, *_ = args
    _W.update(args=args, enc=build_encoder(tok, np.dtype(dtype), encoder), key=json_key, unit=text_unit)


def encode_chunk(chunk: Chunk) -> ChunkResult:
    """Parse, validate and tokenize one chunk (runs in a worker process)."""
    skips: list[tuple[int, str]] = []
    if chunk.offsets is not None:
        texts, nbytes = _table_docs(chunk, _W["key"], skips)
    elif chunk.fmt == "jsonl":
        texts, nbytes = _jsonl_docs(chunk, _W["key"], skips)
    else:
        texts, nbytes = _text_docs(chunk, _W["unit"], skips)
    if texts:
        tokens, lengths = _W["enc"].encode_docs(texts)
    else:
        tokens, lengths = b"", np.zeros(0, np.int32)
    return ChunkResult(chunk.file_idx, tokens, lengths, skips, nbytes, chunk.disk_bytes)


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
    _init_worker(*init_args)  # forked workers inherit the tokenizer and the encoder
    if workers == 1:
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


# ----------------------------------------------------------------------------- output

class _Output:
    """Writes results in order to one dataset or to shards, all under temporary names.

    ``shard_bytes`` > 0 starts a new shard once a shard's ``.bin`` reaches that size (at a
    document boundary); ``by_file`` gives each input file with documents its own shard.
    Neither: one dataset at ``prefix``. :meth:`publish` renames everything into place.
    """

    def __init__(self, prefix: str, dtype: np.dtype, shard_bytes: int, by_file: bool) -> None:
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self.shard_bytes, self.by_file = shard_bytes, by_file
        self.sharded = shard_bytes > 0 or by_file
        self.done: list[tuple[str, DatasetWriter]] = []   # (final prefix, finished writer)
        self.current: DatasetWriter | None = None
        self.current_name = ""
        self.current_file = -1
        self.inputs_of: dict[str, list[int]] = {}  # shard -> indices of the input files in it
        self.tag = f".tmp{os.getpid()}"

    def _open(self) -> DatasetWriter:
        """Start the next shard (or the only dataset)."""
        name = f"{self.prefix}_{len(self.done):05d}" if self.sharded else self.prefix
        with writing(f"output {name}"):
            self.current = DatasetWriter(name + ".bin" + self.tag, self.dtype)
        self.current_name = name
        return self.current

    def _close(self) -> None:
        """Finish the current shard's index."""
        w, name, self.current = self.current, self.current_name, None
        assert w is not None, "_Output._close with no shard open"
        with writing(f"output {name}"):
            w.finish(name + ".idx" + self.tag)
        self.done.append((name, w))

    def add(self, file_idx: int, tokens: bytes, lengths: np.ndarray) -> None:
        """Append documents of input ``file_idx`` (cutting shards where they fill up)."""
        if self.by_file and self.current is not None and file_idx != self.current_file:
            self._close()
        self.current_file = file_idx
        view = memoryview(tokens)  # slices below without copies
        while lengths.size:
            w = self.current or self._open()
            seen = self.inputs_of.setdefault(self.current_name, [])
            if not seen or seen[-1] != file_idx:
                seen.append(file_idx)
            if self.shard_bytes <= 0:
                take = lengths.size
            else:  # documents until this shard reaches shard_bytes (at least one)
                ends = np.cumsum(lengths, dtype=np.int64) * self.dtype.itemsize
                take = int(np.searchsorted(ends, self.shard_bytes - w.nbytes, side="left")) + 1
                take = min(take, lengths.size)
            nbytes = int(lengths[:take].sum(dtype=np.int64)) * self.dtype.itemsize
            with writing(f"output {self.current_name}"):
                w.add(view[:nbytes], lengths[:take])
            view, lengths = view[nbytes:], lengths[take:]
            if self.shard_bytes > 0 and w.nbytes >= self.shard_bytes:
                self._close()

    def finish(self) -> list[dict]:
        """Close the last shard; prefix, documents, tokens and input file indices of every one written."""
        if self.current is not None:
            self._close()
        return [{"prefix": name, "documents": w.documents, "tokens": w.tokens, "files": self.inputs_of[name]}
                for name, w in self.done]

    def temp_files(self) -> list[str]:
        """Every temporary file this output may have created."""
        names = [name for name, _ in self.done] + ([self.current_name] if self.current else [])
        return [n + ext + self.tag for n in names for ext in (".bin", ".idx")]

    def publish(self) -> None:
        """Rename every finished shard into place (``.bin`` then ``.idx``)."""
        for name, _ in self.done:
            os.replace(name + ".bin" + self.tag, name + ".bin")
            os.replace(name + ".idx" + self.tag, name + ".idx")

    def abort(self) -> None:
        """Close and remove every temporary file."""
        if self.current is not None:
            self.current.abort()
        _remove_files(*self.temp_files())


# ----------------------------------------------------------------------------- driver

def _check_inputs(inputs: list[str], json_key: str, text_unit: str, workers: int, encoder: str,
                  shard_mb: float) -> None:
    check_inputs(inputs)
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text unit {text_unit!r}: allowed: {', '.join(TEXT_UNITS)}")
    if encoder not in ENCODERS:
        raise DataError(f"encoder {encoder!r}: allowed: {', '.join(ENCODERS)}")
    if workers < 1:
        raise DataError(f"workers {workers}: must be >= 1")
    if not math.isfinite(shard_mb) or shard_mb < 0:
        raise DataError(f"shard size {shard_mb} MB: must be a finite number >= 0 (0: no size limit)")
    if not json_key:
        raise DataError("json key must not be empty")


def preprocess(inputs: list[str], output_prefix: str, tokenizer_path: str, *, workers: int = 1,
               json_key: str = "text", text_unit: str = "paragraph", strict: bool = False,
               show_progress: bool = False, chunk_bytes: int = 1 << 18, shard_mb: float = 0,
               shard_by_file: bool = False, encoder: str = "auto", allow_empty: bool = False,
               units: tuple[int, int] | None = None) -> Summary:
    """Tokenize ``inputs`` into ``output_prefix`` (``.bin/.idx`` or shards, and ``.summary.json``).

    ``inputs`` may hold globs. Outputs are written to temporary names and renamed at the
    end (the summary last), so a failed run leaves no partial dataset behind (nor the
    directories it created). An unwritable output location, or inputs without a single
    valid document, raise :class:`DataError` -- unless ``allow_empty``, where such a run
    writes only its summary (used for per-file shards that are merged later). ``units`` =
    [first, end) reads only those row groups / data files of a single Parquet or ``datasets``
    input (a part of it for one plan task; rows keep their numbers in the whole input).
    """
    out = check_output_prefix(output_prefix)
    inputs = expand_inputs(inputs, out)
    _check_inputs(inputs, json_key, text_unit, workers, encoder, shard_mb)
    refuse_outputs_as_inputs(inputs, out)
    if not chunk_bytes >= 1:
        raise DataError(f"chunk size {chunk_bytes} bytes: must be >= 1")
    if units is not None and len(inputs) != 1:
        raise DataError(f"a part (units {units[0]}..{units[1] - 1}) needs exactly one input, not {len(inputs)}")
    t_start = time.time()
    tok = load_tokenizer(tokenizer_path)
    summ = Summary(output_prefix=out, input_files=[os.path.abspath(p) for p in inputs],
                   workers=workers, tokenizer=tok.path, tokenizer_fingerprint=tok.fingerprint,
                   vocab_size=tok.vocab_size, eod_id=tok.eod_id, dtype=optimal_dtype(tok.vocab_size).name)
    created = missing_dirs(os.path.dirname(out))
    try:
        ensure_writable_dir(os.path.dirname(out), f"output {out}")
        for stale in remove_stale_temps(out):
            log.info("removed %s, left by an earlier run that was killed", stale)
        output = _Output(out, optimal_dtype(tok.vocab_size), int(shard_mb * 1e6), shard_by_file)
        _write_all(inputs, output, summ, tok, workers=workers, json_key=json_key, text_unit=text_unit,
                   strict=strict, show_progress=show_progress, chunk_bytes=chunk_bytes,
                   encoder=encoder, allow_empty=allow_empty, units=units)
        summ.seconds = time.time() - t_start
        summ.mb_per_s = summ.input_bytes / 1e6 / max(summ.seconds, 1e-9)
        summ.docs_per_s = summ.documents / max(summ.seconds, 1e-9)
        _publish(out, output, summ)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return summ


def _write_all(inputs: list[str], output: _Output, summ: Summary, tok: Tokenizer, *, workers: int, json_key: str,
               text_unit: str, strict: bool, show_progress: bool, chunk_bytes: int, encoder: str,
               allow_empty: bool, units: tuple[int, int] | None = None) -> None:
    """Tokenize all inputs into ``output`` (temporary files, removed again if anything fails)."""
    summ.files = [{"path": p, "documents": 0, "tokens": 0, "skipped": 0, "disk_bytes": 0, "text_bytes": 0}
                  for p in summ.input_files]
    bar = _Progress(inputs, show_progress)
    try:
        chunks = (c for i, p in enumerate(inputs)
                  for c in iter_chunks(p, i, detect_format(p), text_unit, chunk_bytes, json_key, units))
        st = os.stat(summ.tokenizer)  # part of the key: a worker reuses a tokenizer only if unchanged
        init = (summ.tokenizer, json_key, text_unit, summ.dtype, encoder, st.st_size, st.st_mtime_ns)
        if _W.get("args") != init:
            _prepare_worker(tok, init)  # the tokenizer loaded above: no second load here
        for res in _results(chunks, workers, init, chunk_bytes):
            _record(res, summ, inputs, strict)
            output.add(res.file_idx, res.tokens, res.lengths)
            bar.update(res.disk_bytes, summ.documents)
        summ.encoder = _W["enc"].description
        if not allow_empty:
            _require_documents(inputs, summ)
        shards = output.finish()
        summ.shards = shards if output.sharded else []
    except BaseException:
        output.abort()
        raise
    finally:
        bar.close()


def _record(res: ChunkResult, summ: Summary, inputs: list[str], strict: bool) -> None:
    """Count one chunk's documents, tokens and skips (overall and for its file)."""
    path = inputs[res.file_idx]
    if res.skips and strict:
        line, reason = res.skips[0]
        raise DataError(f"{path}:{line}: {reason} (--strict stops at the first malformed document)")
    for line, reason in res.skips:
        summ.record_skip(path, line, reason)
    ntok = int(res.lengths.sum(dtype=np.int64))
    f = summ.files[res.file_idx]
    f["documents"] += int(res.lengths.size)
    f["tokens"] += ntok
    f["skipped"] += len(res.skips)
    f["disk_bytes"] += res.disk_bytes
    f["text_bytes"] += res.text_bytes
    summ.documents += int(res.lengths.size)
    summ.tokens += ntok
    summ.input_bytes += res.text_bytes


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


def _publish(out: str, output: _Output, summ: Summary) -> None:
    """Rename the datasets into place, then the summary (written to a temp name first)."""
    tmp_summary = f"{out}.summary.json.tmp{os.getpid()}"
    try:
        with writing(f"output {out}"):
            _dump_summary(summ, tmp_summary)
            output.publish()
            os.replace(tmp_summary, out + ".summary.json")
    except BaseException:
        _remove_files(*output.temp_files(), tmp_summary)
        raise


class _Progress:
    """A tqdm bar over on-disk input bytes showing MB/s, with documents/s as its postfix."""

    def __init__(self, inputs: list[str], show: bool) -> None:
        self.bar = None
        if not show:
            return
        from tqdm import tqdm

        total = sum(input_size(p) for p in inputs)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)
        self.t0 = self.last = time.time()
        self.documents = 0

    def update(self, nbytes: int, documents: int) -> None:
        """Advance by ``nbytes`` of input; refresh the documents/s figure twice a second."""
        if self.bar is None:
            return
        self.bar.update(nbytes)
        self.documents = documents
        now = time.time()
        if now - self.last >= 0.5:
            self._postfix(now)
            self.last = now

    def _postfix(self, now: float) -> None:
        assert self.bar is not None, "_Progress._postfix without a bar"
        rate = self.documents / max(now - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} docs/s", refresh=False)

    def close(self) -> None:
        """Final figures, then the bar's last line."""
        if self.bar is not None:
            self._postfix(time.time())
            self.bar.close()


def _dump_summary(summ: Summary, path: str) -> None:
    """Write the summary JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(summ), f, indent=1)
