"""The megatron-core index cache: verified before use, rebuilt when damaged, never unpickled.

Real megatron-core GPTDatasets on the real test corpus; the damage is done to the real
cache files they wrote.
"""
from __future__ import annotations

import glob
import logging
import os
import pickle

import numpy as np
import pytest
import torch

from polytron.data import DataError, build_data
from polytron.data.config import DataConfig
from polytron.data.index_cache import CacheFiles, write_manifest

SAMPLES = 12


def _build(corpus, cache_dir, split="90,5,5", eval_interval=5):
    cfg = DataConfig(paths=[corpus.a], tokenizer=corpus.tokenizer, cache_dir=str(cache_dir), seq_len=32,
                     split=split, prefetch=0)
    return build_data(cfg, model_vocab_size=512, seed=3, global_batch_size=4, micro_batch_size=2,
                      dp_rank=0, dp_size=1, train_iterations=5, eval_iterations=1,
                      eval_interval=eval_interval)


def _samples(bundle) -> list[torch.Tensor]:
    """The first tokens of the train and validation datasets."""
    return [bundle.train.dataset[i]["tokens"] for i in range(SAMPLES)] + \
           [bundle.valid[i]["tokens"] for i in range(min(SAMPLES, len(bundle.valid)))]


def _cache_file(cache_dir, split: str, member: str) -> str:
    (path,) = glob.glob(os.path.join(str(cache_dir), "megatron-index", f"*-{split}-{member}"))
    return path


def _files_of(path: str) -> CacheFiles:
    """The CacheFiles a member path belongs to."""
    directory, name = os.path.split(path)
    base = name[:name.index("-train-") + len("-train")]
    return CacheFiles(directory, base)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_cache_written_with_manifest_and_reused_untouched(corpus, tmp_path):
    ref = _samples(_build(corpus, tmp_path))
    index_dir = tmp_path / "megatron-index"
    names = os.listdir(index_dir)
    assert not [n for n in names if n.startswith(".build-")]  # no staging directory left behind
    for split in ("train", "valid", "test"):
        assert len([n for n in names if f"-{split}-" in n]) == 5  # description, 3 arrays, manifest
    stamps = {n: os.stat(index_dir / n).st_mtime_ns for n in names}
    again = _build(corpus, tmp_path)
    assert _same(ref, _samples(again))
    assert {n: os.stat(index_dir / n).st_mtime_ns for n in os.listdir(index_dir)} == stamps  # a hit
    assert isinstance(again.train.dataset.shuffle_index, np.memmap)  # read from the cache


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest"])
def test_damaged_cache_is_rebuilt_with_identical_samples(corpus, tmp_path, caplog, damage):
    ref = _samples(_build(corpus, tmp_path))
    path = _cache_file(tmp_path, "train", "sample_index.npy")
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "flip":
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\xff\xff\xff")
    else:  # e.g. a build killed before its manifest, or a cache from an older version
        os.remove(_cache_file(tmp_path, "train", "manifest.json"))
    with caplog.at_level(logging.WARNING, logger="polytron.data.index_cache"):
        rebuilt = _build(corpus, tmp_path)
    assert _same(ref, _samples(rebuilt))
    assert "rebuilding" in caplog.text and "-train-" in caplog.text
    with caplog.at_level(logging.WARNING, logger="polytron.data.index_cache"):
        caplog.clear()
        _build(corpus, tmp_path)
    assert "rebuilding" not in caplog.text  # the rebuilt cache verifies


class _Payload:
    """Unpickling this creates the marker file: stands for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path: str, marker: str, kind: str) -> None:
    """Write a pickle payload as ``path``: a raw pickle, or an object-dtype .npy."""
    if kind == "raw-pickle":
        with open(path, "wb") as f:
            pickle.dump(_Payload(marker), f)
    else:
        arr = np.empty(1, dtype=object)
        arr[0] = _Payload(marker)
        with open(path, "wb") as f:
            np.save(f, arr, allow_pickle=True)


@pytest.mark.parametrize("kind", ["raw-pickle", "object-npy"])
def test_pickle_planted_in_cache_never_runs(corpus, tmp_path, caplog, kind):
    ref = _samples(_build(corpus, tmp_path))
    marker = str(tmp_path / "pwned")
    path = _cache_file(tmp_path, "train", "shuffle_index.npy")
    _plant(path, marker, kind)
    # the payload is live: the load megatron-core does on a cache hit runs it
    mmap = "r" if kind == "raw-pickle" else None
    f = np.load(path, allow_pickle=True, mmap_mode=mmap)
    if hasattr(f, "close"):
        f.close()
    assert os.path.exists(marker)
    os.remove(marker)
    _plant(path, marker, kind)
    write_manifest(_files_of(path))  # an attacker who can write the cache can write this too
    with caplog.at_level(logging.WARNING, logger="polytron.data.index_cache"):
        rebuilt = _build(corpus, tmp_path)
    assert not os.path.exists(marker)
    assert _same(ref, _samples(rebuilt))
    assert f"{path}: not a plain .npy array" in caplog.text


def test_unwritable_cache_dir_is_one_line(corpus, tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in ("/proc/no/such", str(tmp_path / "file" / "cache")):
        with pytest.raises(DataError) as e:
            _build(corpus, bad)
        msg = str(e.value)
        assert msg.startswith(f"data.cache_dir {bad}:") and "\n" not in msg
    assert not os.path.exists("/proc/no")


def test_eval_without_validation_split_is_an_error(corpus, tmp_path):
    with pytest.raises(DataError, match=r"data\.split='100,0,0'.*training\.eval_interval=5"):
        _build(corpus, tmp_path, split="100,0,0")
    b = _build(corpus, tmp_path, split="100,0,0", eval_interval=0)  # evaluation off: fine
    assert b.valid is None and list(b.valid_batches(2)) == []
