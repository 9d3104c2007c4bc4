"""MH-MoE against the released recipe (Wu et al. 2024; the authors' torchscale decoder with its
top-k gate and scripts/run.sh), recomputed here from its algorithm in plain PyTorch:

split projection, h sub-tokens per token (consecutive feature chunks), softmax gate in fp32,
top-k, combine weights the raw probabilities, GShard balancing loss over first choices
(E x sum_e mean_t p_te x first-choice fraction_e), capacity C = k x ceil(S / E) over the S
sub-tokens with buffer places assigned first choices first (by row), then second choices,
an assignment whose place is >= C dropped; SwiGLU experts (fc1 x silu(fc3)) into fc2),
weighted sum, merge projection. ``model.moe.reference: released`` must give the same output,
loss and gradients at 1e-5, with drops, and place the MoE layers at (i + 1) % every == 0.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polytron.model.config import ModelConfig
from polytron.model.configlib import ConfigError
from polytron.model.hooks import StatsCollector, step_scope
from polytron.model.layers import layer_mlp
from polytron.model.moe.config import MoEConfig
from polytron.model.transformer import build_model

BASE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
            max_seq_len=32)
H, E = 4, 4


def released_cfg(top_k: int = 2, **moe) -> ModelConfig:
    moe = {"num_experts": E, "top_k": top_k, "expert_ffn_hidden_size": 24, "heads": H, "every": 2,
           "reference": "released", **moe}
    cfg = ModelConfig(arch="moe", mlp="mh_moe", moe=MoEConfig(**moe), **BASE)
    cfg.validate()
    return cfg


def released_layer(x, p: dict, top_k: int, capacity, first_choice_loss: bool = True):
    """The released MH-MoE layer on x (B, T, d) with parameters ``p``: (output, l_aux, drops)."""
    B, T, d = x.shape
    w = d // H
    sub = F.linear(x.reshape(-1, d), p["split_w"], p["split_b"]).reshape(-1, H, w).reshape(-1, w)   # (S, w)
    gates = (sub.float() @ p["wg"].float().t()).softmax(1)                                        # (S, E)
    S = gates.shape[0]
    top = gates.topk(top_k, dim=1).indices                                                       # (S, k)
    masks = [F.one_hot(top[:, j], E) for j in range(top_k)]                                      # (S, E)
    combine = [(gates * m).sum(1) for m in masks]                                                # raw probs
    counted = masks[0] if first_choice_loss else sum(masks)
    ce = (counted.float() * (E / S)).sum(0)
    l_aux = (gates.sum(0) * ce).sum() / S * (1.0 if first_choice_loss else 1.0 / top_k)
    C = capacity(S)
    places, before = [], torch.zeros(E, dtype=torch.long)
    for m in masks:                                            # first choices, then second choices
        places.append(((m.cumsum(0) - 1 + before) * m).sum(1))                                # (S,)
        before = before + m.sum(0)
    buf = sub.new_zeros(E, C, w)
    for j in range(top_k):
        keep = places[j] < C
        buf = buf.index_put((top[keep, j], places[j][keep]), sub[keep])
    hidden = F.silu(torch.einsum("ecw,efw->ecf", buf, p["fc3"])) * torch.einsum("ecw,efw->ecf", buf, p["fc1"])
    y = torch.einsum("ecf,ewf->ecw", hidden, p["fc2"])                                           # (E, C, w)
    out = sub.new_zeros(S, w)
    for j in range(top_k):
        keep = (places[j] < C).to(sub.dtype)[:, None]
        got = y[top[:, j], places[j].clamp(max=C - 1)]
        out = out + combine[j][:, None].to(sub.dtype) * got * keep
    merged = F.linear(out.reshape(-1, d), p["merge_w"], p["merge_b"]).reshape(B, T, d)
    drops = sum(int((pl >= C).sum()) for pl in places)
    return merged, l_aux, drops


def copied(layer) -> dict:
    """The layer's parameters under the released names, as fresh leaves."""
    ex = layer.experts
    src = {"split_w": layer.split.weight, "split_b": layer.split.bias, "merge_w": layer.merge.weight,
           "merge_b": layer.merge.bias, "wg": layer.router.weight, "fc3": ex.gate.weight, "fc1": ex.up.weight,
           "fc2": ex.down.weight}
    return {k: v.detach().clone().requires_grad_() for k, v in src.items()}


OURS = {"split_w": "split.weight", "split_b": "split.bias", "merge_w": "merge.weight", "merge_b": "merge.bias",
        "wg": "router.weight", "fc3": "experts.gate.weight", "fc1": "experts.up.weight", "fc2": "experts.down.weight"}


@pytest.mark.parametrize("top_k", [1, 2])
def test_released_settings_match_the_released_layer_with_drops(top_k):
    cfg = released_cfg(top_k)
    layer = build_model(cfg, seed=0).layers["1"].mlp          # (i + 1) % 2 == 0: layer 1
    assert type(layer).__name__ == "MHMoE"
    p = copied(layer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, cfg.hidden_size, generator=gen)
    g = torch.randn(2, 6, cfg.hidden_size, generator=gen)
    cap = lambda s: top_k * math.ceil(s / E)                    # noqa: E731
    xr = x.clone().requires_grad_()
    want, l_aux, drops = released_layer(xr, p, top_k, cap)
    assert drops > 0                                            # C = k * 12 of 48 sub-tokens: some dropped
    ((want * g).sum() + 0.01 * l_aux).backward()                # --moe-gate-loss-wt 0.01

    xo = x.clone().requires_grad_()
    stats = StatsCollector()
    with step_scope(aux_scale=1.0, stats=stats):
        got = layer(xo)
        (got * g).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(stats.values["aux/moe_balance_l1"][1]), 0.01 * float(l_aux.detach()), rel_tol=1e-5)
    assert math.isclose(float(stats.values["moe/dropped_l1"][1]), drops / (48 * top_k), rel_tol=1e-6)
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-5)
    params = dict(layer.named_parameters())
    for name, ours in OURS.items():
        torch.testing.assert_close(params[ours].grad, p[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_balancing_loss_counts_first_choices_only():
    """The GShard loss of the released gate counts first choices; counting all k assignments
    (our default) gives another value and other router gradients on the same routing."""
    cfg = released_cfg(2)
    layer = build_model(cfg, seed=0).layers["1"].mlp
    with torch.no_grad():
        layer.router.weight[0].add_(0.3)                        # expert 0 mostly first: unbalanced
    p = copied(layer)
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    cap = lambda s: 2 * math.ceil(s / E)                       # noqa: E731
    _, first, _ = released_layer(x, p, 2, cap)
    _, every, _ = released_layer(x, p, 2, cap, first_choice_loss=False)
    assert abs(float(first.detach()) - float(every.detach())) > 0.05     # 1.115 vs 1.022 here
    stats = StatsCollector()
    with step_scope(aux_scale=1.0, stats=stats):
        (layer(x) * 0).sum().backward()                         # only the balancing loss trains
    assert math.isclose(float(stats.values["aux/moe_balance_l1"][1]), 0.01 * float(first.detach()), rel_tol=1e-6)
    (0.01 * first).backward()
    torch.testing.assert_close(layer.router.weight.grad, p["wg"].grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("eval_capacity,capacity", [
    ("train", lambda s: 2 * math.ceil(s / E)),                 # scripts/run.sh: fraction -1 -> training C
    ("fraction", lambda s: math.ceil(0.25 * s)),               # the torchscale default 0.25
])
def test_evaluation_capacity(eval_capacity, capacity):
    cfg = released_cfg(2, eval_capacity=eval_capacity)
    layer = build_model(cfg, seed=0).layers["1"].mlp.eval()
    p = copied(layer)
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, _, drops = released_layer(x, p, 2, capacity)
        assert drops > 0
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_released_placement_and_settings():
    cfg = ModelConfig(arch="moe", mlp="mh_moe", moe=MoEConfig(num_experts=4, heads=4, every=2, reference="released"),
                      **{**BASE, "num_layers": 6})
    cfg.validate()
    assert [layer_mlp(cfg, i) for i in range(6)] == ["swiglu", "mh_moe"] * 3          # layers 1, 3, 5
    m = cfg.moe
    assert (m.normalize_top_k, m.balance_choices, m.capacity_factor, m.capacity_rounding, m.eval_capacity,
            m.offset) == (False, "first", 1.0, "per_choice", "train", 1)
    own = ModelConfig(arch="moe", mlp="mh_moe", moe=MoEConfig(num_experts=4, heads=4, every=2, offset=1, first_dense=2),
                      **{**BASE, "num_layers": 6})
    own.validate()
    assert [layer_mlp(own, i) for i in range(6)] == ["swiglu"] * 3 + ["mh_moe", "swiglu", "mh_moe"]


@pytest.mark.parametrize("kw,needle", [
    (dict(reference="released", normalize_top_k=True, capacity_factor=2.0), "model.moe.capacity_factor"),
    (dict(reference="released", shared_experts=1), "model.moe.shared_experts"),
    (dict(eval_capacity_fraction=0.0), "model.moe.eval_capacity_fraction"),
    (dict(offset=-1), "model.moe.offset"),
    (dict(offset=2, model_layers=2), "model.moe.first_dense"),
])
def test_config_errors_name_the_key(kw, needle):
    layers = kw.pop("model_layers", 2)
    with pytest.raises(ConfigError) as e:
        ModelConfig(arch="moe", mlp="mh_moe", moe=MoEConfig(heads=4, num_experts=4, **kw),
                    **{**BASE, "num_layers": layers}).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_evaluation_capacity_refused_under_context_parallelism():
    from polytron.model.moe.layer import MoE
    ok = ModelConfig(arch="moe", mlp="mh_moe", moe=MoEConfig(heads=4, eval_capacity="train"), **BASE)
    drops = ModelConfig(arch="moe", mlp="mh_moe", moe=MoEConfig(heads=4, eval_capacity="fraction"), **BASE)
    assert MoE.cp_requirements(ok, 2) is None                   # no training capacity: dropless either way
    assert "model.moe.eval_capacity=fraction" in (MoE.cp_requirements(drops, 2) or "")


def test_released_export_gives_our_logits(tmp_path):
    """The remote-code export carries the released settings (placement offset, evaluation
    capacity with drops): transformers gives our eval-mode logits, from-hf restores the config."""
    from transformers import AutoModelForCausalLM

    from polytron.pretrain import checkpoint as ckpt
    from polytron.pretrain.config import RunConfig
    from polytron.tools.convert_checkpoint import from_hf, to_hf
    from tests.checkpoint.helpers import assert_close, hf_logits, our_logits, train_spm
    cfg = ModelConfig(arch="moe", mlp="mh_moe", rope_theta=500.0, moe=MoEConfig(
        num_experts=4, top_k=2, expert_ffn_hidden_size=32, heads=4, every=2, reference="released"),
        **{**BASE, "vocab_size": 384, "num_layers": 4, "max_seq_len": 64})
    cfg.validate()
    model = build_model(cfg, seed=3).eval()
    run = RunConfig(model=cfg)
    run.data.tokenizer = train_spm(str(tmp_path / "spm"))
    state = {"iteration": 1, "consumed_samples": 0, "consumed_tokens": 0, "config": run.to_dict()}
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save(str(tmp_path / "run" / "checkpoints"), 1, [model], opt, state, keep_last=1).finalize()
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                              trust_remote_code=True).float().eval()
    tokens = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(5))
    ours = our_logits(model, tokens)
    assert_close(ours, hf_logits(hf, tokens))
    model.layers["1"].mlp.eval_capacity = "dropless"           # the capacity matters at this size
    assert not torch.allclose(our_logits(model, tokens), ours, atol=1e-4)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    restored = ckpt.read_trainer_state(str(tmp_path / "back" / "checkpoint"))["config"]["model"]
    assert restored["moe"] == run.to_dict()["model"]["moe"]
