"""The BitNet b1.58 training recipe: two-stage learning rate and weight decay off at mid-training."""
from __future__ import annotations

import math
import os

import pytest
import torch

from polytron.model.configlib import ConfigError
from polytron.pretrain.config import OptimizerConfig, ScheduleConfig, load_config
from polytron.pretrain.optim import lr_at
from polytron.pretrain.schedule import build_schedule

OPT = OptimizerConfig(lr=1.5e-3, min_lr=1e-5, weight_decay=0.1)
SCHED = ScheduleConfig(kind="two_stage", warmup_iters=10, stage2_start=0.5, stage2_lr=8e-4)


def test_two_stage_learning_rate():
    total = 110
    lrs = [lr_at(i, total, OPT, SCHED) for i in range(total)]
    assert lrs[0] == pytest.approx(OPT.lr / 10) and lrs[9] == pytest.approx(OPT.lr)      # warmup
    mid = 55
    frac = (mid - 1 - 10) / (total - 10)           # stage 1: the whole run's cosine, cut at mid
    assert lrs[mid - 1] == pytest.approx(OPT.min_lr + 0.5 * (OPT.lr - OPT.min_lr) * (1 + math.cos(math.pi * frac)))
    assert lrs[mid] == pytest.approx(SCHED.stage2_lr)                                      # the drop
    assert lrs[mid] < lrs[mid - 1]
    assert all(a >= b for a, b in zip(lrs[10:mid - 1], lrs[11:mid]))                      # decays in stage 1
    assert all(a >= b for a, b in zip(lrs[mid:-1], lrs[mid + 1:]))                        # and in stage 2
    assert lr_at(total, total, OPT, SCHED) == pytest.approx(OPT.min_lr)


def test_two_stage_linear_is_the_faqs_shape():
    """schedule.kind=two_stage_linear (model/bitnet/schedule.py): straight lines in both stages."""
    import polytron.model.bitnet.spec  # noqa: F401  (registers the kind)
    sched = ScheduleConfig(kind="two_stage_linear", warmup_iters=10, stage2_start=0.5, stage2_lr=1e-3)
    sched.validate()
    total, mid = 110, 55
    lrs = [lr_at(i, total, OPT, sched) for i in range(total)]
    assert lrs[9] == pytest.approx(OPT.lr)
    assert lrs[mid - 1] == pytest.approx(OPT.lr - (OPT.lr - OPT.min_lr) * (mid - 1 - 10) / (total - 10))
    assert lrs[mid] == pytest.approx(1e-3)
    steps1 = [a - b for a, b in zip(lrs[10:mid - 1], lrs[11:mid])]
    steps2 = [a - b for a, b in zip(lrs[mid:-1], lrs[mid + 1:])]
    assert max(steps1) == pytest.approx(min(steps1)) and max(steps2) == pytest.approx(min(steps2))   # linear
    assert lr_at(total, total, OPT, sched) == pytest.approx(OPT.min_lr)
    assert [build_schedule(sched, OPT, 10).weight_decay(i) for i in (4, 5)] == [0.1, 0.0]


def test_b158_recipe_is_the_faqs_700m():
    """FAQ tables 1 and 2, 700M: 1536 / 4096 / 24 heads / 24 layers, 1M-token batches of 2048,
    1.5e-3 -> 1e-3, weight decay 0.1 -> 0, 375 warm-up steps, linear decay; the FAQ block."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "launch", "configs", "bitnet-b158.yaml"), ["data.paths=[corpus]"])
    m = cfg.model
    assert (m.hidden_size, m.ffn_hidden_size, m.num_heads, m.num_layers, m.max_seq_len) == (1536, 4096, 24, 24, 2048)
    assert m.bitnet.linear_norm and not m.bitnet.block_prenorm
    assert cfg.training.global_batch_size * cfg.data.seq_len == 2 ** 20
    assert (cfg.optimizer.lr, cfg.schedule.stage2_lr, cfg.schedule.warmup_iters) == (1.5e-3, 1e-3, 375)
    assert (cfg.optimizer.weight_decay, cfg.schedule.stage2_weight_decay) == (0.1, 0.0)
    assert cfg.schedule.kind == "two_stage_linear"


def test_weight_decay_switches_off_at_stage_two():
    assert [build_schedule(SCHED, OPT, 10).weight_decay(i) for i in (0, 4, 5, 9)] == [0.1, 0.1, 0.0, 0.0]
    other = ScheduleConfig(kind="cosine")
    assert [build_schedule(other, OPT, 10).weight_decay(i) for i in (0, 9)] == [0.1, 0.1]


def test_train_step_applies_the_weight_decay_schedule():
    """Matrices decay in stage 1 only; norms never; the schedule survives an optimizer reload."""
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    from polytron.pretrain.optim import build_optimizer
    from polytron.pretrain.step import TrainStep
    from tests.distributed import equivalence as eq
    from tests.distributed.layouts_bitnet import B2B4T
    mcfg = eq.model_config(**B2B4T, num_layers=1)
    pcfg = ParallelConfig()
    engine = build_engine(mcfg, pcfg, ParallelDims.resolve(pcfg, mcfg, 1), None, torch.device("cpu"),
                          torch.float32, 0)
    opt = build_optimizer(engine.model_parts, OPT)
    step = TrainStep(engine, opt, OPT, SCHED, 4)
    batch = eq.microbatches(eq.global_batch(0, "plain", mcfg.vocab_size), 0, 1)[:1]
    seen = []
    for i in range(4):
        if i == 2:                                  # a resume replaces the group dicts
            opt.load_state_dict(opt.state_dict())
        step(batch, i)
        seen.append(sorted(g["weight_decay"] for g in opt.param_groups))
    assert seen == [[0.0, 0.1], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]]


def test_recipe_configs_load():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("bitnet-tiny", "bitnet-b158"):
        cfg = load_config(os.path.join(root, "launch", "configs", f"{name}.yaml"), ["data.paths=[corpus]"])
        assert cfg.schedule.kind in ("two_stage", "two_stage_linear") and cfg.model.linear == "bitlinear"
        assert (cfg.optimizer.beta1, cfg.optimizer.beta2) == (0.9, 0.95)
        assert cfg.schedule.warmup_iters > 0 and cfg.schedule.stage2_weight_decay == 0


def test_two_stage_needs_its_rate():
    with pytest.raises(ConfigError, match=r"schedule\.stage2_lr"):
        ScheduleConfig(kind="two_stage").validate()
    with pytest.raises(ConfigError, match=r"schedule\.stage2_start"):
        ScheduleConfig(kind="two_stage", stage2_lr=1e-4, stage2_start=1.0).validate()
