"""BitNet b1.58 against the training-tips FAQ's formulas, written here in plain PyTorch, at 1e-5.

* BitLinear in training (FAQ figure 3): x_n = RMSNorm(x) (no gain); per-token absmax 8-bit
  activations x_q = round(clip(x_n * 127 / max|x_n|, -128, 127)) * max|x_n| / 127; absmean
  ternary weights w_q = round(clip(w / mean|w|, -1, 1)) * mean|w|; y = x_q w_q^T, both
  through the straight-through estimator (x + (q(x) - x).detach()). Forward and gradients.
* The packed inference form (FAQ figure 4): the offline ternary matrix, the integer matmul,
  then the two scales applied after it, for both transformers classes' ``weight_scale``
  conventions (AutoBitLinear stores beta, BitLinear stores 1 / beta; model/bitnet/packed.py).
* The FAQ's b1.58 block (``bitnet.block_prenorm: false``): the LLaMA block with every
  projection a BitLinear and no RMSNorm before attention and SwiGLU,
  h = x + W_o(Attn(RoPE(W_q x), RoPE(W_k x), W_v x)), out = h + W_2(silu(W_1 h) * W_3 h).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.bitnet.layers import BitLinear, NoPreNormBlock
from polytron.model.bitnet.packed import PackedBitLinear, _as_ours
from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.layers import Context, select_rope
from polytron.model.transformer import build_model

EPS = 1e-6


def rms_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    scale = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def ref_bitlinear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """FAQ figure 3: RMSNorm, then both quantizers through the STE, then the matmul."""
    x_norm = rms_norm(x)
    x_quant = x_norm + (activation_quant(x_norm) - x_norm).detach()
    w_quant = w + (weight_quant(w) - w).detach()
    return F.linear(x_quant, w_quant)


def grads(out, inputs, seed=0):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * w).sum(), inputs)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- BitLinear

def test_training_bitlinear_with_inner_norm_is_the_faqs():
    layer = BitLinear(48, 40, bias=False, norm_eps=EPS)
    nn.init.normal_(layer.weight, std=0.05)
    x = (torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    got, want = layer(x), ref_bitlinear(x, layer.weight)
    close(got, want)
    for a, b in zip(grads(got, (x, layer.weight)), grads(want, (x, layer.weight))):
        close(a, b)


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_packed_bitlinear_is_the_faqs_inference_form(linear_class):
    """y = (x_int8 @ T^T) / w_scale / x_scale (FAQ figure 4, w_scale = 1 / mean|W|), from the
    packed tensors as either transformers class stores them."""
    layer = BitLinear(48, 36, bias=False, norm_eps=EPS)
    nn.init.normal_(layer.weight, std=0.05)
    packed = PackedBitLinear.from_bitlinear(layer)
    beta = packed.weight_scale.clone()
    stored = beta if linear_class == "autobitlinear" else 1.0 / beta      # what the export writes
    loaded = _as_ours("w.weight_scale", {"w.weight_scale": stored}, linear_class, torch.float32)
    packed.weight_scale.copy_(loaded)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2)) * 2
    x_n = rms_norm(x)
    x_scale = 127.0 / x_n.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    x_int = (x_n * x_scale).round().clamp(-128, 127)
    w_scale = 1.0 / layer.weight.abs().mean().clamp(min=1e-5)
    t = (layer.weight * w_scale).round().clamp(-1, 1)
    want = F.linear(x_int, t) / w_scale / x_scale
    with torch.no_grad():
        close(packed(x), want)
        close(packed(x), layer(x))


# ---------------------------------------------------------------- the FAQ block

def faq_config() -> ModelConfig:
    cfg = from_dict(ModelConfig, dict(arch="bitnet", linear="bitlinear", vocab_size=64, hidden_size=32,
                                      num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                                      max_seq_len=32, norm_eps=EPS, init_std=0.05,
                                      bitnet=dict(linear_norm=True, block_prenorm=False)), prefix="model.")
    cfg.validate()
    return cfg


def ref_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """LLaMA's RoPE (halves paired, theta^(-2i/hd)) on (B, T, H, hd) at positions 0..T-1."""
    T, hd = x.shape[1], x.shape[-1]
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = (torch.arange(T, dtype=torch.float64)[:, None] * freq).float()[None, :, None, :]   # (1, T, 1, hd/2)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def ref_faq_block(block, x: torch.Tensor, cfg) -> torch.Tensor:
    """x + attention(x), then + SwiGLU: every projection ref_bitlinear, no pre-norm."""
    B, T, _ = x.shape
    a, m, hd = block.attention, block.mlp, cfg.head_dim
    q = ref_rope(ref_bitlinear(x, a.wq.weight).view(B, T, -1, hd), cfg.rope_theta).transpose(1, 2)
    k = ref_rope(ref_bitlinear(x, a.wk.weight).view(B, T, -1, hd), cfg.rope_theta).transpose(1, 2)
    v = ref_bitlinear(x, a.wv.weight).view(B, T, -1, hd).transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    y = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    h = x + ref_bitlinear(y, a.wo.weight)
    return h + ref_bitlinear(F.silu(ref_bitlinear(h, m.w1.weight)) * ref_bitlinear(h, m.w3.weight), m.w2.weight)


def test_faq_block_has_no_pre_norms():
    model = build_model(faq_config(), seed=1)
    block = model.layers["0"]
    assert isinstance(block, NoPreNormBlock)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith("layers.") and "norm" in n], names
    assert all(isinstance(m, BitLinear) and m.norm_eps == EPS for m in (block.attention.wq, block.mlp.w2))


@pytest.mark.parametrize("scale", [0.05, 4.0], ids=["small-residual", "large-residual"])
def test_faq_block_matches_the_faqs_equations(scale):
    """Residual stream scales where a pre-norm would show: rms(x) = 0.05 (eps and the double
    normalization matter) and 4 (an extra norm would shrink what the block adds)."""
    cfg = faq_config()
    model = build_model(cfg, seed=2)
    block = model.layers["0"]
    T = 9
    x = (torch.randn(2, T, cfg.hidden_size, generator=torch.Generator().manual_seed(3)) * scale).requires_grad_()
    cos, sin = select_rope(model.rope, T, None)
    got = block(x, Context(cos=cos, sin=sin, mask=None))
    want = ref_faq_block(block, x, cfg)
    close(got, want, atol=1e-5 * max(scale, 1.0))
    params = [x, block.attention.wq.weight, block.attention.wo.weight, block.mlp.w1.weight, block.mlp.w2.weight]
    for a, b in zip(grads(got, params), grads(want, params)):
        close(a, b, atol=1e-5 * max(scale, 1.0))


# ---------------------------------------------------------------- the FAQ block with an MoE MLP

def faq_moe_config(mlp: str, heads: int = 1, quantize=None, validate: bool = True) -> ModelConfig:
    bitnet = dict(linear_norm=True, block_prenorm=False, **({"quantize": quantize} if quantize else {}))
    cfg = from_dict(ModelConfig, dict(arch="bitnet", linear="bitlinear", mlp=mlp, vocab_size=64, hidden_size=32,
                                      num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=32,
                                      norm_eps=EPS, init_std=0.05, moe=dict(num_experts=4, top_k=2, heads=heads),
                                      bitnet=bitnet), prefix="model.")
    if validate:
        cfg.validate()
    return cfg


@pytest.mark.parametrize("mlp,heads,quantize,expect", [
    ("moe", 1, None, "model.mlp=moe routes the block input itself"),
    ("mh_moe", 1, None, "model.mlp=mh_moe routes the block input itself"),
    ("mh_moe", 2, ["q", "k", "v", "o", "gate", "up", "down"], "model.bitnet.quantize lacks proj"),
], ids=["moe", "mh_moe-one_head", "mh_moe-plain_split"])
def test_faq_block_refuses_an_mlp_reading_the_raw_residual(mlp, heads, quantize, expect):
    """Without pre-norms an MoE router (fp32, never a BitLinear) would read the residual
    stream unnormalized: refused at validation, one line naming the key."""
    from polytron.model.configlib import ConfigError
    with pytest.raises(ConfigError) as e:
        faq_moe_config(mlp, heads, quantize)
    assert "model.bitnet.block_prenorm" in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)


def test_faq_block_mh_moe_reads_its_input_only_through_bitlinear_norms():
    """The allowed MoE form, mh_moe with heads > 1: the router reads the BitLinear split
    projection, so the MLP's output does not depend on the residual's scale (every read
    RMS-normalizes; only eps / scale^2 moves it). The same MLP with a plain split (what the
    refusal above prevents) routes scaled inputs differently."""
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    for quantized_split in (True, False):
        cfg = faq_moe_config("mh_moe", 2)
        if not quantized_split:                       # bypasses the refusal to show what it prevents
            cfg.bitnet.quantize = [r for r in cfg.bitnet.quantize if r != "proj"]
        block = build_model(cfg, seed=6).layers["0"]
        assert isinstance(block, NoPreNormBlock)
        with torch.no_grad():
            outs = [block.mlp(x * c) for c in (1.0, 0.5, 8.0)]
        same = all(torch.allclose(o, outs[0], rtol=1e-4, atol=1e-5) for o in outs[1:])
        assert same == quantized_split
