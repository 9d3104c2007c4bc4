"""Data is validated against the tokenizer and model before training, with one clear line."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from polytron.data import DataError, build_data
from polytron.data.config import DataConfig
from polytron.data.validate import check_dataset


def _copy(prefix: str, dst: str) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, dst + ext)
    return dst


def _build(corpus, tmp_path, paths, tokenizer=None, model_vocab=512, builtin=False):
    cfg = DataConfig(paths=paths, tokenizer=corpus.tokenizer if tokenizer is None else tokenizer,
                     cache_dir=str(tmp_path / "cache"), seq_len=32, split="90,5,5", builtin_corpus=builtin)
    return build_data(cfg, model_vocab_size=model_vocab, seed=0, global_batch_size=4, micro_batch_size=2,
                      dp_rank=0, dp_size=1, train_iterations=5, eval_iterations=1, eval_interval=5)


def test_missing_idx_and_bin(corpus, tmp_path):
    p = _copy(corpus.a, str(tmp_path / "d"))
    os.remove(p + ".bin")
    with pytest.raises(DataError, match=r"d\.bin: file is missing"):
        _build(corpus, tmp_path, [p])
    os.remove(p + ".idx")
    with pytest.raises(DataError, match=r"d\.idx: file is missing"):
        _build(corpus, tmp_path, [p])


def test_truncated_bin(corpus, tmp_path):
    p = _copy(corpus.a, str(tmp_path / "d"))
    with open(p + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(p + ".bin") - 10)
    with pytest.raises(DataError, match=r"d\.bin: truncated"):
        _build(corpus, tmp_path, [p])


def test_index_from_another_dtype(corpus, tmp_path):
    p = _copy(corpus.a, str(tmp_path / "d"))
    with open(p + ".idx", "r+b") as f:  # dtype code byte: uint16 (8) -> int32 (4)
        f.seek(17)
        assert f.read(1) == b"\x08"
        f.seek(17)
        f.write(b"\x04")
    with pytest.raises(DataError, match=r"d\.bin: .*index from another dtype"):
        _build(corpus, tmp_path, [p])
    with open(p + ".idx", "r+b") as f:  # uint8 cannot hold a 512-token vocabulary
        f.seek(17)
        f.write(b"\x01")
    with pytest.raises(DataError, match=r"d\.idx: token dtype uint8 cannot hold"):
        _build(corpus, tmp_path, [p])


def test_vocab_larger_than_model(corpus, tmp_path):
    with pytest.raises(DataError,
                       match=r"tok\.model: vocabulary of 512 tokens is larger than the model's embedding \(256\)"):
        _build(corpus, tmp_path, [corpus.a], model_vocab=256)


def test_token_ids_beyond_model_vocab(corpus, tmp_path):
    p = _copy(corpus.a, str(tmp_path / "d"))
    data = np.memmap(p + ".bin", dtype=np.uint16, mode="r+")
    data[3] = 600
    data.flush()
    del data
    with pytest.raises(DataError, match=r"d\.bin: contains token id 600"):
        check_dataset(p, 512, 512)


def test_missing_paths_and_tokenizer(corpus, tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.idx: file is missing"):
        _build(corpus, tmp_path, [str(tmp_path / "nowhere")])
    with pytest.raises(DataError, match="no tokenizer given"):
        _build(corpus, tmp_path, [corpus.a], tokenizer="")
    with pytest.raises(DataError, match=r"absent\.model: no such file"):
        _build(corpus, tmp_path, [corpus.a], tokenizer=str(tmp_path / "absent.model"))
    with pytest.raises(DataError, match="no training data"):
        _build(corpus, tmp_path, [])


def test_split_leaving_no_documents(corpus, tmp_path):
    cfg = DataConfig(paths=[corpus.a], tokenizer=corpus.tokenizer, cache_dir=str(tmp_path), split="998,1,1")
    with pytest.raises(DataError, match="valid split"):
        build_data(cfg, model_vocab_size=512, seed=0, global_batch_size=2, micro_batch_size=1,
                   dp_rank=0, dp_size=1, train_iterations=1, eval_iterations=1, eval_interval=1)
