"""Per-token loss masks stored beside a Megatron dataset, and the dataset that reads them.

A dataset ``PREFIX.{bin,idx}`` may have a sibling ``PREFIX.lossmask.{bin,idx}``: an
indexed dataset of ``uint8`` values with exactly the same document lengths, 1 where the
model is trained to predict that token and 0 where it is not (e.g. the question of a
general instruction pair when only responses are trained). :class:`MaskedGPTDataset`
reads the mask of each sample through the same document, sample and shuffle indices as
its tokens, and multiplies the loss mask of the label positions (the mask of token
``t + 1`` decides the loss of the prediction made at position ``t``); a prefix without a
mask reads as its parent class. The loader builds this class only when a prefix of the
run has a mask (megatron-core blends datasets of one class), so runs without masks keep
their index caches.

:func:`write_dataset` writes tokens (and optionally masks) with megatron-core's own
builder, under temporary names renamed into place at the end (masks first, the token
index last), so a killed write leaves no dataset that looks complete.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from polytron.data.errors import DataError
from polytron.data.index_cache import CheckedGPTDataset

MASK_SUFFIX = ".lossmask"


def mask_prefix(prefix: str) -> str:
    """The prefix of the loss-mask dataset beside ``prefix``."""
    return prefix + MASK_SUFFIX


def has_loss_mask(prefix: Optional[str]) -> bool:
    """True when ``PREFIX.lossmask.bin`` and ``.idx`` both exist."""
    if not prefix:
        return False
    return all(os.path.exists(mask_prefix(prefix) + ext) for ext in (".bin", ".idx"))


def remove_loss_mask(prefix: str) -> None:
    """Delete a loss mask left beside ``prefix`` by an earlier build (it would mask the new data)."""
    for ext in (".bin", ".idx"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(mask_prefix(prefix) + ext)


def token_dtype(vocab_size: int) -> type:
    """megatron-core's choice of token dtype for a vocabulary (uint16 below 65500)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class MaskedGPTDataset(CheckedGPTDataset):
    """A GPTDataset whose ``loss_mask`` also carries the per-token mask of ``PREFIX.lossmask``."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        from polytron.data._megatron import IndexedDataset

        self.masks = IndexedDataset(mask_prefix(dataset_path), mmap=True) if has_loss_mask(dataset_path) else None
        if self.masks is None:
            return
        lengths, mask_lengths = indexed_dataset.sequence_lengths, self.masks.sequence_lengths
        if len(lengths) != len(mask_lengths) or not np.array_equal(lengths, mask_lengths):
            raise DataError(f"loss mask {mask_prefix(dataset_path)}: its document lengths differ from "
                            f"dataset {dataset_path}; rebuild both with tools/build_mixture.py")

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if idx is None or self.masks is None:             # megatron's padding sample: no loss anyway
            return out
        keep = torch.from_numpy(self.mask_of(idx)[1:].astype(np.float32))     # (T,) label positions
        out["loss_mask"] = out["loss_mask"] * keep.to(out["loss_mask"].dtype)
        return out

    def mask_of(self, idx: int) -> np.ndarray:
        """The mask values (T + 1,) of sample ``idx``, aligned with its token ids (padding: 0).

        Mirrors ``GPTDataset._query_document_sample_shuffle_indices`` on the mask dataset.
        """
        i = self.shuffle_index[idx]
        beg, beg_off = self.sample_index[i]
        end, end_off = self.sample_index[i + 1]
        extra = int(self.config.add_extra_token_to_sequence)
        parts = []
        for d in range(beg, end + 1):
            offset = int(beg_off) if d == beg else 0
            length = int(end_off) - offset + extra if d == end else None
            parts.append(self.masks.get(self.document_index[d], offset=offset, length=length))
        values = np.concatenate(parts).astype(np.uint8)
        want = self.config.sequence_length + extra
        return np.pad(values, (0, max(0, want - len(values))))[:want]


def write_dataset(prefix: str, docs: Iterable[tuple[list[int], Optional[list[int]]]], vocab_size: int,
                  with_mask: bool, empty: Callable[[], str]) -> tuple[int, int, int]:
    """Write ``PREFIX.{bin,idx}`` (and ``PREFIX.lossmask.*`` when ``with_mask``) from
    (token ids, mask values) per document; returns (documents, tokens, loss tokens). Without
    any document nothing is written and ``DataError(empty())`` is raised."""
    from polytron.data._megatron import IndexedDatasetBuilder

    tmp = f"{prefix}.tmp-{os.getpid()}"
    targets = [(tmp + MASK_SUFFIX, mask_prefix(prefix))] * with_mask + [(tmp, prefix)]
    tokens = IndexedDatasetBuilder(tmp + ".bin", dtype=token_dtype(vocab_size))
    masks = IndexedDatasetBuilder(tmp + MASK_SUFFIX + ".bin", dtype=np.uint8) if with_mask else None
    n = total = kept = 0
    try:
        for ids, mask in docs:
            tokens.add_document(ids, [len(ids)])
            mask = mask if mask is not None else [1] * len(ids)
            if len(mask) != len(ids):
                raise DataError(f"{prefix}: document {n} has {len(ids)} tokens but {len(mask)} mask values")
            if masks is not None:
                masks.add_document(mask, [len(mask)])
            n, total, kept = n + 1, total + len(ids), kept + sum(mask)
        if n == 0:
            raise DataError(empty())
        if masks is not None:
            masks.finalize(tmp + MASK_SUFFIX + ".idx")
        tokens.finalize(tmp + ".idx")
        if not with_mask:
            remove_loss_mask(prefix)              # an earlier build's mask would mask the new data
        for src, dst in targets:
            for ext in (".bin", ".idx"):
                os.replace(src + ext, dst + ext)
    finally:
        for src, _ in targets:
            for ext in (".bin", ".idx"):
                with contextlib.suppress(OSError):
                    os.remove(src + ext)
    return n, total, kept
