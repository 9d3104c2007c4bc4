"""Reading preprocessing inputs: globs and input lists, plain/.gz/.zst streams, Parquet and
Arrow/``datasets`` tables, chunks of whole documents.

The main process of ``tools/preprocess_data.py`` only moves bytes: :func:`iter_chunks`
reads a file (decompressing on the fly) and cuts it into blocks that end at a document
boundary, counting lines so that workers can report skipped documents by line number.
A Parquet or Arrow input gives blocks of its text column's UTF-8 bytes with per-document
offsets (:mod:`data.table_inputs`), numbered by row instead of line.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Protocol

import numpy as np

from polytron.data.errors import DataError
from polytron.data.files import check_input_files, is_own_output, os_reason
from polytron.data.table_inputs import (
    ARROW_SUFFIX,
    PARQUET_SUFFIXES,
    dataset_dir_kind,
    dataset_files,
    is_table_format,
    iter_arrow,
    iter_parquet,
    table_size,
)

COMPRESSED = (".gz", ".zst")


@dataclass
class Chunk:
    """Whole documents of one input file as one raw byte block (cut at a line end).

    For a table input (``parquet``/``arrow``) ``data`` holds the documents' UTF-8 text back
    to back, ``offsets`` where each starts and ``first_line`` is the first one's row number.
    """
    file_idx: int
    fmt: str                 # "jsonl", "text", "parquet" or "arrow"
    first_line: int          # 1-based line (table: row) number of the block's first document
    data: bytes
    disk_bytes: int          # on-disk (possibly compressed) bytes this chunk advanced
    offsets: np.ndarray | None = None  # table inputs: (documents + 1,) int64 into data
    nulls: np.ndarray | None = None    # table inputs: (documents,) bool, True for a null value

    @property
    def lines(self) -> list[bytes]:
        """The block's lines, newline kept (split on b"\\n" only)."""
        return io.BytesIO(self.data).readlines()


def expand_inputs(patterns: list[str], output_prefix: str = "") -> list[str]:
    """Input paths in the order given; a glob (``*``, ``?``, ``[``, ``**``) expands to its files, sorted.

    An existing path is taken as is (even with glob characters in its name); a glob that
    matches no file is a :class:`DataError`. With ``output_prefix``, a glob skips that
    run's own outputs and their temporaries (``PREFIX.bin``, ``PREFIX_00000.idx``,
    ``PREFIX.summary.json.tmp123`` ...) in the same directory. A glob also matches
    ``datasets`` directories (``save_to_disk``), never the files inside one it matched.
    """
    out: list[str] = []
    for p in patterns:
        if os.path.exists(p) or not glob.has_magic(p):
            out.append(p)
            continue
        found = sorted(f for f in glob.glob(os.path.expanduser(p), recursive=True)
                       if (os.path.isfile(f) or dataset_dir_kind(f) == "dataset")
                       and not (output_prefix and is_own_output(f, output_prefix)))
        tables = tuple(os.path.join(f, "") for f in found if os.path.isdir(f))
        files = [f for f in found if not f.startswith(tables)]
        if not files:
            raise DataError(f"input {p}: matches no file")
        out.extend(files)
    return out


def read_input_list(path: str) -> list[str]:
    """Paths (or globs) listed one per line in ``path``; blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        reason = os_reason(e) if isinstance(e, OSError) else "not UTF-8 text"
        raise DataError(f"input list {path}: cannot read ({reason})") from None
    return [ln for ln in lines if ln and not ln.startswith("#")]


def detect_format(path: str) -> str:
    """``parquet`` for ``.parquet``/``.pq``; ``arrow`` for ``.arrow`` and ``datasets`` directories;
    ``jsonl`` for ``.jsonl``/``.json``/``.ndjson`` (optionally ``.gz``/``.zst``); else ``text``."""
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(ARROW_SUFFIX) or dataset_dir_kind(path):
        return "arrow"
    name = next((path[:-len(c)] for c in COMPRESSED if path.endswith(c)), path)
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def check_inputs(paths: list[str]) -> None:
    """Every input is a file or a ``datasets`` directory (its data files listed and present)."""
    files = [p for p in paths if not dataset_dir_kind(p)]
    if files or not paths:
        check_input_files(files)
    for p in paths:
        if dataset_dir_kind(p):
            dataset_files(p)


def input_size(path: str) -> int:
    """On-disk bytes of an input (a ``datasets`` directory: its data files)."""
    return table_size(path) if is_table_format(detect_format(path)) else os.path.getsize(path)


class _ByteStream(Protocol):
    """What :class:`_CountingReader` reads from: a file, a ``GzipFile`` or a :class:`_ZstdStream`."""

    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


class _CountingReader:
    """Opens a plain, gzip or zstd file; ``disk_pos()`` is the on-disk byte position."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.raw: BinaryIO = open(path, "rb")
        try:
            self.stream: _ByteStream = self._decompressor(path)
        except BaseException:
            self.raw.close()
            raise

    def _decompressor(self, path: str) -> _ByteStream:
        """The raw file, or a decompressing stream over it."""
        if path.endswith(".gz"):
            return gzip.GzipFile(fileobj=self.raw)
        if path.endswith(".zst"):
            return _ZstdStream(self.raw, path)
        return self.raw

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes (b"" at the end); :class:`DataError` for corrupt data."""
        try:
            return self.stream.read(n)
        except DataError:
            raise
        except Exception as e:  # gzip: OSError/EOFError/zlib.error; zstd: ZstdError
            raise DataError(f"input {self.path}: cannot read (corrupt or truncated compressed file?): "
                            f"{type(e).__name__}: {e}") from None

    def disk_pos(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()


class _ZstdStream:
    """Decompresses a .zst file of one or more frames; a frame cut short is an error, not an end."""

    def __init__(self, raw: BinaryIO, path: str) -> None:
        try:
            import zstandard
        except ImportError:
            raise DataError(f"input {path}: reading .zst files needs the zstandard package "
                            "(pip install zstandard)") from None
        self.raw, self.zstd = raw, zstandard
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.in_frame = False  # compressed bytes of an unfinished frame were fed
        self.out = b""         # decompressed, not yet read

    def _feed(self, data: bytes) -> None:
        """Decompress ``data``, starting a new frame after each finished one."""
        while data:
            if self.frame.eof:
                self.frame = self.zstd.ZstdDecompressor().decompressobj()
            self.out += self.frame.decompress(data)
            self.in_frame = not self.frame.eof
            data = self.frame.unused_data if self.frame.eof else b""

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes; b"" only at the end of the last complete frame."""
        while len(self.out) < n:
            data = self.raw.read(1 << 20)
            if not data:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                break
            self._feed(data)
        block, self.out = self.out[:n], self.out[n:]
        return block

    def close(self) -> None:
        self.out = b""


def _cut(buf: bytes, fmt: str, text_unit: str) -> int:
    """Length of the longest prefix of ``buf`` made of whole documents (0: none yet)."""
    if fmt == "text" and text_unit == "file":
        return 0
    if fmt == "text" and text_unit == "paragraph":  # after a blank line
        a, b = buf.rfind(b"\n\n"), buf.rfind(b"\n\r\n")
        return max(a + 2 if a >= 0 else 0, b + 3 if b >= 0 else 0)
    return buf.rfind(b"\n") + 1


def iter_chunks(path: str, file_idx: int, fmt: str, text_unit: str, chunk_bytes: int = 1 << 20,
                json_key: str = "text", units: tuple[int, int] | None = None) -> Iterator[Chunk]:
    """Cut one input file into byte blocks of whole documents, about ``chunk_bytes`` each.

    The main process only moves bytes (no per-line Python objects); parsing happens in
    the workers. Table inputs give column ``json_key``; ``units`` = [first, end) limits
    them to those row groups (Parquet) or data files (``datasets`` directory).
    """
    if units is not None and not is_table_format(fmt):
        raise DataError(f"input {path}: only Parquet files and datasets directories can be read in parts")
    if is_table_format(fmt):
        pieces = iter_parquet if fmt == "parquet" else iter_arrow
        for p in pieces(path, json_key, chunk_bytes, units):
            yield Chunk(file_idx, fmt, p.first_row, p.data, p.disk_bytes, p.offsets, p.nulls)
        return
    try:
        reader = _CountingReader(path)
    except OSError as e:
        raise DataError(f"input {path}: cannot read ({os_reason(e)})") from None
    try:
        line_no, last_pos = 1, 0
        parts: list[bytes] = []  # bytes read but not yet handed out (no boundary in them)
        while True:
            data = reader.read(chunk_bytes)
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
