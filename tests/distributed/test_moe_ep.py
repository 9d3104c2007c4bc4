"""Expert parallelism beyond the equivalence layouts (tests/distributed/layouts_moe.py):

* the forced-imbalance layout ``moe_ep2_idle_rank`` (checked against one process by
  test_equivalence.py) really sends nothing to the second expert-parallel rank;
* a checkpoint saved under EP2 resumes in one process and under EP2 x TP2 with the next
  step's loss within 1e-5 of the uninterrupted EP2 run (DCP reshards the expert shards,
  the balancing bias travels in the checkpoint).
"""
from __future__ import annotations

import json
import os

import pytest

from tests.checkpoint import runs
from tests.distributed import test_equivalence
from tests.distributed.layouts_moe import SKEWED

ITERS = 3          # save after step 2, compare the loss of step 3
MOE = ["model.arch=moe", "model.mlp=moe", "model.moe.num_experts=4", "model.moe.top_k=2",
       "model.moe.expert_ffn_hidden_size=64", "model.moe.shared_experts=1", "model.moe.score=sigmoid",
       "model.moe.bias_update_rate=0.01", "model.moe.z_loss_coeff=0.001"]


def test_forced_imbalance_routes_nothing_to_the_second_rank():
    ref = test_equivalence._reference(json.dumps(SKEWED, sort_keys=True), "plain")
    loads = {k: v for k, v in ref["stats"].items() if k.startswith("moe_load.")}
    assert len(loads) == 4 * 4                               # 4 layers x 4 experts
    for key, share in loads.items():
        expert = int(key.rsplit(".e", 1)[1])
        assert (share == 0) == (expert >= 2), (key, share)    # experts 2-3 live on EP rank 1


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory) -> tuple[str, float]:
    """An uninterrupted EP2 run on 2 gloo ranks: its step-2 checkpoint and step-3 loss."""
    out = str(tmp_path_factory.mktemp("ep2"))
    rc = runs.run(out, ITERS, *MOE, "parallel.expert=2", "checkpoint.interval=2", "checkpoint.keep_last=5",
                  nproc=2, timeout=400)
    assert rc == 0, runs.output(out)
    return os.path.join(out, "checkpoints", "iter_0000002"), runs.losses(out)[ITERS][0]


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [([], 1), (["parallel.expert=2", "parallel.tensor=2"], 4)],
                         ids=["single-process", "ep2xtp2"])
def test_ep2_checkpoint_resumes_in_another_layout(tmp_path, ep2_run, layout, nproc):
    ckpt_dir, ref_loss = ep2_run
    runs.assert_resumed_loss(str(tmp_path), ckpt_dir, ref_loss, ITERS, *MOE, *layout, nproc=nproc, timeout=400,
                             label="EP2")
