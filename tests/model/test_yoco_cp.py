"""YOCO under context parallelism (model/yoco/context_parallel.py).

One process: the per-chunk pieces over 2 cp simulated chunks equal the one-device
kernels (retention: zero-state chunks + the exclusive state scan; sliding window: each
chunk with its W-1 halo keys in front); the window limit is one line naming the keys.

Two gloo ranks (one spawn): the whole tiny YOCO model (both self-decoders, packed
documents) with the real SequenceShard gives the one-device logits and every parameter
gradient; the cross-decoder all-gathers the shared key/value once per forward (counted);
and in the equivalence suite's training (retention CP2, full activation checkpointing)
exactly one per micro-batch forward. With the retention state scan dropped (the
test-only switch ``SCAN_STATES``) the logits are wrong and the equivalence check of
``yoco_retention_cp2_docs`` fails.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from polytron.model.yoco import context_parallel as cpm
from polytron.model.yoco.kernels import chunk_retention, sliding_window_attention
from tests.distributed.harness import Call, run_batch
from tests.distributed.layouts_yoco_cp import LAYOUTS
from tests.distributed.test_equivalence import assert_matches

LAYOUTS_BY_NAME = {layout.name: layout for layout in LAYOUTS}

B, H, D, T = 2, 3, 8, 24


def _inputs(seed: int = 0, docs: bool = False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    log_decay = torch.nn.functional.logsigmoid(torch.randn(B, H, T, generator=gen) + 2)
    seg = None
    if docs:
        seg = cpm.segments_of((torch.rand(B, T, generator=gen) < 0.2).long().cumsum(1))
    return q, k * D ** -0.5, v, log_decay, seg


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("cp", [1, 3])
def test_retention_chunks_with_state_scan_equal_one_device(cp, docs):
    q, k, v, ld, seg = _inputs(docs=docs)
    want, _ = chunk_retention(q, k, v, ld, 4, seg)
    c = T // (2 * cp)
    cut = [slice(g * c, (g + 1) * c) for g in range(2 * cp)]
    parts = [cpm.chunk_summary(q[:, :, s], k[:, :, s], v[:, :, s], ld[:, :, s], 4,
                               cpm.chunk_segments(seg, g, c), g * c) for g, s in enumerate(cut)]
    entering = cpm.incoming_states(torch.stack([p[1] for p in parts], 2), torch.stack([p[2] for p in parts], 2))
    got = torch.cat([cpm.with_incoming(p[0], q[:, :, s], p[3], entering[:, :, g])
                     for g, (s, p) in enumerate(zip(cut, parts))], dim=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if cp > 1:       # without the scan every chunk but the first misses its history
        dropped = torch.cat([p[0] for p in parts], dim=2)
        assert (dropped - want).abs().max() > 1e-2


@pytest.mark.parametrize("docs", [False, True])
def test_window_chunks_with_halo_equal_one_device(docs):
    q, k, v, _, seg = _inputs(1, docs)
    window, cp = 5, 3                      # W - 1 = 4 = chunk length: every halo is a whole chunk
    c = T // (2 * cp)
    want = sliding_window_attention(q, k, v, window, seg)
    outs = []
    for g in range(2 * cp):
        before = min(window - 1, g * c)
        keys = slice(g * c - before, (g + 1) * c)
        outs.append(sliding_window_attention(q[:, :, g * c:(g + 1) * c], k[:, :, keys], v[:, :, keys], window,
                                             cpm.chunk_segments(seg, g, c, before)))
    torch.testing.assert_close(torch.cat(outs, dim=2), want, rtol=1e-6, atol=1e-6)


def test_window_longer_than_a_chunk_is_one_line():
    assert cpm.window_limit(5, 2, 16) is None                  # chunks of 4 = W - 1
    err = cpm.window_limit(5, 4, 16)
    assert err is not None and "\n" not in err
    assert "parallel.context=4" in err and "model.yoco.sliding_window=5" in err and "seq_len=16" in err


def test_segments_of_document_ids():
    ids = torch.tensor([[1, 1, 2, 2, 2, 3], [0, 0, 0, 0, 0, 0]])
    assert cpm.segments_of(ids).tolist() == [[0, 0, 2, 2, 2, 5], [0, 0, 0, 0, 0, 0]]


# ---------------------------------------------------------------- two ranks, the whole model

SEQ = 16


def _model_and_batch(kind: str):
    from tests.distributed.equivalence import global_batch, model_config
    extra = {"sliding_window": 5} if kind == "swa" else {"retention_chunk": 3}
    cfg = model_config(arch="yoco", yoco={"self_decoder": kind, **extra})
    from polytron.model.transformer import Transformer
    model = Transformer(cfg)
    model.init_weights(7)
    batch = {k: v[:2] for k, v in global_batch(0, "docs", cfg.vocab_size).items()}   # (2, 16)
    weight = torch.randn(2, SEQ, cfg.vocab_size, generator=torch.Generator().manual_seed(3))
    return model, batch, weight


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _cp_against_one_device(kind: str) -> dict:
    """Every rank: one-device forward/backward of the full batch, and the CP forward/backward
    of its chunks (param grads summed over ranks); max differences and the K/V gathers."""
    from polytron.parallel.context import apply_context_parallel, shard_tensor, unshard
    model, batch, weight = _model_and_batch(kind)
    ref = copy.deepcopy(model)
    logits = ref(batch["tokens"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    (logits * weight).sum().backward()
    size, rank = dist.get_world_size(), dist.get_rank()
    apply_context_parallel(model, dist.group.WORLD, "ring")
    local = {k: shard_tensor(batch[k], size, rank) for k in ("tokens", "position_ids", "doc_ids")}
    out = {}
    for scan in (True, False):
        cpm.SCAN_STATES = scan
        model.zero_grad()
        before = cpm.KV_GATHERS
        mine = model(local["tokens"], position_ids=local["position_ids"], doc_ids=local["doc_ids"])
        gathers = cpm.KV_GATHERS - before
        (mine * shard_tensor(weight, size, rank)).sum().backward()
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine.detach().contiguous())
        full = unshard(parts, dim=1)
        grads = _grads(model)
        for g in grads.values():
            dist.all_reduce(g)
        out[scan] = {"logits": float((full - logits.detach()).abs().max() / logits.detach().abs().max()),
                     "grads": max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12))
                                  for n, g in _grads(ref).items()),
                     "gathers": gathers}
    cpm.SCAN_STATES = True
    return out


def _train(layout, scan: bool) -> dict:
    """Every rank: the equivalence suite's training of ``layout`` (optionally without the
    retention state scan), with the shared-K/V all-gathers it made."""
    from tests.distributed import equivalence as eq
    cpm.SCAN_STATES = scan
    before = cpm.KV_GATHERS
    try:
        res = eq.run_layout(layout)
    finally:
        cpm.SCAN_STATES = True
    return {**res, "kv_gathers": cpm.KV_GATHERS - before}


#: retention CP2 with full activation checkpointing (the recomputed cross-decoder blocks
#: must reuse the gathered key/value, not gather again)
AC_LAYOUT = LAYOUTS_BY_NAME["yoco_retention_cp2_full_ac"]
NO_SCAN_LAYOUT = LAYOUTS_BY_NAME["yoco_retention_cp2_docs"]


@pytest.fixture(scope="module")
def two_ranks():
    calls = [Call(kind, _cp_against_one_device, (kind,), budget_s=120) for kind in ("swa", "retention")]
    calls += [Call("counted", _train, (AC_LAYOUT, True), budget_s=120),
              Call("no_scan", _train, (NO_SCAN_LAYOUT, False), budget_s=120)]
    return run_batch(calls, 2, base_s=60)


@pytest.mark.parametrize("kind", ["swa", "retention"])
def test_cp2_whole_model_equals_one_device(two_ranks, kind):
    for res in two_ranks.get(kind):
        assert res[True]["logits"] <= 1e-5, res
        assert res[True]["grads"] <= 1e-5, res
        assert res[True]["gathers"] == 1, "the cross-decoder gathers the shared K/V once per forward"


def test_one_kv_gather_per_forward_in_training(two_ranks):
    """Three steps of 4 micro-batches plus 4 eval micro-batches: 16 forwards, 16 gathers per
    rank (not 32 for the two cross-decoder layers, nor more from recomputation)."""
    from tests.distributed import equivalence as eq
    ranks = two_ranks.get("counted")
    assert_matches(ranks, eq.reference(AC_LAYOUT.model, AC_LAYOUT.data))
    forwards = (eq.STEPS + 1) * eq.GLOBAL_BATCH // eq.MICRO
    assert [r["kv_gathers"] for r in ranks] == [forwards] * 2


def test_dropping_the_retention_scan_is_caught(two_ranks):
    for res in two_ranks.get("retention"):
        assert res[False]["logits"] > 1e-3, res
    from tests.distributed import equivalence as eq
    with pytest.raises(AssertionError, match="loss"):
        assert_matches(two_ranks.get("no_scan"), eq.reference(NO_SCAN_LAYOUT.model, NO_SCAN_LAYOUT.data))


def test_window_longer_than_a_chunk_is_refused_before_process_groups():
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.mesh import LayoutError, ParallelDims
    from tests.distributed.equivalence import model_config
    cfg = model_config(arch="yoco", yoco={"self_decoder": "swa", "sliding_window": 9})   # max_seq_len 32
    ParallelDims.resolve(ParallelConfig(context=2), cfg, 2)                          # chunks of 8 = W - 1
    with pytest.raises(LayoutError) as err:
        ParallelDims.resolve(ParallelConfig(context=4), cfg, 4)                      # chunks of 4
    assert "\n" not in str(err.value) and "model.yoco.sliding_window=9" in str(err.value)
