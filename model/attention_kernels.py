"""Causal attention kernels behind the attention slots.

``causal_attention(q, k, v)`` is what every causal attention layer calls. On GPUs
(and for any tensor type other than a plain CPU tensor) it is
``F.scaled_dot_product_attention(is_causal=True)``: the CUDA flash and cuDNN kernels
already skip the key blocks above the diagonal.

PyTorch's CPU flash-attention kernel does not, for the sequence lengths of CPU runs:
it walks the keys in blocks of 512, so for T <= 512 every query block multiplies
against all T keys and the upper triangle is masked after the work is done (causal
and non-causal calls take the same time; measured in docs/benchmarks.md). On CPU we
therefore cut the queries into chunks of ``CPU_CHUNK`` rows. Chunk i attends

* to its own square diagonal block with the kernel's causal flag (top-left
  alignment is right for a square block), and
* to all earlier keys with no mask,

and the two partial results are merged with their log-sum-exps. That is
(n + 1) / (2n) of the score work for n chunks. The backward calls the kernel's own
backward once per part, handing it the merged output and log-sum-exp: the softmax
probabilities and the row term sum(dO * O) are then those of the full row, so the
partial gradients are exact and only need summing (the ring-attention identity).
Results match SDPA to fp32 round-off (tests/model/test_attention_kernels.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Query rows per chunk of the CPU blocked kernel (128 measured best at T = 512, hd = 64).
CPU_CHUNK = 128

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _chunks(seq_len: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) query ranges of at most ``chunk`` rows covering ``seq_len``."""
    return [(s, min(s + chunk, seq_len)) for s in range(0, seq_len, chunk)]


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor,
           l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-attention partials over disjoint key sets.

    o (B, H, c, hd) and their log-sum-exps l (B, H, c) -> merged (o, l); in fp32.
    """
    lse = torch.logaddexp(l1, l2)                                    # (B, H, c)
    out = o1.float() * (l1 - lse).exp().unsqueeze(-1) + o2.float() * (l2 - lse).exp().unsqueeze(-1)
    return out, lse


class _BlockedCausalCPU(torch.autograd.Function):
    """Causal attention on CPU that skips the masked key blocks (see module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, chunk: int):
        # q (B, Hq, T, hd); k, v (B, Hkv, T, hd); Hkv divides Hq (the kernel handles GQA).
        B, H, T, hd = q.shape
        out = q.new_empty(B, T, H, hd).transpose(1, 2)               # (B, H, T, hd), rows contiguous per token
        lse = q.new_empty(B, T, H, dtype=torch.float32).transpose(1, 2)   # (B, H, T)
        for s, e in _chunks(T, chunk):
            qi = q[:, :, s:e]
            o, lse_i = _FLASH_CPU(qi, k[:, :, s:e], v[:, :, s:e], 0.0, True)
            if s > 0:
                o_prev, lse_prev = _FLASH_CPU(qi, k[:, :, :s], v[:, :, :s], 0.0, False)
                o, lse_i = _merge(o, lse_i, o_prev, lse_prev)
            out[:, :, s:e] = o
            lse[:, :, s:e] = lse_i
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for s, e in _chunks(q.shape[2], ctx.chunk):
            qi, gi, oi, li = q[:, :, s:e], grad_out[:, :, s:e], out[:, :, s:e], lse[:, :, s:e]
            dqi, dki, dvi = _FLASH_CPU_BWD(gi, qi, k[:, :, s:e], v[:, :, s:e], oi, li, 0.0, True)
            dk[:, :, s:e] += dki
            dv[:, :, s:e] += dvi
            if s > 0:
                dq_prev, dk_prev, dv_prev = _FLASH_CPU_BWD(gi, qi, k[:, :, :s], v[:, :, :s],
                                                           oi, li, 0.0, False)
                dqi = dqi + dq_prev
                dk[:, :, :s] += dk_prev
                dv[:, :, :s] += dv_prev
            dq[:, :, s:e] = dqi
        return dq, dk, dv, None


def use_blocked_cpu(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``causal_attention`` takes the blocked CPU path for these inputs."""
    return (type(q) is torch.Tensor and type(k) is torch.Tensor   # not DTensor / subclasses
            and q.device.type == "cpu" and q.shape[2] > CPU_CHUNK
            and q.shape[2] == k.shape[2] and q.dtype in (torch.float32, torch.bfloat16))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, scale 1/sqrt(hd).

    q (B, Hq, T, hd); k, v (B, Hkv, T, hd) with Hkv dividing Hq -> (B, Hq, T, hd).
    """
    if use_blocked_cpu(q, k):
        return _BlockedCausalCPU.apply(q, k, v, CPU_CHUNK)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])
