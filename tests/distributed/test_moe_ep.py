"""Expert parallelism beyond the equivalence layouts (tests/distributed/layouts_moe.py):

* the forced-imbalance layout ``moe_ep2_idle_rank`` (checked against one process by
  test_equivalence.py) really sends nothing to the second expert-parallel rank;
* a checkpoint saved under EP2 resumes in one process, under EP2 x TP2 and under CP2 x EP2
  (the expert group spanning the two cp ranks) with the next
  step's loss within 1e-5 of the uninterrupted EP2 run (DCP reshards the expert shards,
  the balancing bias travels in the checkpoint).
* expert groups spanning cp ranks (parallel/mesh.py, ``ep_cp > 1``): every dimension that
  is not about experts holds the same ranks as without expert parallelism, and ``"ep"``,
  ``"efsdp"``, ``"ecp"`` the ranks they should (the mesh of each of 16 ranks built on torch's
  in-process "fake" backend: no peers, the rank layout only; the layouts training these
  meshes are ``*_span`` in tests/distributed/layouts_moe_cp.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os

import pytest
import torch.distributed as dist

from polytron.parallel.mesh import ParallelDims
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
@pytest.mark.parametrize("layout,nproc", [([], 1), (["parallel.expert=2", "parallel.tensor=2"], 4),
                                          (["parallel.context=2", "parallel.expert=2"], 2)],
                         ids=["single-process", "ep2xtp2", "cp2xep2-span"])
def test_ep2_checkpoint_resumes_in_another_layout(tmp_path, ep2_run, layout, nproc):
    ckpt_dir, ref_loss = ep2_run
    runs.assert_resumed_loss(str(tmp_path), ckpt_dir, ref_loss, ITERS, *MOE, *layout, nproc=nproc, timeout=400,
                             label="EP2")


MESH_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "dp", "pp_dp", "dp_cp", "pp_dp_cp")


def _groups(dims: ParallelDims, names: tuple[str, ...]) -> dict[str, set[tuple[int, ...]]]:
    """Every rank's group of each named mesh dimension (one fake process group per rank)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    out: dict[str, set[tuple[int, ...]]] = {n: set() for n in names}
    for rank in range(dims.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            mesh = dims.build_mesh("cpu")
            for n in names:
                out[n].add(tuple(mesh[n].mesh.flatten().tolist()))
        finally:
            dist.destroy_process_group()
    return out


def _expected(dims: ParallelDims, same: tuple[str, ...]) -> set[tuple[int, ...]]:
    """Groups of ranks agreeing on the coordinates ``same`` of the plain (pp, dp_replicate,
    dp_shard, cp, tp) layout, with dp_shard split as (efsdp, ep_dp) and cp as (ecp, ep_cp)."""
    shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
    keys: dict[tuple, list[int]] = {}
    for rank, (p, r, s, c, t) in enumerate(itertools.product(*map(range, shape))):
        coord = {"pp": p, "dp_replicate": r, "efsdp": s // dims.ep_dp, "ep_dp": s % dims.ep_dp,
                 "ecp": c // dims.ep_cp, "ep_cp": c % dims.ep_cp, "tp": t}
        keys.setdefault(tuple(coord[k] for k in same), []).append(rank)
    return {tuple(g) for g in keys.values()}


@pytest.mark.parametrize("shape", [(1, 1, 2, 4, 2, 4), (2, 1, 1, 4, 2, 2), (1, 2, 2, 2, 1, 4)],
                         ids=["dp2xcp4xtp2-ep4", "pp2xcp4xtp2-ep2", "hsdp2x2xcp2-ep4"])
def test_expert_groups_across_cp_keep_every_other_group(shape: tuple[int, ...]) -> None:
    pp, rep, shard, cp, tp, ep = shape
    dims = ParallelDims(pp=pp, dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, ep=ep, virtual_stages=1,
                        world_size=pp * rep * shard * cp * tp)
    assert dims.ep_cp > 1
    plain = _groups(dataclasses.replace(dims, ep=1), MESH_NAMES)
    got = _groups(dims, MESH_NAMES + ("ep", "efsdp", "ecp"))
    for n in MESH_NAMES:
        assert got[n] == plain[n], n
    others = ("pp", "dp_replicate", "efsdp", "ep_dp", "ecp", "ep_cp", "tp")
    for n, varying in (("ep", ("ep_dp", "ep_cp")), ("efsdp", ("efsdp",)), ("ecp", ("ecp",))):
        assert got[n] == _expected(dims, tuple(k for k in others if k not in varying)), n
