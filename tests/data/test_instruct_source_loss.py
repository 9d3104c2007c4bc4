"""Per-source loss of a blend: ``loss/source<i>`` is the token-mean loss of source i's samples
and ``loss_tokens/source<i>`` its loss-token count, accumulated over the steps of a log
interval; the step's own loss is unchanged. (Every parallel layout is held to the same
values by tests/distributed/layouts_ipt.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytron.parallel.config import ParallelConfig
from polytron.parallel.engine import build_engine, labels_of
from polytron.parallel.mesh import ParallelDims
from tests.distributed import equivalence as eq


def _engine():
    mcfg = eq.model_config()
    dims = ParallelDims.resolve(ParallelConfig(), mcfg, 1)
    return build_engine(mcfg, ParallelConfig(), dims, None, torch.device("cpu"), torch.float32, eq.SEED), mcfg


def _per_source(engine, batch: dict) -> tuple[dict, dict, float]:
    """Reference: (token-loss sums, loss-token counts) by source, and the token mean, from a
    plain forward of the whole batch."""
    with torch.no_grad():
        logits = engine.model(batch["tokens"])                                     # (G, T, V)
    labels = labels_of(batch)                                                      # (G, T)
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                reduction="none").view(labels.shape)               # (G, T)
    sums, counts = {}, {}
    ids = batch["source"].argmax(1)                                                # (G,)
    for i in range(batch["source"].shape[1]):
        rows = ids == i
        sums[i] = float(per_token[rows].sum())
        counts[i] = int((labels[rows] != -100).sum())
    return sums, counts, float(per_token.sum() / (labels != -100).sum())


def test_per_source_loss_is_each_sources_token_mean() -> None:
    engine, mcfg = _engine()
    sums, counts = {}, {}
    for step in range(2):                     # statistics accumulate until a log line reads them
        batch = eq.global_batch(step, "sources", mcfg.vocab_size)
        s, c, mean = _per_source(engine, batch)
        for i in s:
            sums[i], counts[i] = sums.get(i, 0.0) + s[i], counts.get(i, 0) + c[i]
        loss = engine.forward_backward(eq.microbatches(batch, 0, 1))
        assert float(loss) == pytest.approx(mean, rel=1e-6)
        for p in engine.model.parameters():
            p.grad = None
    stats = engine.reduce_stats()
    assert counts[3] == 0 and stats["loss_tokens/source3"] == 0 and "loss/source3" not in stats
    for i in (0, 1, 2):
        assert stats[f"loss_tokens/source{i}"] == counts[i] > 0
        assert stats[f"loss/source{i}"] == pytest.approx(sums[i] / counts[i], rel=1e-6)
    assert not [k for k in stats if k.startswith("source_loss")]          # raw sums are not logged
    assert engine.reduce_stats() == {}                                      # read once per interval


def test_batches_without_sources_take_the_plain_loss() -> None:
    engine, mcfg = _engine()
    batch = eq.global_batch(0, "masked", mcfg.vocab_size)
    _, _, mean = _per_source(engine, dict(batch, source=torch.ones(eq.GLOBAL_BATCH, 1, dtype=torch.long)))
    assert float(engine.forward_backward(eq.microbatches(batch, 0, 1))) == pytest.approx(mean, rel=1e-6)
    assert engine.reduce_stats() == {}
