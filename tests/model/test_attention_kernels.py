"""The blocked CPU causal attention against PyTorch's SDPA: outputs and all gradients."""
import pytest
import torch
import torch.nn.functional as F

from polytron.model import attention_kernels as ak


def qkv(B, Hq, Hkv, T, hd, dtype=torch.float32, seed=0):
    """q, k, v in the layout the attention layer hands over: (B, H, T, hd) views of (B, T, H, hd)."""
    g = torch.Generator().manual_seed(seed)

    def one(h):
        return torch.randn(B, T, h, hd, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    return one(Hq), one(Hkv), one(Hkv)


def sdpa_reference(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def run(fn, q, k, v, grad):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("T,Hq,Hkv", [(512, 8, 4), (300, 4, 4), (257, 6, 2), (384, 4, 1)])
def test_blocked_matches_sdpa_fp32(T, Hq, Hkv):
    q, k, v = qkv(2, Hq, Hkv, T, 32)
    assert ak.use_blocked_cpu(q, k)
    grad = torch.randn(2, Hq, T, 32, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run(sdpa_reference, q, k, v, grad)
    out, grads = run(ak.causal_attention, q, k, v, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_blocked_is_causal():
    """Changing the last key/value changes only the last query's output."""
    q, k, v = qkv(1, 4, 2, 320, 16)
    with torch.no_grad():
        out = ak.causal_attention(q, k, v)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, -1] += 1.0
        v2[:, :, -1] -= 1.0
        out2 = ak.causal_attention(q, k2, v2)
    assert torch.equal(out[:, :, :-1], out2[:, :, :-1])
    assert not torch.equal(out[:, :, -1], out2[:, :, -1])


def test_blocked_bf16_close_to_fp32_reference():
    q, k, v = qkv(2, 4, 2, 384, 32, dtype=torch.bfloat16)
    out = ak.causal_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = sdpa_reference(*(t.detach().float() for t in (q, k, v)))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_short_sequences_and_other_devices_use_sdpa():
    q, k, _ = qkv(1, 2, 2, ak.CPU_CHUNK, 8)
    assert not ak.use_blocked_cpu(q, k)             # one chunk: nothing to skip
    q, k, _ = qkv(1, 2, 2, ak.CPU_CHUNK + 1, 8)
    assert ak.use_blocked_cpu(q, k)
    assert not ak.use_blocked_cpu(q.detach().double(), k.detach().double())


def test_blocked_under_torch_compile():
    q, k, v = qkv(2, 4, 2, 320, 16)
    grad = torch.randn(2, 4, 320, 16, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = run(sdpa_reference, q, k, v, grad)
    out, grads = run(torch.compile(ak.causal_attention), q, k, v, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
