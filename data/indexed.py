"""Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``) written and merged with numpy only.

The format is megatron-core's ``IndexedDataset`` (document level, no modes). Writing it
needs neither torch nor megatron-core, so the preprocessing tools start in well under a
second; training still reads the files through megatron-core (and ``data.validate``).

``PREFIX.bin``: the token ids of all documents back to back, in ``dtype``.
``PREFIX.idx`` (little endian)::

    magic b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code
    u64 S (sequences) | u64 D (len(document_indices) = documents + 1)
    int32[S] sequence lengths (tokens) | int64[S] byte offsets into .bin | int64[D] document indices

Here one sequence is one document, so ``document_indices`` is ``0, 1, ..., S``: the same
bytes megatron-core's ``IndexedDatasetBuilder`` writes for one ``add_document`` per document.
"""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from polytron.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
#: megatron-core ``DType`` codes.
DTYPE_CODES: dict[np.dtype, int] = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
               np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
               np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary: ``uint16`` below 65,500 tokens, else ``int32`` (megatron-core's rule)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def write_index(path: str, dtype: np.dtype, lengths: np.ndarray) -> None:
    """Write ``path`` (an ``.idx``) for documents of ``lengths`` tokens each (one sequence per document)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    n = int(lengths.size)
    pointers = np.zeros(n, dtype=np.int64)  # (n,) byte offset of each document in .bin
    if n > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, DTYPE_CODES[np.dtype(dtype)], n, n + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())


@dataclass
class IndexArrays:
    """An ``.idx`` file read back: dtype, per-sequence lengths and document boundaries."""
    path: str
    dtype: np.dtype
    lengths: np.ndarray           # (S,) int32 tokens per sequence
    document_indices: np.ndarray  # (D,) int64, starts at 0, ends at S

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def read_index(path: str) -> IndexArrays:
    """Parse an ``.idx`` file (numpy only); :class:`DataError` naming it when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise DataError(f"dataset index {path}: not a Megatron index (file too short)")
            magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
            if magic != MAGIC or version != VERSION or code not in _CODE_DTYPES:
                raise DataError(f"dataset index {path}: not a Megatron index (bad header)")
            lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
            f.seek(8 * n_seq, os.SEEK_CUR)  # byte offsets: recomputed from the lengths when merging
            docs = np.frombuffer(f.read(8 * n_doc), dtype=np.int64)
    except OSError as e:
        raise DataError(f"dataset index {path}: cannot read ({e.strerror or type(e).__name__})") from None
    if lengths.size != n_seq or docs.size != n_doc:
        raise DataError(f"dataset index {path}: truncated")
    return IndexArrays(path, _CODE_DTYPES[code], lengths, docs)


class DatasetWriter:
    """Appends whole documents to a ``.bin`` file; :meth:`finish` writes the ``.idx``.

    One :meth:`add` call per batch of documents: the tokens arrive as one byte block
    already in the output dtype, so there is no per-document Python work here.
    """

    def __init__(self, bin_path: str, dtype: np.dtype) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        self._file: BinaryIO | None = open(bin_path, "wb")
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        """Bytes written to ``.bin`` so far."""
        return self.tokens * self.dtype.itemsize

    def add(self, tokens: bytes | memoryview, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` are their ids back to back, ``lengths`` (n,) their sizes."""
        assert self._file is not None, "DatasetWriter.add after finish or abort"
        self._file.write(tokens)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += len(tokens) // self.dtype.itemsize

    def finish(self, idx_path: str) -> None:
        """Close ``.bin`` and write the index for everything added."""
        assert self._file is not None, "DatasetWriter.finish after finish or abort"
        self._file.close()
        self._file = None
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        write_index(idx_path, self.dtype, lengths)

    def abort(self) -> None:
        """Close ``.bin`` without writing an index (the caller removes the files)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_bytes(src: str, dst: BinaryIO) -> None:
    """Append file ``src`` to ``dst``, an unbuffered file open for writing (in-kernel copy where possible)."""
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(f.fileno(), dst.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except (AttributeError, OSError):
            pass  # no copy_file_range here (or across these file systems): plain copy below
        if copied < size:
            f.seek(copied)
            shutil.copyfileobj(f, dst, 1 << 24)


def merge(prefixes: list[str], bin_path: str, idx_path: str) -> IndexArrays:
    """Concatenate datasets ``prefixes`` in order into ``bin_path`` / ``idx_path``.

    All must share one dtype; each ``.bin`` must be exactly as long as its index says.
    The result is the dataset a single pass over the concatenated input would write.
    """
    if not prefixes:
        raise DataError("merge: no datasets given")
    indexes = [read_index(p + ".idx") for p in prefixes]
    dtype = indexes[0].dtype
    for p, ix in zip(prefixes, indexes):
        if ix.dtype != dtype:
            raise DataError(f"dataset {p}: token dtype {ix.dtype} differs from {dtype} of {prefixes[0]}; "
                            f"datasets tokenized with different vocabularies cannot be merged")
        if ix.document_indices.size != ix.lengths.size + 1:
            raise DataError(f"dataset {p}: sentence-level index (documents of several sequences) is not "
                            f"supported by merge")
        have, want = _size(p + ".bin"), ix.tokens * dtype.itemsize
        if have != want:
            raise DataError(f"dataset data {p}.bin: {have} bytes, its index says {want}")
    with open(bin_path, "wb", buffering=0) as out:  # unbuffered: copy_file_range moves the offset
        for p in prefixes:
            copy_bytes(p + ".bin", out)
    lengths = np.concatenate([ix.lengths for ix in indexes])
    write_index(idx_path, dtype, lengths)
    return IndexArrays(idx_path, dtype, lengths, np.arange(lengths.size + 1, dtype=np.int64))


def _size(path: str) -> int:
    """Size of ``path``; :class:`DataError` when it is missing."""
    try:
        return os.path.getsize(path)
    except OSError:
        raise DataError(f"dataset data {path}: file is missing") from None
