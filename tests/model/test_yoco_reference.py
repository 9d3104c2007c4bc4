"""YOCO against its equations, written here in plain PyTorch (no polytron kernels), at 1e-5.

From the paper (Sun et al. 2024, section 2) and the released code's conventions:

* gated retention: S_t = gamma_t S_{t-1} + k_t^T v_t, o_t = q_t S_t (recurrent form);
  o = (Q K^T * D) V with D[t, s] = prod_{s < i <= t} gamma_i for s <= t, else 0 (parallel
  form); our chunkwise kernel, our one-step kernel and the whole ``retention`` layer
  (gamma = sigmoid(x W_gamma)^(1/tau), keys scaled by hd^-1/2, a non-affine RMSNorm per
  head, swish output gate) against them, values and gradients;
* the sliding window: query t sees keys t - W < s <= t (itself included), softmax over
  exactly those, the whole ``swa`` layer against it;
* RoPE as the released code rotates: interleaved pairs (x_{2i}, x_{2i+1}) turned by
  position * theta^(-i/(hd/2 - 1)) (``theta ** -linspace(0, 1, hd/2)``), as a complex
  multiplication; and the standard convention for comparison.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.layers import Context, rope_table, select_rope
from polytron.model.transformer import build_model
from polytron.model.yoco.kernels import chunk_retention, recurrent_retention, sliding_window_attention
from polytron.model.yoco.rope import rope

ATOL = 1e-5
RELEASED = {"rope_pairing": "interleaved", "rope_frequencies": "released"}


def yoco_cfg(kind: str, **yoco) -> ModelConfig:
    cfg = from_dict(ModelConfig, dict(arch="yoco", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2, ffn_hidden_size=48, max_seq_len=64, rope_theta=500.0,
                                      init_std=0.2, yoco=dict(self_decoder=kind, sliding_window=5,
                                                              retention_chunk=4, **yoco)), prefix="model.")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- references

def ref_retention_recurrent(q, k, v, gamma):
    """S_t = gamma_t S_{t-1} + k_t^T v_t; o_t = q_t S_t. q, k (B, H, T, dk), v (B, H, T, dv), gamma (B, H, T)."""
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1])
    out = []
    for t in range(T):
        S = gamma[:, :, t, None, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(out, dim=2)


def ref_retention_parallel(q, k, v, gamma):
    """(Q K^T * D) V, D[t, s] = prod_{s < i <= t} gamma_i (s <= t)."""
    T = q.shape[2]
    D = torch.zeros(*gamma.shape[:2], T, T, dtype=q.dtype)
    for t in range(T):
        for s in range(t + 1):
            D[:, :, t, s] = gamma[:, :, s + 1:t + 1].prod(-1)
    return (q @ k.transpose(-1, -2) * D) @ v


def ref_window_attention(q, k, v, window: int):
    """softmax over keys t - W < s <= t, scale hd^-1/2; GQA by repeating key/value heads."""
    T, hd = q.shape[2], q.shape[3]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (s <= t) & (s > t - window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def ref_rope(x, positions, theta: float, released: bool):
    """(B, T, H, hd) rotated as the released code (interleaved pairs, theta ** -linspace(0, 1, hd/2))
    or as Llama (halves paired, theta^(-2i/hd)), as complex numbers times e^(i * pos * freq)."""
    half = x.shape[-1] // 2
    if released:
        freq = 1.0 / (theta ** torch.linspace(0, 1, half, dtype=torch.float32))
    else:
        freq = 1.0 / (theta ** (torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])).float()
    turn = torch.polar(torch.ones(len(positions), half), positions.float()[:, None] * freq)   # (T, hd/2)
    turn = turn[None, :, None, :]
    if released:
        z = torch.view_as_complex(x.unflatten(-1, (half, 2)).contiguous())                    # (B, T, H, hd/2)
        return torch.view_as_real(z * turn).flatten(-2)
    z = torch.complex(x[..., :half], x[..., half:])
    r = z * turn
    return torch.cat([r.real, r.imag], dim=-1)


def ref_retention_layer(layer, x, positions, released: bool, theta: float):
    """The gated retention layer from the paper's equations with the layer's weights."""
    B, T, _ = x.shape
    H, hd = layer.num_heads, layer.head_dim
    q = ref_rope(F.linear(x, layer.wq.weight, layer.wq.bias).view(B, T, H, hd), positions, theta, released)
    k = ref_rope(F.linear(x, layer.wk.weight, layer.wk.bias).view(B, T, H, hd), positions, theta, released)
    v = F.linear(x, layer.wv.weight, layer.wv.bias).view(B, T, H, hd)
    gamma = torch.sigmoid(F.linear(x, layer.wgt.weight, layer.wgt.bias)) ** (1.0 / layer.tau)   # (B, T, H)
    o = ref_retention_recurrent(q.transpose(1, 2), k.transpose(1, 2) / math.sqrt(hd), v.transpose(1, 2),
                                gamma.transpose(1, 2))                                        # (B, H, T, hd)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.eps)
    gate = F.silu(F.linear(x, layer.wg.weight, layer.wg.bias))
    return F.linear(gate * o.transpose(1, 2).reshape(B, T, -1), layer.wo.weight, layer.wo.bias)


def ref_swa_layer(layer, x, positions, released: bool, theta: float):
    B, T, _ = x.shape
    hd = layer.head_dim
    q = ref_rope(layer.wq(x).view(B, T, -1, hd), positions, theta, released).transpose(1, 2)
    k = ref_rope(layer.wk(x).view(B, T, -1, hd), positions, theta, released).transpose(1, 2)
    v = layer.wv(x).view(B, T, -1, hd).transpose(1, 2)
    y = ref_window_attention(q, k, v, layer.window)
    return layer.wo(y.transpose(1, 2).reshape(B, T, -1))


def grads(out, inputs, seed=0):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * w).sum(), inputs, retain_graph=True)


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------- retention: three forms

@pytest.mark.parametrize("T,chunk", [(13, 4), (16, 16), (9, 1)])
def test_retention_chunkwise_recurrent_and_parallel_forms_agree(T, chunk):
    gen = torch.Generator().manual_seed(T * 10 + chunk)
    q = torch.randn(2, 3, T, 8, generator=gen, requires_grad=True)
    k = (torch.randn(2, 3, T, 8, generator=gen) * 8 ** -0.5).requires_grad_()
    v = torch.randn(2, 3, T, 6, generator=gen, requires_grad=True)
    logit = (torch.randn(2, 3, T, generator=gen) * 2).requires_grad_()
    gamma = torch.sigmoid(logit) ** (1 / 4)                    # tau = 4: decays 0.6 .. 1
    log_decay = F.logsigmoid(logit) / 4
    recurrent = ref_retention_recurrent(q, k, v, gamma)
    parallel = ref_retention_parallel(q, k, v, gamma)
    chunked, state = chunk_retention(q, k, v, log_decay, chunk)
    stepped, step_state = recurrent_retention(q, k, v, log_decay, torch.zeros(2, 3, 8, 6))
    close(parallel, recurrent)
    close(chunked, recurrent)
    close(stepped, recurrent)
    close(state, step_state)
    want = grads(recurrent, (q, k, v, logit))
    for form in (parallel, chunked, stepped):
        for a, b in zip(grads(form, (q, k, v, logit)), want):
            close(a, b, atol=1e-4 if form is parallel else ATOL)


# ---------------------------------------------------------------- the sliding window

@pytest.mark.parametrize("T,window", [(12, 5), (12, 1), (7, 20)])
def test_sliding_window_is_the_papers_mask(T, window):
    gen = torch.Generator().manual_seed(T + window)
    q = torch.randn(2, 4, T, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, T, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, T, 8, generator=gen, requires_grad=True)
    got = sliding_window_attention(q, k, v, window, None, block=4)
    want = ref_window_attention(q, k, v, window)
    close(got, want)
    for a, b in zip(grads(got, (q, k, v)), grads(want, (q, k, v))):
        close(a, b)


# ---------------------------------------------------------------- RoPE conventions

@pytest.mark.parametrize("released", [True, False], ids=["released", "standard"])
def test_rope_is_the_conventions_rotation(released):
    """Our table (frequencies from model.yoco.rope_frequencies) read in model.yoco.rope_pairing
    equals the complex rotation of the released code (interleaved, linspace) or Llama's."""
    cfg = yoco_cfg("swa", **(RELEASED if released else {}))
    T, start = 11, 40                                          # late positions: a wrong frequency shows
    cos, sin = select_rope(rope_table(cfg), T, None, start)
    x = torch.randn(2, T, 3, cfg.head_dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    got = rope(x, cos, sin, cfg.yoco.rope_pairing)
    want = ref_rope(x, torch.arange(start, start + T), cfg.rope_theta, released)
    close(got, want)
    for a, b in zip(grads(got, (x,)), grads(want, (x,))):
        close(a, b)


def test_released_rope_differs_from_ours():
    """Guard against a convention silently falling back: the two rotations are far apart."""
    x = torch.randn(1, 9, 2, 8, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(20, 29)
    assert (ref_rope(x, pos, 500.0, True) - ref_rope(x, pos, 500.0, False)).abs().max() > 0.1


# ---------------------------------------------------------------- whole layers

@pytest.mark.parametrize("released", [True, False], ids=["released", "standard"])
@pytest.mark.parametrize("kind", ["retention", "swa"])
def test_self_decoder_layer_matches_the_equations(kind, released):
    cfg = yoco_cfg(kind, **(RELEASED if released else {}))
    model = build_model(cfg, seed=3)
    layer = model.layers["0"].attention
    T = 13
    x = torch.randn(2, T, cfg.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True)
    cos, sin = select_rope(model.rope, T, None)
    got = layer(x, Context(cos=cos, sin=sin, mask=None))
    ref = ref_retention_layer if kind == "retention" else ref_swa_layer
    want = ref(layer, x, torch.arange(T), released, cfg.rope_theta)
    close(got, want)
    params = [x, layer.wq.weight, layer.wk.weight, layer.wv.weight, layer.wo.weight]
    for a, b in zip(grads(got, params), grads(want, params)):
        close(a, b)


@pytest.mark.parametrize("kind", ["retention", "swa"])
def test_released_rope_decodes_like_its_full_forward(kind):
    """The cache path rotates each new token at its own position in the released convention:
    token-by-token generation equals the full forward."""
    from polytron.model.generate import stream
    model = build_model(yoco_cfg(kind, **RELEASED), seed=5).eval()
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    steps = list(stream(model, prompt, 9))
    logits = torch.stack([lg for lg, _ in steps], 1)                     # (B, 9, V)
    new = torch.stack([t for _, t in steps], 1)
    with torch.no_grad():
        full = model(torch.cat([prompt, new], 1))
    close(logits, full[:, prompt.shape[1] - 1:-1])


@pytest.mark.parametrize("kind", ["retention", "swa"])
def test_convert_pairing_keeps_the_logits(kind):
    """Released-convention weights, permuted by convert_pairing, run as rotate_half with the
    same logits; converting back gives the original tensors; unconverted weights do not."""
    from polytron.model.yoco.rope import convert_pairing
    released = yoco_cfg(kind, **RELEASED)
    ours = yoco_cfg(kind, rope_frequencies="released")
    src = build_model(released, seed=7)
    dst = build_model(ours, seed=0)
    dst.load_state_dict(convert_pairing(src.state_dict(), released, "rotate_half"))
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        close(dst(x), src(x))
        back = convert_pairing(dst.state_dict(), ours, "interleaved")
        assert all(torch.equal(back[k], v) for k, v in src.state_dict().items())
        dst.load_state_dict(src.state_dict())
        assert (dst(x) - src(x)).abs().max() > 1e-3
