"""Checks of Megatron ``.bin/.idx`` datasets against the tokenizer and model, before training.

Megatron's own reader asserts or crashes deep inside ``numpy.frombuffer`` on a bad file;
these checks turn every such case into one :class:`DataError` line naming the file.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass

import numpy as np

from polytron.data.errors import DataError

log = logging.getLogger(__name__)

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron-core DType codes -> numpy dtypes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
           6: np.float64, 7: np.float32, 8: np.uint16}
_SCAN_LIMIT_BYTES = 256 << 20  # scan token ids of .bin files up to this size


@dataclass(frozen=True)
class IndexInfo:
    """What an ``.idx`` header and arrays say about a dataset."""
    prefix: str
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int


def read_index(prefix: str) -> IndexInfo:
    """Parse and sanity-check ``PREFIX.idx`` (header, dtype, size)."""
    idx = prefix + ".idx"
    if not os.path.isfile(idx):
        raise DataError(f"dataset index {idx}: file is missing (expected PREFIX.idx next to PREFIX.bin)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != _MAGIC:
            raise DataError(f"dataset index {idx}: not a Megatron indexed-dataset index (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise DataError(f"dataset index {idx}: unsupported index version {version}")
        if code not in _DTYPES:
            raise DataError(f"dataset index {idx}: unknown token dtype code {code}")
        dtype = np.dtype(_DTYPES[code])
        expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        if size < expected:
            raise DataError(f"dataset index {idx}: truncated ({size} bytes, header implies {expected})")
        lengths = np.frombuffer(f.read(n_seq * 4), dtype=np.int32)
    return IndexInfo(prefix, dtype, int(n_seq), int(n_doc) - 1, int(lengths.sum(dtype=np.int64)))


def _read_summary(prefix: str) -> dict | None:
    """``PREFIX.summary.json`` as a dict; None when absent, unreadable or not an object."""
    try:
        with open(prefix + ".summary.json", encoding="utf-8") as f:
            summ = json.load(f)
    except (OSError, ValueError):
        return None
    return summ if isinstance(summ, dict) else None


def dataset_fingerprint(prefix: str) -> str | None:
    """The tokenizer fingerprint (``sha256:<16 hex>``) ``PREFIX.summary.json`` records, or
    None for a dataset without a summary or from before fingerprints were recorded."""
    summ = _read_summary(prefix)
    fp = summ.get("tokenizer_fingerprint") if summ else None
    return fp if isinstance(fp, str) and fp else None


def check_dataset_tokenizer(prefix: str, fingerprint: str, tokenizer_path: str,
                            allow_mismatch: bool = False) -> None:
    """Refuse (:class:`DataError`) a dataset whose summary records another tokenizer than
    ``fingerprint`` (the run's); datasets that record none pass. ``allow_mismatch`` (the
    ``data.allow_tokenizer_mismatch`` override) logs a warning instead."""
    recorded = dataset_fingerprint(prefix)
    if not recorded or not fingerprint or recorded == fingerprint:
        return
    what = (f"dataset {prefix}: tokenized with tokenizer {recorded} ({prefix}.summary.json), but the "
            f"run's tokenizer {tokenizer_path} is {fingerprint}")
    if allow_mismatch:
        log.warning("%s; training anyway (data.allow_tokenizer_mismatch=true)", what)
        return
    raise DataError(f"{what}; retokenize the data with the run's tokenizer, or set "
                    f"data.allow_tokenizer_mismatch=true if this is deliberate")


def check_dataset(prefix: str, tokenizer_vocab: int, model_vocab: int) -> IndexInfo:
    """Validate one dataset prefix; return its index info or raise :class:`DataError`."""
    info = read_index(prefix)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    if not np.issubdtype(info.dtype, np.integer):
        raise DataError(f"dataset index {idx}: token dtype {info.dtype} is not an integer type")
    if tokenizer_vocab - 1 > np.iinfo(info.dtype).max:
        raise DataError(f"dataset index {idx}: token dtype {info.dtype} cannot hold ids of the "
                        f"tokenizer's {tokenizer_vocab}-token vocabulary (index from another dtype?)")
    if not os.path.isfile(bin_):
        raise DataError(f"dataset data {bin_}: file is missing (its index {idx} exists)")
    have, want = os.path.getsize(bin_), info.tokens * info.dtype.itemsize
    if have != want:
        bits = 8 * info.dtype.itemsize * have / want if want else 0
        if bits in (8, 16, 32, 64):
            raise DataError(f"dataset data {bin_}: {have} bytes fit {int(bits)}-bit tokens but its index "
                            f"{idx} says {info.dtype} ({want} bytes): index from another dtype")
        what = "truncated" if have < want else "longer than its index says"
        raise DataError(f"dataset data {bin_}: {what}: {have} bytes, its index {idx} says {want} "
                        f"({info.tokens} tokens of {info.dtype})")
    if info.sequences == 0 or info.tokens == 0:
        raise DataError(f"dataset {prefix}: contains no documents")
    _check_token_range(prefix, info, model_vocab)
    return info


def _check_token_range(prefix: str, info: IndexInfo, model_vocab: int) -> None:
    """Token ids must fit the model's embedding (summary, and a scan of small files)."""
    summ_path = prefix + ".summary.json"
    summ = _read_summary(prefix)
    if summ is not None:
        try:
            v = int(summ.get("vocab_size", 0))
        except (ValueError, TypeError, OverflowError):
            v = 0
        if v > model_vocab:
            raise DataError(f"dataset {prefix}: tokenized with a {v}-token vocabulary "
                            f"({summ_path}) but the model's embedding has {model_vocab} rows")
    bin_ = prefix + ".bin"
    if os.path.getsize(bin_) <= _SCAN_LIMIT_BYTES:
        top = int(np.memmap(bin_, dtype=info.dtype, mode="r").max())
        if top >= model_vocab:
            raise DataError(f"dataset data {bin_}: contains token id {top} >= the model's "
                            f"vocabulary size {model_vocab}")


def check_tokenizer_fits(tokenizer_path: str, tokenizer_vocab: int, model_vocab: int) -> None:
    """The tokenizer's vocabulary must not exceed the model's embedding rows."""
    if tokenizer_vocab > model_vocab:
        raise DataError(f"tokenizer {tokenizer_path}: vocabulary of {tokenizer_vocab} tokens is larger "
                        f"than the model's embedding ({model_vocab}); raise the model's vocab_size")
