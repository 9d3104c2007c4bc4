"""Resharding on load: a TP2 x PP2 checkpoint resumes at 2-rank FSDP and in one process."""
from __future__ import annotations

import os

import pytest

from tests.checkpoint import runs

ITERS = 3          # save after step 2, compare the loss of step 3


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory) -> tuple[str, float]:
    """An uninterrupted TP2 x PP2 run on 4 gloo ranks: its step-2 checkpoint and step-3 loss."""
    out = str(tmp_path_factory.mktemp("tp2pp2"))
    rc = runs.run(out, ITERS, "checkpoint.interval=2", "checkpoint.keep_last=5", "parallel.tensor=2",
                  "parallel.pipeline=2", nproc=4, timeout=400)
    assert rc == 0, runs.output(out)
    return os.path.join(out, "checkpoints", "iter_0000002"), runs.losses(out)[ITERS][0]


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [(["parallel.data_parallel_shard=2"], 2), ([], 1)],
                         ids=["fsdp2", "single-process"])
def test_resume_in_another_layout(tmp_path, tp2pp2, layout, nproc):
    ckpt_dir, ref_loss = tp2pp2
    runs.assert_resumed_loss(str(tmp_path), ckpt_dir, ref_loss, ITERS, *layout, nproc=nproc, label="TP2xPP2")
