"""The generic training code's seams: a registered schedule, a loss object the engine
receives, per-rank states that register themselves, and the run directory's lifecycle."""
from __future__ import annotations

import os

import pytest
import torch

from polytron.model.configlib import ConfigError
from polytron.parallel.config import ParallelConfig
from polytron.parallel.engine import build_engine, labels_of
from polytron.parallel.loss import PerSourceLoss, TokenLoss
from polytron.parallel.mesh import ParallelDims
from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.checkpoint.rank_state import RankStates, RngState
from polytron.pretrain.config import OptimizerConfig, ScheduleConfig, load_config
from polytron.pretrain.errors import RunError
from polytron.pretrain.optim import build_optimizer
from polytron.pretrain.rundir import RunDirectory
from polytron.pretrain.schedule import SCHEDULES, Schedule, build_schedule, register_schedule
from polytron.pretrain.step import TrainStep
from tests.checkpoint import runs
from tests.distributed import equivalence as eq

OPT = OptimizerConfig(lr=1.0, min_lr=0.1, weight_decay=0.1)


class Halving(Schedule):
    """A schedule from outside pretrain/: lr halves and weight decay doubles every step."""

    def after_warmup(self, it: int) -> float:
        return self.opt.lr / 2 ** it

    def weight_decay(self, it: int) -> float:
        return self.opt.weight_decay * 2 ** it


@pytest.fixture(scope="module")
def engine():
    mcfg = eq.model_config(num_layers=1)
    pcfg = ParallelConfig()
    return build_engine(mcfg, pcfg, ParallelDims.resolve(pcfg, mcfg, 1), None, torch.device("cpu"),
                        torch.float32, eq.SEED), mcfg


def test_a_registered_schedule_is_configurable_and_drives_the_step(engine):
    model, mcfg = engine
    with pytest.raises(ConfigError, match=r"schedule\.kind.*'two_stage'"):
        ScheduleConfig(kind="halving").validate()
    register_schedule("halving")(Halving)
    try:
        sched = ScheduleConfig(kind="halving", warmup_iters=0)
        sched.validate()
        opt = build_optimizer(model.model_parts, OPT)
        step = TrainStep(model, opt, OPT, sched, 4)
        batch = eq.microbatches(eq.global_batch(0, "plain", mcfg.vocab_size), 0, 1)[:1]
        for i in range(3):
            assert step(batch, i).lr == 1.0 / 2 ** i
            assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1 * 2 ** i]  # norms never
    finally:
        del SCHEDULES["halving"]


def test_schedule_kinds_are_objects_built_once():
    assert {"cosine", "wsd", "constant", "two_stage"} <= set(SCHEDULES)
    two = build_schedule(ScheduleConfig(kind="two_stage", warmup_iters=2, stage2_lr=0.5), OPT, 10)
    assert [two.weight_decay(i) for i in (4, 5)] == [0.1, 0.0] and two.lr(5) == 0.5
    cos = build_schedule(ScheduleConfig(kind="cosine", warmup_iters=2), OPT, 10)
    assert [cos.weight_decay(i) for i in (0, 9)] == [0.1, 0.1] and cos.lr(0) == 0.5


class TokenCount(TokenLoss):
    """A loss that also logs how many loss tokens it saw (a statistic of its own)."""

    def token_sum(self, logits, labels, extra):
        from polytron.model.hooks import report
        report("seen_tokens_raw", (labels != -100).sum().float(), "sum")
        return super().token_sum(logits, labels, extra)

    def finish(self, stats):
        out = dict(stats)
        out["seen_tokens"] = out.pop("seen_tokens_raw")
        return out


def test_the_engine_takes_its_loss_object(engine):
    model, mcfg = engine
    batch = eq.global_batch(0, "sources", mcfg.vocab_size)
    mbs = eq.microbatches(batch, 0, 1)
    reference = float(model.eval_loss(mbs))
    model.reduce_stats()
    default = model.loss
    try:
        model.loss = TokenCount().with_sum_fn(default.sum_fn)
        # same loss, sources ignored (PerSourceLoss sums per-token losses, TokenLoss asks
        # cross_entropy for the sum: equal up to summation order)
        assert float(model.eval_loss(mbs)) == pytest.approx(reference, rel=1e-6)
        model.stats.clear()
        loss = model.forward_backward(mbs)
        stats = model.reduce_stats()
        assert float(loss) == pytest.approx(reference, rel=1e-6)
        assert stats == {"seen_tokens": float(sum(int((labels_of(mb) != -100).sum()) for mb in mbs))}
    finally:
        model.loss = default
        for p in model.model.parameters():
            p.grad = None
    assert isinstance(default, PerSourceLoss) and default.extra_keys == ("source",)


class Counter:
    """A feature's per-rank state: a count and how it was last restored."""

    def __init__(self, value: int = 0):
        self.value, self.how = value, None

    def state_dict(self) -> dict:
        return {"value": self.value} if self.value else {}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.how = state["value"], "loaded"

    def start_fresh(self, iteration):
        self.how = ("fresh", iteration)


def test_rank_states_register_save_and_restore(tmp_path):
    states = RankStates(rank=3)
    states.register("rng", RngState(seed=7, rank=3))
    states.register("counter", Counter(5))
    states.register("empty", Counter(0))
    with pytest.raises(ValueError, match="twice"):
        states.register("rng", RngState(7, 3))
    files = states.files()
    assert sorted(files) == ["counter_rank3.pt", "rng_rank3.pt"]          # nothing saved for "empty"
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    expected = torch.rand(3)
    torch.manual_seed(0)
    states.states["counter"].value = 0
    states.restore(str(tmp_path), same_world_size=True, iteration=4)
    assert torch.equal(torch.rand(3), expected)                              # RNG streams restored
    assert (states.states["counter"].value, states.states["counter"].how) == (5, "loaded")
    assert states.states["empty"].how == ("fresh", 4)
    states.restore(str(tmp_path), same_world_size=False, iteration=4)       # other world size
    assert states.states["counter"].how == ("fresh", 4)
    states.restore(None, same_world_size=False, iteration=None)              # weights only
    assert states.states["counter"].how == ("fresh", None)
    torch.save({"value_missing": 1}, tmp_path / "counter_rank3.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"counter_rank3\.pt: bad counter state \(KeyError\)"):
        states.restore(str(tmp_path), same_world_size=True, iteration=4)


def test_run_directory_locks_decides_and_releases(tmp_path):
    cfg = load_config(os.path.join(runs.ROOT, "launch", "configs", "tiny.yaml"),
                      runs.TINY + [f"training.output_dir={tmp_path}", "training.iterations=3"])
    first = RunDirectory(cfg, 0, 1)
    first.open()
    assert first.resume_path is None and first.finished_already() is None and first.load_target() is None
    second = RunDirectory(cfg, 0, 1)
    with pytest.raises(RunError, match="is in use by pid"):
        second.open()
    first.write_config()
    assert os.path.isfile(tmp_path / "config.yaml")
    first.release()
    second.open()
    second.release()
