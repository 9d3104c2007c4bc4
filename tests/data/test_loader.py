"""build_data: blending, seeds, data-parallel sharding, exact resume, packing masks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from polytron.data import DataError, build_data
from polytron.data.config import DataConfig

G, MICRO = 8, 2


def _bundle(corpus, tmp_path, *, paths=None, weights=(), seed=1234, dp_rank=0, dp_size=1,
            iters=50, prefetch=2, **kw):
    cfg = DataConfig(paths=paths or [corpus.a], weights=list(weights), tokenizer=corpus.tokenizer,
                     cache_dir=str(tmp_path), seq_len=32, prefetch=prefetch, split="90,5,5", **kw)
    cfg.validate()
    return build_data(cfg, model_vocab_size=512, seed=seed, global_batch_size=G, micro_batch_size=MICRO,
                      dp_rank=dp_rank, dp_size=dp_size, train_iterations=iters, eval_iterations=2,
                      eval_interval=10)


def _global_steps(corpus, tmp_path, dp_size, n_steps, state=None, **kw) -> list[torch.Tensor]:
    """Each step's tokens of all ranks, concatenated in rank order: (G, T) per step."""
    loaders = []
    for r in range(dp_size):
        ld = _bundle(corpus, tmp_path, dp_rank=r, dp_size=dp_size, **kw).train
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
        loaders.append(ld)
    steps = []
    for _ in range(n_steps):
        per_rank = [torch.cat([mb["tokens"] for mb in ld.next_step()]) for ld in loaders]
        steps.append(torch.cat(per_rank))
    return steps


def test_batch_shapes_labels_and_sharding(corpus, tmp_path):
    b = _bundle(corpus, tmp_path, dp_rank=1, dp_size=2)
    step = b.train.next_step()
    assert len(step) == G // (MICRO * 2)
    mb = step[0]
    assert set(mb) == {"tokens", "labels", "loss_mask"}             # loss_mask: the loss-mask channel
    assert mb["tokens"].shape == mb["labels"].shape == mb["loss_mask"].shape == (MICRO, 32)
    assert mb["tokens"].dtype == torch.int64
    assert torch.equal(mb["tokens"][:, 1:], mb["labels"][:, :-1])  # labels = tokens shifted by one
    assert b.train.consumed_samples == G and b.tokenizer.vocab_size == 512


def test_resume_mid_epoch_identical_stream_across_dp_sizes(corpus, tmp_path):
    ref = _global_steps(corpus, tmp_path, dp_size=1, n_steps=10)
    assert not torch.equal(ref[0], ref[4])  # restoring the position must matter
    assert all(torch.equal(a, b) for a, b in zip(ref, _global_steps(corpus, tmp_path, 2, 10)))
    # checkpoint after 4 steps at dp=2 (prefetch ran ahead), resume at dp=1 and dp=4
    ld = _bundle(corpus, tmp_path, dp_rank=0, dp_size=2).train
    for _ in range(4):
        ld.next_step()
    state = ld.state_dict()
    assert state["consumed_samples"] == 4 * G
    for d in (1, 4, 2):
        resumed = _global_steps(corpus, tmp_path, d, 6, state=state)
        assert all(torch.equal(a, b) for a, b in zip(ref[4:], resumed)), f"dp={d}"
    no_prefetch = _global_steps(corpus, tmp_path, 2, 10, prefetch=0)
    assert all(torch.equal(a, b) for a, b in zip(ref, no_prefetch))


def test_blend_weights_and_seed(corpus, tmp_path):
    b = _bundle(corpus, tmp_path, paths=[corpus.a, corpus.b], weights=(0.7, 0.3), iters=10_000 // G)
    ids = np.asarray(b.train.dataset.dataset_index[:10_000])
    frac = np.bincount(ids, minlength=2) / 10_000
    assert abs(frac[0] - 0.7) < 0.01 and abs(frac[1] - 0.3) < 0.01
    # the loader serves the blended dataset's samples in order
    first = b.train.next_step()[0]["tokens"][0]
    assert torch.equal(first, b.train.dataset[0]["tokens"])
    s1 = _global_steps(corpus, tmp_path, 1, 3, paths=[corpus.a, corpus.b], weights=(0.7, 0.3), seed=1)
    s1b = _global_steps(corpus, tmp_path, 1, 3, paths=[corpus.a, corpus.b], weights=(0.7, 0.3), seed=1)
    s2 = _global_steps(corpus, tmp_path, 1, 3, paths=[corpus.a, corpus.b], weights=(0.7, 0.3), seed=2)
    assert all(torch.equal(x, y) for x, y in zip(s1, s1b))
    assert not all(torch.equal(x, y) for x, y in zip(s1, s2))


def test_document_masking_position_reset_and_eod_loss(corpus, tmp_path):
    from polytron.parallel.engine import labels_of  # the loss-mask channel as the step applies it
    b = _bundle(corpus, tmp_path, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    eod = b.tokenizer.eod_id
    seen_boundary = False
    for _ in range(20):
        for mb in b.train.next_step():
            tok, pos, doc, lab = mb["tokens"], mb["position_ids"], mb["doc_ids"], labels_of(mb)
            for i in range(tok.shape[0]):
                ends = (tok[i] == eod).nonzero().flatten().tolist()
                for e in ends:
                    seen_boundary = True
                    assert lab[i, e] == -100                     # no loss across the boundary
                    if e + 1 < tok.shape[1]:
                        assert pos[i, e + 1] == 0 and doc[i, e + 1] == doc[i, e] + 1
                assert doc[i, 0] == 0 and int(doc[i, -1]) == len([e for e in ends if e < tok.shape[1] - 1])
                assert (lab[i] == -100).sum() == len(ends)
    assert seen_boundary


def test_valid_batches_deterministic(corpus, tmp_path):
    b = _bundle(corpus, tmp_path, dp_rank=0, dp_size=2)
    one = [mb["tokens"] for mb in b.valid_batches(5)]
    two = [mb["tokens"] for mb in b.valid_batches(5)]
    assert len(one) == 5 and all(torch.equal(x, y) for x, y in zip(one, two))
    other = [mb["tokens"] for mb in _bundle(corpus, tmp_path, dp_rank=1, dp_size=2).valid_batches(5)]
    assert not torch.equal(one[0], other[0])  # ranks see different validation samples


def test_bad_batch_geometry(corpus, tmp_path):
    with pytest.raises(DataError, match="not divisible"):
        _bundle(corpus, tmp_path, dp_size=3)
