"""The MoE and MH-MoE MLP kinds on one device (model/moe): routing, combine, losses, balancing,
capacity, MH-MoE's split/merge, expert matmul backends, accounting, config and layout errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.config import ModelConfig
from polytron.model.configlib import ConfigError
from polytron.model.hooks import StatsCollector, step_scope
from polytron.model.layers import LINEARS, layer_mlp
from polytron.model.moe.config import MoEConfig
from polytron.model.transformer import build_model
from polytron.parallel.config import ParallelConfig
from polytron.parallel.mesh import LayoutError, ParallelDims

BASE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
            max_seq_len=32)


def config(mlp: str = "moe", arch: str = "moe", **moe) -> ModelConfig:
    moe = {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 24, **moe}
    base = {**BASE, **moe.pop("model", {})}
    cfg = ModelConfig(arch=arch, mlp=mlp, moe=MoEConfig(**moe), **base)
    cfg.validate()
    return cfg


def set_gemm(model: nn.Module, gemm: str) -> None:
    for m in model.modules():
        if hasattr(m, "gemm"):
            m.gemm = gemm


def swiglu(x, gate, up, down, bias=None):
    b_gate, b_up = (None, None) if bias is None else (bias[0], bias[1])
    h = F.silu(F.linear(x, gate, b_gate)) * F.linear(x, up, b_up)
    return F.linear(h, down, None if bias is None else bias[2])


def reference_mix(moe, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer computed token by token, from the definitions (docs/moe.md)."""
    r, ex = moe.router, moe.experts
    logits = x.float() @ r.weight.float().t()
    probs = logits.softmax(-1) if r.score == "softmax" else logits.sigmoid()
    choice = probs + r.expert_bias if r.rate > 0 else probs
    top = choice.topk(moe.top_k, dim=-1).indices
    w = probs.gather(1, top)
    if r.normalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * r.scale
    cap = moe.capacity(x.shape[0])
    used = [0] * moe.num_experts
    out = torch.zeros_like(x)
    bias = lambda e: None if ex.gate.bias is None else (ex.gate.bias[e], ex.up.bias[e], ex.down.bias[e])  # noqa
    for slot in range(moe.top_k):                  # first choices first, then by position
        for t in range(x.shape[0]):
            e = int(top[t, slot])
            if cap is not None and used[e] >= cap:
                continue
            used[e] += 1
            y = swiglu(x[t:t + 1], ex.gate.weight[e], ex.up.weight[e], ex.down.weight[e], bias(e))
            out[t] += w[t, slot] * y[0]
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("gemm", ["grouped", "batched", "looped"])
def test_experts_copied_from_one_dense_mlp_equal_the_dense_model(gemm):
    """Renormalized top-k over identical experts, no shared experts: routing and combine are
    lossless, so the logits are the dense model's."""
    dense_cfg = ModelConfig(arch="llama", **{**BASE, "ffn_hidden_size": 24})
    dense = build_model(dense_cfg, seed=1).eval()
    moe_cfg = config(score="softmax", normalize_top_k=True)
    moe = build_model(moe_cfg, seed=2).eval()
    set_gemm(moe, gemm)
    state = dense.state_dict()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in state:
                p.copy_(state[name])
        for i in range(BASE["num_layers"]):
            ex = moe.layers[str(i)].mlp.experts
            for proj, src in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                weight = getattr(ex, proj).weight
                weight.copy_(state[f"layers.{i}.mlp.{src}.weight"].expand_as(weight))
    tokens = torch.randint(0, BASE["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens), dense(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [
    dict(score="softmax"),
    dict(score="sigmoid", normalize_top_k=False, route_scale=2.5, bias_update_rate=1e-3, shared_experts=1),
    dict(score="softmax", capacity_factor=0.75, model={"mlp_bias": True}),
], ids=["softmax", "sigmoid-bias-shared-scale", "capacity-bias"])
def test_layer_matches_token_by_token_reference(kw):
    cfg = config(**kw)
    model = build_model(cfg, seed=3)
    moe = model.layers["1"].mlp
    with torch.no_grad():
        if moe.router.rate > 0:
            moe.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
        for p in moe.experts.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(moe.mix(x), reference_mix(moe, x), atol=1e-5, rtol=1e-5)


def test_backends_agree_in_forward_and_backward():
    cfg = config(capacity_factor=1.0, shared_experts=1, model={"mlp_bias": True})
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    results = {}
    for gemm in ("grouped", "batched", "looped"):
        model = build_model(cfg, seed=7)
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "gemm"):
                    m.gate.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        set_gemm(model, gemm)
        loss = model(tokens).float().pow(2).mean()
        loss.backward()
        results[gemm] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_loss, ref_grads = results["looped"]
    for gemm in ("grouped", "batched"):
        torch.testing.assert_close(results[gemm][0], ref_loss, atol=1e-6, rtol=1e-6)
        for n, g in ref_grads.items():
            torch.testing.assert_close(results[gemm][1][n], g, atol=1e-6, rtol=1e-5, msg=f"{gemm}: {n}")


def test_idle_experts_get_zero_gradients():
    """All rows routed to expert 0 (a huge balancing bias): the others run on no rows."""
    cfg = config(bias_update_rate=1e-3, top_k=1)
    for gemm in ("grouped", "batched", "looped"):
        model = build_model(cfg, seed=1)
        set_gemm(model, gemm)
        for i in range(BASE["num_layers"]):
            model.layers[str(i)].mlp.router.expert_bias.copy_(torch.tensor([100.0, 0, 0, 0]))
        model(torch.randint(0, 97, (2, 8))).sum().backward()
        grad = model.layers["0"].mlp.experts.down.weight.grad
        assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0, gemm


# ---------------------------------------------------------------- losses, statistics, balancing

def test_balance_and_z_loss_values_and_their_gradients():
    cfg = config(num_experts=2, top_k=1, aux_loss_coeff=0.1, z_loss_coeff=0.01,
                 model={"hidden_size": 4, "num_heads": 2, "num_kv_heads": 1})
    moe = build_model(cfg, seed=0).layers["0"].mlp
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [0, 1, 0, 0], [3, 0, 0, 0], [1, 0, 0, 0]])
    logits = x[:, :2]
    probs = logits.softmax(-1)
    f = torch.tensor([0.75, 0.25])                          # experts chosen: 0, 1, 0, 0
    want_balance = 0.1 * 2 * (f * probs.mean(0)).sum()
    want_z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    stats = StatsCollector()
    with step_scope(aux_scale=1.0, stats=stats):
        (moe.mix(x) * 0).sum().backward()                   # only the auxiliary losses train
    got = {k: float(v[1]) for k, v in stats.values.items()}
    assert math.isclose(got["aux/moe_balance_l0"], float(want_balance), rel_tol=1e-6)
    assert math.isclose(got["aux/moe_z_l0"], float(want_z), rel_tol=1e-6)
    assert got["moe/load_max_l0"] == 1.5 and got["moe_load.l0.e1"] == 0.25
    w = moe.router.weight.detach().clone().requires_grad_()
    lg = x @ w.t()
    p = lg.softmax(-1)
    (0.1 * 2 * (f * p.mean(0)).sum() + 0.01 * torch.logsumexp(lg, -1).square().mean()).backward()
    torch.testing.assert_close(moe.router.weight.grad, w.grad)


def test_capacity_drops_in_training_only_and_reports_it():
    cfg = config(capacity_factor=0.5, top_k=1)
    moe = build_model(cfg, seed=0).layers["0"].mlp
    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    stats = StatsCollector()
    with step_scope(aux_scale=1.0, stats=stats):
        moe.mix(x)
    counts = torch.bincount(reference_topk(moe, x)[:, 0], minlength=4)
    want = float((counts - counts.clamp(max=2)).sum()) / 16        # C = ceil(0.5 * 16 / 4) = 2
    assert math.isclose(float(stats.values["moe/dropped_l0"][1]), want) and want > 0
    moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(moe.mix(x), reference_mix(moe, x), atol=1e-5, rtol=1e-5)   # dropless


def reference_topk(moe, x):
    return (x @ moe.router.weight.t()).softmax(-1).topk(moe.top_k, dim=-1).indices


def test_balancing_bias_moves_against_the_observed_load():
    cfg = config(bias_update_rate=0.01, score="sigmoid")
    model = build_model(cfg, seed=0)
    router = model.layers["0"].mlp.router
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens)                                    # evaluation: nothing counted
    model(tokens)                                        # outside a step: nothing counted
    assert router.expert_load.sum() == 0
    with step_scope(aux_scale=0.5, stats=None):
        model(tokens)
        model(tokens)
    load = router.expert_load.clone()
    assert load.sum() == 2 * 32 * 2                      # two micro-batches of 32 tokens, top-2
    router.post_optimizer_step()
    torch.testing.assert_close(router.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert router.expert_load.sum() == 0
    assert {"layers.0.mlp.router.expert_bias", "layers.0.mlp.router.expert_load"} <= set(model.state_dict())


def test_router_is_fp32_under_autocast():
    cfg = config()
    moe = build_model(cfg, seed=0).layers["0"].mlp
    x = torch.randn(8, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.router(x.bfloat16())
    assert routing.weights.dtype == torch.float32 and moe.router.weight.dtype == torch.float32


# ---------------------------------------------------------------- MH-MoE

def test_mh_moe_routes_sub_tokens_and_merges():
    cfg = config("mh_moe", heads=4, capacity_factor=1.0, shared_experts=1)
    model = build_model(cfg, seed=0)
    layer = model.layers["0"].mlp
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    d, h = cfg.hidden_size, 4
    sub = layer.split(x).reshape(2 * 5 * h, d // h)          # each token: h consecutive chunks
    assert layer.router.weight.shape == (4, d // h) and layer.experts.gate.weight.shape == (4, 24, d // h)
    assert layer.capacity(sub.shape[0]) == math.ceil(1.0 * 40 * 2 / 4)     # counts sub-tokens
    want = layer.merge(reference_mix(layer, sub).reshape(2, 5, d))
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_mh_moe_init_follows_the_released_code():
    d = 256
    cfg = config("mh_moe", heads=4, model={"hidden_size": d, "num_heads": 4, "num_kv_heads": 2})
    layer = build_model(cfg, seed=0).layers["0"].mlp
    bound = math.sqrt(6.0 / (2 * d))
    split, merge = layer.split.weight, layer.merge.weight
    assert split.abs().max() <= bound / math.sqrt(2) and split.abs().max() > 0.95 * bound / math.sqrt(2)
    with torch.no_grad():
        assert math.isclose(float(split.std()), bound / math.sqrt(2) / math.sqrt(3), rel_tol=0.02)
        assert merge.abs().max() <= bound and math.isclose(float(merge.std()), bound / math.sqrt(3), rel_tol=0.02)
    assert torch.count_nonzero(layer.merge.bias) == 0
    assert 0 < layer.split.bias.abs().max() <= 1 / math.sqrt(d)


def test_mh_moe_with_one_head_is_the_plain_moe():
    moe, mh = config("moe"), config("mh_moe", heads=1)
    a, b = build_model(moe, seed=4), build_model(mh, seed=4)
    assert a.state_dict().keys() == b.state_dict().keys()
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(a(tokens), b(tokens), atol=0, rtol=0)


# ---------------------------------------------------------------- slots, placement, accounting

def test_placement_every_n_and_first_dense():
    cfg = config(every=2, first_dense=1, model={"num_layers": 6})
    assert [layer_mlp(cfg, i) for i in range(6)] == ["swiglu", "swiglu", "moe", "swiglu", "moe", "swiglu"]
    model = build_model(cfg, seed=0)
    assert type(model.layers["1"].mlp).__name__ == "SwiGLU" and type(model.layers["2"].mlp).__name__ == "MoE"


class _AbsMeanLinear(nn.Module):
    """A test linear kind: the weight divided by its mean magnitude (a BitLinear-like whole-weight
    statistic), so experts built from the slot must compute it per expert."""

    def __init__(self, i: int, o: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(o, i))
        self.bias = nn.Parameter(torch.empty(o)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight / self.weight.abs().mean(), self.bias)


def test_experts_use_the_linear_slot():
    LINEARS["test_absmean"] = lambda cfg, i, o, bias, role: _AbsMeanLinear(i, o, bias)
    try:
        cfg = config(model={"linear": "test_absmean"})
        out = {}
        for gemm in ("batched", "looped"):       # batched: the slot module vmapped over the experts
            model = build_model(cfg, seed=0)
            set_gemm(model, gemm)
            loss = model(torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))).pow(2).mean()
            loss.backward()
            out[gemm] = (loss.detach(), model.layers["0"].mlp.experts.up.weight.grad.clone())
        ex = model.layers["0"].mlp.experts
        x = torch.randn(3, cfg.hidden_size)
        w = ex.gate.weight[2]
        torch.testing.assert_close(ex.gate.one(2, x), x @ (w / w.abs().mean()).t())
        for asked, used in (("batched", "batched"), ("grouped", "looped"), ("auto", "looped")):
            ex.gemm = asked
            assert ex.backend(x) == used, asked          # no grouped_mm for another linear kind
        torch.testing.assert_close(out["batched"][0], out["looped"][0])
        grad = out["looped"][1]               # the 1/mean|W| scale amplifies rounding of small elements
        torch.testing.assert_close(out["batched"][1], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))
    finally:
        del LINEARS["test_absmean"]


def test_accounting_counts_activated_parameters():
    cfg = config(shared_experts=1, model={"num_layers": 2})
    d, f, E, k = cfg.hidden_size, 24, 4, 2
    moe_total = E * d + E * 3 * d * f + 3 * d * f
    moe_active = E * d + k * 3 * d * f + 3 * d * f
    from polytron.model.accounting import counts
    c = counts(cfg)
    assert c.matmul - c.active == 2 * (moe_total - moe_active)
    mh = config("mh_moe", heads=4, model={"num_layers": 2})
    w = d // 4
    per_layer_total = E * w + E * 3 * w * f + 2 * d * d
    per_layer_active = 4 * (E * w + k * 3 * w * f) + 2 * d * d
    c = counts(mh)
    assert c.matmul - c.active == 2 * (per_layer_total - per_layer_active)
    assert mh.flops_per_token(16) == 6 * c.active + c.attention_flops_per_pos * 16


def test_no_host_reads_in_a_dropless_or_capacity_step():
    from tests.pretrain.test_step import ReadbackCounter
    for kw in ({}, {"capacity_factor": 1.0, "shared_experts": 1, "bias_update_rate": 1e-3}):
        model = build_model(config(**kw), seed=0)
        set_gemm(model, "grouped")
        tokens = torch.randint(0, 97, (2, 16))
        with ReadbackCounter() as c, step_scope(aux_scale=1.0, stats=StatsCollector()):
            model(tokens).float().pow(2).mean().backward()
            for m in model.modules():
                if hasattr(m, "post_optimizer_step"):
                    m.post_optimizer_step()
        assert c.count == 0, "\n".join(c.where)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw,needle", [
    (dict(top_k=5), "model.moe.top_k"),
    (dict(num_experts=0), "model.moe.num_experts"),
    (dict(heads=2), "model.moe.heads"),
    (dict(first_dense=2), "model.moe.first_dense"),
    (dict(capacity_factor=-1.0), "model.moe.capacity_factor"),
    (dict(route_scale=0.0), "model.moe.route_scale"),
])
def test_config_errors_name_the_key(kw, needle):
    with pytest.raises(ConfigError) as e:
        config(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_moe_arch_needs_an_moe_mlp_and_heads_must_divide():
    with pytest.raises(ConfigError, match="model.mlp"):
        ModelConfig(arch="moe", mlp="swiglu", **BASE).validate()
    with pytest.raises(ConfigError, match="model.moe.heads"):
        config("mh_moe", heads=5)


@pytest.mark.parametrize("par,mlp,world,needle", [
    ({"expert": 2}, "swiglu", 2, "needs a mixture-of-experts model"),
    ({"expert": 3}, "moe", 3, "parallel.expert=3 must divide model.moe.num_experts=4"),
    ({"expert": 2, "pipeline": 2}, "moe", 2, "must divide the data-parallel shard degree 1"),
])
def test_expert_parallel_layout_errors(par, mlp, world, needle):
    cfg = config() if mlp == "moe" else ModelConfig(**BASE)
    with pytest.raises(LayoutError) as e:
        ParallelDims.resolve(ParallelConfig(**par), cfg, world)
    assert needle in str(e.value) and "\n" not in str(e.value)
