"""Tied embeddings under pipeline parallelism: checkpoints move between PP2 and one process.

The equivalence layouts (tests/distributed/layouts_tied_pp.py) show that PP2 tied training
equals one process; here a checkpoint saved after two steps under PP2 resumes in one
process, and one saved in one process resumes under PP2: the third step's loss and the
final parameters match the uninterrupted single-process run, and both pipeline copies of
the tied weight stay bit-identical. One 2-rank spawn runs both directions.
"""
from __future__ import annotations

import os

import torch

from polytron.parallel.config import ParallelConfig
from polytron.parallel.engine import build_engine
from polytron.parallel.mesh import ParallelDims
from polytron.pretrain import checkpoint
from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
from polytron.pretrain.optim import build_optimizer
from polytron.pretrain.step import TrainStep
from tests.distributed import equivalence as eq
from tests.distributed.harness import run_distributed

REL = 1e-5
MODEL = {"tie_embeddings": True}
SAVED_AT = 2                       # steps 0-1, save, then step 2 (the third)


def _trainer(pcfg: ParallelConfig, world: int):
    """(engine, optimizer, step) of the suite's tiny tied model in ``pcfg``'s layout."""
    import torch.distributed as dist
    mcfg = eq.model_config(**MODEL)
    dims = ParallelDims.resolve(pcfg, mcfg, world)
    mesh = dims.build_mesh("cpu") if world > 1 and dist.is_initialized() else None
    engine = build_engine(mcfg, pcfg, dims, mesh, torch.device("cpu"), torch.float32, eq.SEED)
    opt_cfg = OptimizerConfig(grad_clip=eq.GRAD_CLIP)
    optimizer = build_optimizer(engine.model_parts, opt_cfg)
    step = TrainStep(engine, optimizer, opt_cfg, ScheduleConfig(kind="constant", warmup_iters=0), eq.STEPS)
    return engine, optimizer, step


def _steps(step, steps: range) -> float:
    """Run ``steps`` on the whole global batch (pipelining keeps dp=1); the last loss."""
    loss = float("nan")
    for i in steps:
        loss = float(step(eq.microbatches(eq.global_batch(i, "plain", 128), 0, 1), i).loss)
    return loss


def _save(engine, optimizer, root: str) -> str:
    checkpoint.save(root, SAVED_AT, engine.model_parts, optimizer, {"iteration": SAVED_AT}, 5).finalize()
    return os.path.join(root, checkpoint.ckpt_name(SAVED_AT))


def _run(pcfg: ParallelConfig, world: int, root: str, resume: str | None = None) -> dict:
    """Train to the checkpoint (or resume from ``resume``), save to ``root``, run the last step."""
    engine, optimizer, step = _trainer(pcfg, world)
    if resume:
        checkpoint.load(resume, engine.model_parts, optimizer)
        saved = ""
    else:
        _steps(step, range(SAVED_AT))
        saved = _save(engine, optimizer, root)
    return {"loss": _steps(step, range(SAVED_AT, eq.STEPS)), "params": engine.full_parameters(), "saved": saved}


def _pp2_worker(single_ckpt: str, root: str) -> dict:
    """Both directions under PP2: an uninterrupted run that saves, and a resume of ``single_ckpt``."""
    pp2 = ParallelConfig(pipeline=2)
    return {"run": _run(pp2, 2, root), "resumed": _run(pp2, 2, "", resume=single_ckpt)}


def _close(got: dict, want: dict, what: str) -> None:
    assert abs(got["loss"] - want["loss"]) <= REL * abs(want["loss"]), f"{what}: loss {got['loss']} vs {want['loss']}"
    assert sorted(got["params"]) == sorted(want["params"]), f"{what}: parameter names"
    for name, ref in want["params"].items():
        rel = float((got["params"][name] - ref).norm() / ref.norm())
        assert rel <= 1e-4, f"{what}: {name} differs by {rel:.2e}"


def test_tied_checkpoint_moves_between_pp2_and_one_process(tmp_path) -> None:
    with eq.one_thread():                    # as each rank of the spawn
        single = _run(ParallelConfig(), 1, str(tmp_path / "single"))
    ranks = run_distributed(_pp2_worker, 2, single["saved"], str(tmp_path / "pp2"), backend="gloo", timeout=300)
    for run, what in (("run", "PP2 uninterrupted"), ("resumed", "PP2 resumed from one process")):
        params = {k: v for res in ranks for k, v in res[run]["params"].items()}
        for r, res in enumerate(ranks):
            _close({**res[run], "params": params}, single, f"{what} (rank {r})")
        # each rank holds a copy of the tied weight; they never drift apart
        copies = [res[run]["params"]["tok_embeddings.weight"] for res in ranks]
        assert torch.equal(copies[0], copies[1]), f"{what}: the two copies of the tied weight differ"
    with eq.one_thread():
        resumed = _run(ParallelConfig(), 1, "", resume=ranks[0]["run"]["saved"])
    _close(resumed, single, "one process resumed from PP2")
