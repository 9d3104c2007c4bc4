"""BitNet b1.58 layers on one device: quantizers, STE gradients, roles, packing, config errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.bitnet import quant
from polytron.model.bitnet.layers import BitLinear, SubNorm
from polytron.model.bitnet.packed import PackedBitLinear, pack_model
from polytron.model.config import ModelConfig
from polytron.model.configlib import ConfigError, from_dict
from polytron.model.layers import make_linear
from polytron.model.transformer import build_model
from tests.distributed.layouts_bitnet import B2B4T, PAPER


def cfg_of(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=3,
                ffn_hidden_size=80, max_seq_len=32)
    cfg = from_dict(ModelConfig, {**base, **kw}, prefix="model.")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- the released code's formulas

def reference_weight(w: torch.Tensor) -> torch.Tensor:
    """weight_quant of the paper's training-tips code."""
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


def reference_activation(x: torch.Tensor) -> torch.Tensor:
    """activation_quant of the paper's training-tips code."""
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


# ---------------------------------------------------------------- quantizers

@pytest.mark.parametrize("shape", [(64, 48), (7, 13), (1, 5)])
def test_weights_are_ternary_times_absmean(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    beta = quant.weight_scale(w)
    assert torch.allclose(beta, w.abs().mean(), rtol=1e-6, atol=0)
    q = quant.quantize_weight(w)
    values = torch.unique(q / beta)
    assert set(values.tolist()) <= {-1.0, 0.0, 1.0} and len(values) == (3 if w.numel() > 20 else len(values))
    assert torch.equal(q, quant.ternary(w, beta) * beta)                     # exactly T * beta
    torch.testing.assert_close(q, reference_weight(w), rtol=1e-6, atol=0)
    assert torch.equal(quant.ternary(w, beta), (reference_weight(w) * (1 / beta)).round())


def test_activations_are_int8_per_token():
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    x[0, 0] *= 1000.0                       # a loud token does not change its neighbours' scale
    x[1, 2] = 0.0                           # a silent token stays zero
    s = quant.activation_scale(x)           # (3, 5, 1)
    ints = quant.activation_int8(x, s)
    assert torch.equal(ints, ints.round()) and ints.min() >= -128 and ints.max() <= 127
    assert torch.equal(ints.abs().amax(-1)[torch.arange(3) != 1], torch.full((2, 5), 127.0))
    assert torch.equal(ints[1, 2], torch.zeros(32))
    q = quant.quantize_activation(x)
    assert torch.equal(q, ints / s)                                          # exactly X / s per token
    torch.testing.assert_close(q, reference_activation(x), rtol=1e-6, atol=0)
    loud = quant.quantize_activation(x[0, 1:])
    assert torch.equal(q[0, 1:], loud)


def test_bitlinear_forward_is_the_papers():
    layer = BitLinear(48, 40, bias=True)
    nn.init.normal_(layer.weight, std=0.05)
    nn.init.normal_(layer.bias, std=0.05)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(2))
    want = F.linear(reference_activation(x), reference_weight(layer.weight), layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_ste_gradients_reach_latent_weights():
    """dL/dW = g^T Q8(x), dL/dx = g Q(W): the released code's x + (q(x) - x).detach()."""
    layer = BitLinear(48, 40, bias=False)
    nn.init.normal_(layer.weight, std=0.05)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(3), requires_grad=True)
    g = torch.randn(4, 40, generator=torch.Generator().manual_seed(4))
    (layer(x) * g).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    w_ref = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    xq = x_ref + (reference_activation(x_ref) - x_ref).detach()
    wq = w_ref + (reference_weight(w_ref) - w_ref).detach()
    (F.linear(xq, wq) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_training_moves_latent_weights_and_quantized_ones():
    cfg = cfg_of(**B2B4T)
    model = build_model(cfg, seed=1)
    layer = model.layers["0"].mlp.w2
    before_w, before_t = layer.weight.detach().clone(), quant.quantize_weight(layer.weight)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.weight, before_w)
    assert not torch.equal(quant.quantize_weight(layer.weight), before_t)


# ---------------------------------------------------------------- slot and roles

def test_roles_choose_bitlinear():
    cfg = cfg_of(linear="bitlinear")
    assert isinstance(make_linear(cfg, 8, 8, False, "q"), BitLinear)
    assert isinstance(make_linear(cfg, 8, 8, False, "proj"), BitLinear)
    for role in ("head", "router"):              # full precision unless configured
        layer = make_linear(cfg, 8, 8, False, role)
        assert type(layer) is nn.Linear and layer.role == role
    cfg = cfg_of(linear="bitlinear", bitnet={"quantize": ["head", "router"], "linear_norm": True})
    assert type(make_linear(cfg, 8, 8, False, "q")) is nn.Linear
    head = make_linear(cfg, 8, 8, False, "head")
    assert isinstance(head, BitLinear) and head.norm_eps == cfg.norm_eps


def test_variants_build_and_train_in_other_specs():
    """The 2B4T and paper variants, and BitLinear inside another architecture's layers."""
    from tests.distributed import hetero_spec  # noqa: F401  (arch test_hetero: carry, aux loss)
    for kw in (B2B4T, PAPER, {"arch": "test_hetero", "linear": "bitlinear", "num_layers": 4}):
        cfg = cfg_of(**kw)
        model = build_model(cfg, seed=0)
        bit = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
        assert bit and ("output" in bit) == ("head" in cfg.bitnet.quantize)
        tokens = torch.randint(0, cfg.vocab_size, (2, 9))
        model(tokens).float().pow(2).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
    assert isinstance(build_model(cfg_of(**B2B4T)).layers["0"].attention.sub_norm, SubNorm)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.bitnet\.quantize\[1\]"):
        cfg_of(linear="bitlinear", bitnet={"quantize": ["q", "qkv"]})
    with pytest.raises(ConfigError, match=r"model\.bitnet\.quantize.*arch=bitnet"):
        cfg_of(linear="bitlinear", bitnet={"quantize": ["q", "embedding"]})
    with pytest.raises(ConfigError, match=r"model\.bitnet\.linear_norm"):
        cfg_of(linear="bitlinear", bitnet={"linear_norm": "yes"})


# ---------------------------------------------------------------- packing

def test_packing_layout_is_transformers():
    """pack/unpack agree bit for bit with transformers' integrations/bitnet.py (run eagerly)."""
    import torch._dynamo
    from transformers.integrations.bitnet import pack_weights, unpack_weights
    t = torch.randint(-1, 2, (12, 5), generator=torch.Generator().manual_seed(5)).float()
    packed = quant.pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    with torch._dynamo.config.patch(disable=True):
        assert torch.equal(packed, pack_weights(t.clone()))
        assert torch.equal(unpack_weights(packed, torch.float32), t)
    odd = torch.randint(-1, 2, (7, 3), generator=torch.Generator().manual_seed(6)).float()
    assert torch.equal(quant.unpack_ternary(quant.pack_ternary(odd), 7), odd)


@pytest.mark.parametrize("variant", ["2b4t", "paper"])
def test_packed_model_equals_unpacked_exactly(variant):
    cfg = cfg_of(**(B2B4T if variant == "2b4t" else PAPER))
    model = build_model(cfg, seed=2).eval()
    packed = pack_model(copy.deepcopy(model))
    layers = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    assert layers and not any(isinstance(m, BitLinear) for m in packed.modules())
    latent = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, BitLinear))
    assert sum(m.packed_bytes() for m in layers) * 15 < latent        # ~2 of 32 bits
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(packed(tokens), model(tokens))


def test_bitlinear_inside_moe_experts():
    """MoE experts built from the linear slot: each expert a BitLinear with its own absmean,
    the same whether the slot module is vmapped over the experts or looped."""
    cfg = cfg_of(arch="moe", mlp="moe", linear="bitlinear",
                 moe={"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 24})
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    out = {}
    for gemm in ("batched", "looped"):
        model = build_model(cfg, seed=0)
        for m in model.modules():
            if hasattr(m, "gemm"):
                m.gemm = gemm
        loss = model(tokens).pow(2).mean()
        loss.backward()
        experts = model.layers["0"].mlp.experts
        out[gemm] = (loss.detach(), experts.up.weight.grad.clone())
    x = torch.randn(3, cfg.hidden_size)
    w = experts.gate.weight[2]
    torch.testing.assert_close(experts.gate.one(2, x), quant.bitlinear(x, w))
    assert torch.equal(out["batched"][0], out["looped"][0])
    torch.testing.assert_close(out["batched"][1], out["looped"][1], rtol=1e-5, atol=1e-9)
    assert out["looped"][1].abs().sum() > 0
