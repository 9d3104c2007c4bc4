"""Context parallelism: bad layouts refused before any process group, and the equivalence
checks shown to catch a ring that drops one block and a loss normalized per rank.

The layouts themselves (dense CP2/CP4 with documents, all-gather, x TP2, x PP2, x FSDP2,
DHA, BitNet) are in tests/distributed/layouts_cp.py, MoE CP2 x EP2 and MH-MoE CP2 in
tests/distributed/layouts_moe_cp.py; they run with the equivalence suite.
"""
from __future__ import annotations

import pytest

from polytron.parallel.config import ParallelConfig
from polytron.parallel.mesh import LayoutError, ParallelDims
from tests.distributed import equivalence as eq
from tests.distributed.harness import Call, run_batch
from tests.distributed.test_equivalence import assert_matches


@pytest.mark.parametrize("parallel,model,seq_len,needle", [
    ({"context": 2}, {}, 10, "data.seq_len=10 must be divisible by 2 x parallel.context = 4"),
    ({"context": 2, "compile": True}, {}, 16, "parallel.compile=true"),
    ({"context": 2}, {"arch": "moe", "moe": {"capacity_factor": 1.0}}, 16, "model.moe.capacity_factor=1.0"),
    ({"context": 2, "expert": 4}, {"arch": "moe"}, 16, "parallel.expert=4 must divide the data-parallel shard"),
])
def test_bad_cp_layout_is_one_line(parallel: dict, model: dict, seq_len: int, needle: str) -> None:
    with pytest.raises(LayoutError) as err:
        ParallelDims.resolve(ParallelConfig(**parallel), eq.model_config(**model), 2, seq_len)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_fp8_rowwise_with_cp_is_one_line() -> None:
    """FP8 row-wise x CP is refused at config validation (before any process group): its
    grad-weight scales span the sequence (the other refusals: tests/pretrain/test_fp8.py)."""
    from polytron.model.configlib import ConfigError
    from polytron.parallel.fp8 import FP8Config
    from polytron.pretrain.config import RunConfig
    cfg = RunConfig()
    cfg.parallel.context, cfg.data.builtin_corpus = 2, True
    cfg.precision.fp8 = FP8Config(enabled=True, recipe="rowwise")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert "with parallel.context=2 is not supported" in str(err.value) and "\n" not in str(err.value)


def test_cp_layout_accepted() -> None:
    dims = ParallelDims.resolve(ParallelConfig(context=2), eq.model_config(), 4, 16)
    assert (dims.cp, dims.dp) == (2, 2)


def _faulty(fault: str) -> dict:
    """cp2_docs trained with one test-only fault switched on (parallel/context.py TEST_FAULTS)."""
    from polytron.parallel.context import TEST_FAULTS
    TEST_FAULTS.add(fault)
    return eq.run_layout(eq.LAYOUTS["cp2_docs"])


@pytest.mark.timeout(600)
def test_equivalence_catches_cp_faults() -> None:
    faults = ("skip_block", "per_rank_loss")
    result = run_batch([Call(f, _faulty, (f,), 120.0) for f in faults], 2, base_s=120.0)
    ref = eq.reference({}, "docs")
    for fault in faults:
        with pytest.raises(AssertionError):
            assert_matches(result.get(fault), ref)


# ---------------------------------------------------------------- resume across a change of cp

SAVED_AT = 2                       # steps 0-1, save, then step 2 (the third)
EOD = 5                            # token id ending a document in the loader's samples


def _loader():
    """The real TrainLoader over in-memory samples (the suite's "masked" batches of steps 0-2);
    documents end at token EOD, so doc_ids follow the tokens through the cp sharding."""
    from polytron.data.loader import TrainLoader, _Sampler
    samples = []
    for i in range(eq.STEPS):
        b = eq.global_batch(i, "masked", 128)
        samples += [{k: b[k][j] for k in ("tokens", "labels", "loss_mask")} for j in range(eq.GLOBAL_BATCH)]
    sampler = _Sampler(samples, eq.MICRO, EOD, position_ids=False, doc_ids=True, name="train")
    return TrainLoader(sampler, eq.GLOBAL_BATCH, 0, 1, 0, "cp-resume", len(samples))


def _cp_run(cp: int, root: str, resume: str = "") -> dict:
    """MoE (dropless, balancing bias) at parallel.context=cp: train to SAVED_AT and save (or
    resume ``resume``, loader position included), then the last step."""
    import os

    import torch

    from polytron.parallel.engine import build_engine
    from polytron.pretrain import checkpoint
    from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
    from polytron.pretrain.optim import build_optimizer
    from polytron.pretrain.step import TrainStep
    from tests.distributed.layouts_moe_cp import MOE_CP
    pcfg, mcfg = ParallelConfig(context=cp), eq.model_config(**MOE_CP)
    dims = ParallelDims.resolve(pcfg, mcfg, cp, eq.SEQ)
    engine = build_engine(mcfg, pcfg, dims, dims.build_mesh("cpu") if cp > 1 else None,
                          torch.device("cpu"), torch.float32, eq.SEED)
    opt_cfg = OptimizerConfig(grad_clip=eq.GRAD_CLIP)
    optimizer = build_optimizer(engine.model_parts, opt_cfg)
    step = TrainStep(engine, optimizer, opt_cfg, ScheduleConfig(kind="constant", warmup_iters=0), eq.STEPS)
    loader, saved, first = _loader(), "", SAVED_AT
    if resume:
        loader.load_state_dict(checkpoint.load(resume, engine.model_parts, optimizer)["data"])
    else:
        for i in range(SAVED_AT):
            step(loader.next_step(), i)
        state = {"iteration": SAVED_AT, "data": loader.state_dict()}
        checkpoint.save(root, SAVED_AT, engine.model_parts, optimizer, state, 5).finalize()
        saved = os.path.join(root, checkpoint.ckpt_name(SAVED_AT))
    position = loader.consumed_samples
    loss = [float(step(loader.next_step(), i).loss) for i in range(first, eq.STEPS)][-1]
    return {"loss": loss, "position": position, "params": engine.full_parameters(), "saved": saved}


def _cp2_worker(single_ckpt: str, root: str) -> dict:
    """Both directions at cp=2: an uninterrupted run that saves, and a resume of ``single_ckpt``."""
    return {"run": _cp_run(2, root), "resumed": _cp_run(2, "", resume=single_ckpt)}


def _same_run(got: dict, want: dict, what: str) -> None:
    assert got["position"] == want["position"] == SAVED_AT * eq.GLOBAL_BATCH, f"{what}: loader position"
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), f"{what}: loss {got['loss']} vs {want['loss']}"
    assert sorted(got["params"]) == sorted(want["params"]), f"{what}: parameter names"
    for name, ref in want["params"].items():
        rel = float((got["params"][name] - ref).norm() / ref.norm())
        assert rel <= 1e-4, f"{what}: {name} differs by {rel:.2e}"


@pytest.mark.timeout(600)
def test_checkpoint_resumes_across_a_change_of_cp(tmp_path) -> None:
    """Saved at cp=1, resumed at cp=2, and the reverse: the loader continues at the saved
    sample and the last step's loss and the parameters equal the uninterrupted cp=1 run."""
    from tests.distributed.harness import run_distributed
    with eq.one_thread():                    # as each rank of the spawn
        single = _cp_run(1, str(tmp_path / "single"))
    ranks = run_distributed(_cp2_worker, 2, single["saved"], str(tmp_path / "cp2"), backend="gloo", timeout=300)
    for r, res in enumerate(ranks):
        _same_run(res["run"], single, f"cp=2 uninterrupted (rank {r})")
        _same_run(res["resumed"], single, f"cp=2 resumed from cp=1 (rank {r})")
    with eq.one_thread():
        resumed = _cp_run(1, "", resume=ranks[0]["run"]["saved"])
    _same_run(resumed, single, "cp=1 resumed from cp=2")
