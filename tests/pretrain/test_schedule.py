"""Learning-rate schedules and AdamW parameter groups."""
import math

import pytest

from polytron.model.config import ModelConfig
from polytron.model.transformer import build_model
from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
from polytron.pretrain.optim import build_optimizer, lr_at, param_groups

OPT = OptimizerConfig(lr=1.0, min_lr=0.1)


def curve(kind, total=100, **kw):
    s = ScheduleConfig(kind=kind, **kw)
    return [lr_at(i, total, OPT, s) for i in range(total)]


def test_warmup_is_linear_and_reaches_peak():
    lrs = curve("cosine", warmup_iters=10)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)


def test_cosine_decays_monotonically_to_min():
    lrs = curve("cosine", warmup_iters=10)
    tail = lrs[10:]
    assert all(a >= b for a, b in zip(tail, tail[1:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(100, 100, OPT, ScheduleConfig(kind="cosine", warmup_iters=10)) == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_holds_then_decays_in_last_fifth(shape):
    lrs = curve("wsd", warmup_iters=10, wsd_decay_shape=shape)
    assert all(lr == pytest.approx(1.0) for lr in lrs[10:80])
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.1)


def test_wsd_explicit_decay_length_and_constant():
    lrs = curve("wsd", warmup_iters=0, decay_iters=10)
    assert lrs[89] == pytest.approx(1.0) and lrs[90] < 1.0 and lrs[-1] == pytest.approx(0.1)
    assert set(curve("constant", warmup_iters=0)) == {1.0}


def test_no_weight_decay_on_norms_and_biases():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64,
                      max_seq_len=16, attention_bias=True)
    model = build_model(cfg)
    decay, no_decay = param_groups([model], 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    nd_names = [names[id(p)] for p in no_decay["params"]]
    assert any(n.endswith("norm.weight") for n in nd_names) and any(n.endswith(".bias") for n in nd_names)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    opt = build_optimizer([model], OptimizerConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
