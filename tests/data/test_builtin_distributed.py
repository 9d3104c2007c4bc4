"""The built-in corpus built concurrently by two gloo ranks, and build_data under a process group."""
from __future__ import annotations

import os

import torch

from polytron.data import build_data
from polytron.data.builtin import cache_key
from polytron.data.config import DataConfig
from polytron.data.tokenizer import load_tokenizer
from polytron.data.validate import dataset_fingerprint
from tests.distributed.harness import run_distributed


def _cfg(cache_dir: str) -> DataConfig:
    return DataConfig(builtin_corpus=True, tokenizer_vocab_size=512, cache_dir=cache_dir, seq_len=48,
                      reset_attention_mask=True)


def _steps(cache_dir: str, rank: int, world: int, n: int = 3) -> list[list[torch.Tensor]]:
    b = build_data(_cfg(cache_dir), model_vocab_size=512, seed=7, global_batch_size=8, micro_batch_size=2,
                   dp_rank=rank, dp_size=world, train_iterations=20, eval_iterations=1, eval_interval=10)
    return [[mb["tokens"] for mb in b.train.next_step()] for _ in range(n)]


def _rank_fn(cache_dir: str) -> list[list[torch.Tensor]]:
    import torch.distributed as dist

    return _steps(cache_dir, dist.get_rank(), dist.get_world_size())


def test_builtin_corpus_two_ranks_at_once_then_reused(tmp_path):
    cache = str(tmp_path / "cache")
    per_rank = run_distributed(_rank_fn, 2, cache, timeout=300)
    built = os.path.join(cache, cache_key(512))
    assert sorted(os.listdir(built)) == ["DONE", "corpus.bin", "corpus.idx", "corpus.summary.json",
                                         "tokenizer.model", "tokenizer.vocab"]
    assert not [n for n in os.listdir(cache) if ".tmp" in n]  # no leftover partial build
    tokenizer = load_tokenizer(os.path.join(built, "tokenizer.model"))
    assert dataset_fingerprint(os.path.join(built, "corpus")) == tokenizer.fingerprint  # kept by the relocation
    mtime = os.path.getmtime(os.path.join(built, "DONE"))
    # without a process group, in this process: cache hit, and the same global order
    ref = _steps(cache, 0, 1)
    assert os.path.getmtime(os.path.join(built, "DONE")) == mtime
    for s in range(3):
        dist_step = torch.cat([torch.cat(per_rank[r][s]) for r in range(2)])
        assert torch.equal(dist_step, torch.cat(ref[s]))
