"""Column-store preprocessing inputs: Parquet files, Arrow IPC files and ``datasets`` directories.

A Parquet file is read one row group at a time, only its text column; an Arrow file (IPC
stream or file format) and a Hugging Face ``datasets`` directory written by
``save_to_disk`` (``state.json`` naming ``data-XXXXX-of-NNNNN.arrow`` stream files) one
record batch at a time. Nothing of the ``datasets`` package is needed: ``pyarrow`` reads it all.

The main process still only moves bytes: a string column becomes chunks of about
``chunk_bytes`` of UTF-8 text (the column's data buffer) plus per-document offsets, and
the workers decode and tokenize them (:func:`data.preprocess.encode_chunk`). Row numbers
(1-based, counted over the whole file or directory) stand in for line numbers. A file
that cannot be read is a one-line :class:`DataError` naming the file (and the row group).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from polytron.data.errors import DataError
from polytron.data.files import os_reason

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIX = ".arrow"
_ARROW_FILE_MAGIC = b"ARROW1"


@dataclass
class TextPiece:
    """Consecutive values of a string column: their UTF-8 bytes back to back and where each starts."""
    first_row: int            # 1-based row number of the first value
    data: bytes
    offsets: np.ndarray       # (values + 1,) int64 into ``data``
    nulls: np.ndarray | None  # (values,) bool, True for a null value; None when there is none
    disk_bytes: int           # on-disk bytes this piece advanced (for the progress bar)


def _pyarrow(path: str) -> Any:
    """The ``pyarrow`` module; :class:`DataError` naming the input when it is not installed."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401  (submodules used as pyarrow.ipc / pyarrow.parquet)
    except ImportError:
        raise DataError(f"input {path}: reading Parquet or Arrow files needs the pyarrow package "
                        "(pip install pyarrow)") from None
    return pyarrow


def is_table_format(fmt: str) -> bool:
    return fmt in ("parquet", "arrow")


def dataset_dir_kind(path: str) -> str:
    """``dataset`` for a ``save_to_disk`` directory of one dataset, ``dict`` for a DatasetDict, else ``""``."""
    if not os.path.isdir(path):
        return ""
    if os.path.isfile(os.path.join(path, "state.json")):
        return "dataset"
    return "dict" if os.path.isfile(os.path.join(path, "dataset_dict.json")) else ""


def dataset_files(path: str) -> list[str]:
    """The ``.arrow`` data files of a ``save_to_disk`` directory, in order (from its ``state.json``)."""
    if dataset_dir_kind(path) == "dict":
        splits = sorted(d for d in os.listdir(path) if dataset_dir_kind(os.path.join(path, d)) == "dataset")
        raise DataError(f"input {path}: is a datasets DatasetDict (splits: {', '.join(splits) or 'none'}); "
                        f"give one split's directory, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
    state = os.path.join(path, "state.json")
    try:
        with open(state, encoding="utf-8") as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    except OSError as e:
        raise DataError(f"input {path}: cannot read state.json ({os_reason(e)})") from None
    except (ValueError, KeyError, TypeError):
        raise DataError(f"input {path}: state.json does not list the data files "
                        "(expected a datasets save_to_disk directory)") from None
    files = [os.path.join(path, n) for n in names]
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"input {path}: data file {p} named in state.json: no such file")
    return files


def table_units(path: str) -> list[int]:
    """On-disk bytes of each unit a table input can be split into for separate tasks: the row
    groups of a Parquet file, the data files of a ``datasets`` directory; ``[]`` otherwise."""
    if os.path.isdir(path):
        return [os.path.getsize(p) for p in dataset_files(path)]
    if not path.endswith(PARQUET_SUFFIXES):
        return []
    pf = _open_parquet(_pyarrow(path), path)
    try:
        return [_group_bytes(pf.metadata.row_group(g)) for g in range(pf.num_row_groups)]
    finally:
        pf.close()


def _group_bytes(rg: Any) -> int:
    """On-disk (compressed) bytes of a Parquet row group, all columns."""
    return sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))


def table_size(path: str) -> int:
    """On-disk bytes of a table input: the file, or the data files of a ``datasets`` directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(p) for p in dataset_files(path))
    return os.path.getsize(path)


def _reason(e: BaseException) -> str:
    """An exception as one line (pyarrow's messages may span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _missing_column(path: str, key: str, names: list[str]) -> DataError:
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    return DataError(f"input {path}: no column '{key}' (columns: {shown}); choose one with --json-key")


def _string_array(pa: Any, arr: Any, path: str, key: str) -> Any:
    """``arr`` as a (large) string array; :class:`DataError` for a column that holds no text."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr
    if hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t):
        return arr.cast(pa.large_string())
    raise DataError(f"input {path}: column '{key}' holds {t}, not text")


def _pieces(pa: Any, column: Any, first_row: int, chunk_bytes: int, disk_bytes: int) -> Iterator[TextPiece]:
    """Cut a string column (array or chunked array) into pieces of about ``chunk_bytes`` of text.

    ``disk_bytes`` goes to the first piece.
    """
    arrays = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for arr in arrays:
        n = len(arr)
        if n == 0:
            continue
        _, off_buf, data_buf = arr.buffers()
        wide = pa.types.is_large_string(arr.type)
        offsets = np.frombuffer(off_buf, np.int64 if wide else np.int32)[arr.offset:arr.offset + n + 1]
        nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
        data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
        pos = 0
        while pos < n:
            end = int(np.searchsorted(offsets, int(offsets[pos]) + chunk_bytes, side="left"))
            end = min(max(end, pos + 1), n)
            lo, hi = int(offsets[pos]), int(offsets[end])
            yield TextPiece(first_row + pos, data[lo:hi].tobytes(),
                            offsets[pos:end + 1].astype(np.int64) - lo,
                            None if nulls is None else nulls[pos:end].copy(), disk_bytes)
            disk_bytes = 0
            pos = end
        first_row += n
    if disk_bytes:  # no values at all: the progress still advances
        yield TextPiece(first_row, b"", np.zeros(1, np.int64), None, disk_bytes)


def _open_parquet(pa: Any, path: str) -> Any:
    """A ``ParquetFile`` (footer read); one-line :class:`DataError` when unreadable."""
    try:
        return pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise DataError(f"input {path}: cannot read ({os_reason(e)})") from None
        raise DataError(f"input {path}: not a readable Parquet file (truncated, or a corrupt footer?): "
                        f"{_reason(e)}") from None


def iter_parquet(path: str, key: str, chunk_bytes: int, units: tuple[int, int] | None = None) -> Iterator[TextPiece]:
    """Text pieces of a Parquet file's column ``key``, one row group at a time (those in
    ``units`` = [first, end) only, numbered as in the whole file)."""
    pa = _pyarrow(path)
    pf = _open_parquet(pa, path)
    try:
        names = pf.schema_arrow.names
        if key not in names:
            raise _missing_column(path, key, names)
        groups, meta = pf.num_row_groups, pf.metadata
        first, end = units or (0, groups)
        row = 1 + sum(meta.row_group(g).num_rows for g in range(first))
        for g in range(first, end):
            try:
                col = pf.read_row_group(g, columns=[key], use_threads=False).column(0)
            except (pa.ArrowException, OSError) as e:
                rows = f"rows {row}-{row + meta.row_group(g).num_rows - 1}"
                raise DataError(f"input {path}: row group {g} of {groups} ({rows}) cannot be read "
                                f"(corrupt or truncated Parquet file?): {_reason(e)}") from None
            disk = _group_bytes(meta.row_group(g))
            yield from _pieces(pa, _string_array(pa, col, path, key), row, chunk_bytes, disk)
            row += len(col)
        if end == groups:  # the footer and headers outside the row groups
            rest = os.path.getsize(path) - sum(_group_bytes(meta.row_group(g)) for g in range(groups))
            yield TextPiece(row, b"", np.zeros(1, np.int64), None, max(0, rest))
    finally:
        pf.close()


def _arrow_batches(pa: Any, path: str, key: str) -> Iterator[tuple[Any, int]]:
    """(record batch, on-disk bytes it advanced) of an Arrow IPC file, stream or file format;
    the last item is (None, bytes after the last batch). ``key``: a column it must have."""
    size = os.path.getsize(path)
    with pa.memory_map(path) as source:
        if source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            if key and key not in reader.schema.names:
                raise _missing_column(path, key, reader.schema.names)
            n = reader.num_record_batches
            for i in range(n):
                yield reader.get_batch(i), size * (i + 1) // n - size * i // n
            yield None, 0 if n else size
            return
        source.seek(0)
        reader, pos = pa.ipc.open_stream(source), 0
        if key and key not in reader.schema.names:
            raise _missing_column(path, key, reader.schema.names)
        for batch in reader:
            yield batch, source.tell() - pos
            pos = source.tell()
        yield None, size - pos


def _arrow_rows(pa: Any, path: str) -> int:
    """Rows of an Arrow IPC file (batch headers only: the memory-mapped data is not read)."""
    try:
        return sum(batch.num_rows for batch, _ in _arrow_batches(pa, path, "") if batch is not None)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"input {path}: cannot read (corrupt or truncated Arrow file?): {_reason(e)}") from None


def iter_arrow(path: str, key: str, chunk_bytes: int, units: tuple[int, int] | None = None) -> Iterator[TextPiece]:
    """Text pieces of column ``key`` of an Arrow IPC file or of the data files of a ``datasets``
    directory (those in ``units`` = [first, end) only, rows numbered as in the whole directory)."""
    pa = _pyarrow(path)
    files = dataset_files(path) if os.path.isdir(path) else [path]
    first, end = units or (0, len(files))
    row = 1 + sum(_arrow_rows(pa, f) for f in files[:first])
    for f in files[first:end]:
        batches = _arrow_batches(pa, f, key)
        while True:
            try:
                batch, disk = next(batches)
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as e:
                if isinstance(e, OSError) and e.errno is not None:
                    raise DataError(f"input {f}: cannot read ({os_reason(e)})") from None
                raise DataError(f"input {f}: cannot read record batches after row {row - 1} (corrupt or "
                                f"truncated Arrow file?): {_reason(e)}") from None
            if batch is None:
                yield TextPiece(row, b"", np.zeros(1, np.int64), None, disk)
                continue
            column = batch.column(batch.schema.get_field_index(key))
            yield from _pieces(pa, _string_array(pa, column, f, key), row, chunk_bytes, disk)
            row += batch.num_rows
