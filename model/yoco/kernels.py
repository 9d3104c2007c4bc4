"""Sub-quadratic mixers of YOCO's self-decoder: sliding-window attention and gated retention.

Both are plain PyTorch (autograd does the backward), the same code on CPU and GPU.

Sliding-window attention
------------------------
Query ``i`` attends to keys ``j`` with ``i - W < j <= i`` (``W`` keys including itself;
flash-attn's ``window_size=(W - 1, 0)``, Hugging Face Mistral's ``sliding_window``).
:func:`sliding_window_attention` cuts the queries into blocks of ``C`` rows; block
``n`` needs only the ``C + W - 1`` keys ``[nC - W + 1, nC + C)``. The keys are padded
in front by ``W - 1`` rows and unfolded into those overlapping windows (one strided
copy), and one batched SDPA call runs every block against its own window with a
``(C, C + W - 1)`` band mask. Work and memory are O(T (C + W)), not O(T^2): at
T = 4096, W = 512 the forward+backward is ~4x faster than SDPA with a full banded mask
on CPU (docs/benchmarks.md).

Gated retention (Sun et al. 2024, section 2.2)
----------------------------------------------
Per head, with data-dependent decays ``gamma_t = sigmoid(x_t w_gamma)^(1/tau)``::

    S_t = gamma_t S_{t-1} + k_t^T v_t          (k already scaled by d_k^-1/2)
    o_t = q_t S_t

i.e. ``o_t = sum_{j<=t} (q_t . k_j) prod_{m=j+1..t} gamma_m v_j``.
:func:`chunk_retention` computes this chunkwise: inside a chunk of ``C`` positions
the decay matrix ``exp(g_i - g_j)`` (``g`` the in-chunk cumulative log decay) masks
``q k^T`` like attention; across chunks one state ``(d_k, d_v)`` per head is carried
by the recurrence ``S <- exp(g_last) S + sum_j exp(g_last - g_j) k_j^T v_j`` (a loop
over the T/C chunks), and position ``i`` reads ``exp(g_i) q_i S``. Cost O(T C d +
T d^2). :func:`recurrent_retention` is the one-token step used in generation.

Packed documents: ``seg`` (B, T) gives each position the index of its document's first
token (:func:`segments`); attention and decay never cross a change of ``seg``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from polytron.model.attention_kernels import causal_attention

#: Query rows per block of the sliding-window kernel (128 measured best on CPU at
#: T = 4096, W = 512; larger blocks waste work on the band's empty corners).
SWA_BLOCK = 128


def segments(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Document start index (B, T) of every position, from a causal document mask
    (B, 1, T, T) (True = attend), or None without one. Documents are contiguous, so
    position i of a document starting at s sees i - s + 1 keys."""
    if mask is None:
        return None
    T = mask.shape[-1]
    seen = mask[:, 0].sum(-1)                                            # (B, T) keys per query
    return torch.arange(T, device=mask.device) + 1 - seen                # (B, T)


# ---------------------------------------------------------------- sliding window

def _window_mask(T: int, S: int, window: int, device, seg_q=None, seg_k=None) -> torch.Tensor:
    """(T, S) or (B, 1, T, S) bool: query t (absolute position S - T + t) sees key s."""
    qpos = torch.arange(S - T, S, device=device)[:, None]                # (T, 1)
    kpos = torch.arange(S, device=device)[None, :]                       # (1, S)
    allowed = (kpos <= qpos) & (kpos > qpos - window)                    # (T, S)
    if seg_q is not None:
        allowed = allowed & (seg_q[:, :, None] == seg_k[:, None, :])     # (B, T, S)
        allowed = allowed[:, None]                                       # (B, 1, T, S)
    return allowed


def _unfold_windows(x: torch.Tensor, window: int, block: int, blocks: int) -> torch.Tensor:
    """(B, H, L, hd) with L = blocks * block -> (B, blocks, H, block + window - 1, hd):
    block n gets rows [n block - window + 1, (n + 1) block), zero rows before 0."""
    xp = F.pad(x, (0, 0, window - 1, 0))                                 # (B, H, W-1+L, hd)
    win = xp.unfold(2, block + window - 1, block)                        # (B, H, N, hd, K)
    return win.permute(0, 2, 1, 4, 3)                                    # (B, N, H, K, hd)


def _band_mask(window: int, block: int, blocks: int, device, seg: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, 1, C, K) or (B, N, 1, C, K) bool mask of the unfolded blocks."""
    K = block + window - 1
    t = torch.arange(block, device=device)[:, None]                      # (C, 1)
    kk = torch.arange(K, device=device)[None, :]                         # (1, K)
    dist = t + window - 1 - kk                                           # query pos - key pos
    band = (dist >= 0) & (dist < window)                                 # (C, K)
    first = window - 1 - block * torch.arange(blocks, device=device)     # slots before key 0
    mask = band[None] & (kk[None] >= first[:, None, None])               # (N, C, K)
    if seg is None:
        return mask[:, None]                                             # (N, 1, C, K)
    segk = _unfold_windows(seg[:, None, :, None].float(), window, block, blocks)[:, :, 0, :, 0]  # (B, N, K)
    segq = seg.view(seg.shape[0], blocks, block).float()                 # (B, N, C)
    same = segq[..., :, None] == segk[..., None, :]                      # (B, N, C, K)
    return (mask[None] & same)[:, :, None]                               # (B, N, 1, C, K)


def _blocked_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int,
                    seg: Optional[torch.Tensor]) -> torch.Tensor:
    """Sliding-window attention, T == S, by unfolded key windows (see the module doc)."""
    B, Hq, T, hd = q.shape
    Hkv = k.shape[1]
    N = -(-T // block)
    pad = N * block - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if seg is not None:
            seg = F.pad(seg, (0, pad), value=-1)
    K = block + window - 1
    qb = q.view(B, Hq, N, block, hd).transpose(1, 2).reshape(B * N, Hq, block, hd)
    kb = _unfold_windows(k, window, block, N).reshape(B * N, Hkv, K, hd)
    vb = _unfold_windows(v, window, block, N).reshape(B * N, Hkv, K, hd)
    mask = _band_mask(window, block, N, q.device, seg)
    mask = mask.expand(B, *mask.shape[-4:]) if seg is None else mask    # (B, N, 1, C, K)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask.reshape(B * N, 1, block, K),
                                       enable_gqa=Hq != Hkv)            # (B*N, Hq, C, hd)
    y = y.view(B, N, Hq, block, hd).transpose(1, 2).reshape(B, Hq, N * block, hd)
    return y[:, :, :T]


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             seg: Optional[torch.Tensor] = None,
                             block: int = SWA_BLOCK) -> torch.Tensor:
    """Causal attention over the last ``window`` keys, scale 1/sqrt(hd).

    q (B, Hq, T, hd); k, v (B, Hkv, S, hd) with S >= T (the queries are the last T of
    the S positions; Hkv divides Hq); ``seg`` (B, S) document starts or None.
    Returns (B, Hq, T, hd). Long query runs take the blocked O(T (C + W)) path; a short
    run (generation) attends its few rows directly.
    """
    T, S = q.shape[2], k.shape[2]
    if seg is None and S == T and T <= window:
        return causal_attention(q, k, v)                                 # the window covers all
    if T <= block:
        mask = _window_mask(T, S, window, q.device, None if seg is None else seg[:, S - T:], seg)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if S > T:                               # earlier keys in front: queries padded to S rows
        q = F.pad(q, (0, 0, S - T, 0))
    return _blocked_window(q, k, v, window, min(block, S), seg)[:, :, S - T:]


# ---------------------------------------------------------------- gated retention

def _same(seg: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """seg[..., a] == seg[..., b] broadcast (None without documents)."""
    return None if seg is None else seg[..., a] == seg[..., b]


def chunk_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk: int,
                    seg: Optional[torch.Tensor] = None,
                    state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise gated retention (see the module doc).

    q, k (B, H, T, dk) with k pre-scaled by dk^-1/2; v (B, H, T, dv); log_decay (B, H, T)
    fp32 (log gamma <= 0); ``seg`` (B, T) document starts or None; ``state`` (B, H, dk, dv)
    fp32 carried in from earlier positions, or None (zero). Returns the output
    (B, H, T, dv) in q's dtype and the state after position T - 1 (fp32).
    """
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:                       # zero keys/values and zero log decay at the end change nothing
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_decay = F.pad(log_decay, (0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(-1, pad)], dim=1)
    qc, kc, vc = (t.reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v))    # (B, H, N, C, d)
    g = log_decay.float().reshape(B, H, N, C).cumsum(-1)                   # (B, H, N, C) in-chunk
    segc = None if seg is None else seg.reshape(B, 1, N, C)                # (B, 1, N, C)

    inner = _inner_chunks(qc, kc, vc, g, segc)                             # (B, H, N, C, dv)
    kv, carry = _chunk_states(kc, vc, g, segc)                             # (B, H, N, dk, dv), (B, H, N)
    if state is None:
        state = torch.zeros(B, H, dk, dv, dtype=torch.float32, device=q.device)
    entering = []
    for n in range(N):                                                     # O(T/C) small steps
        entering.append(state)
        state = carry[:, :, n, None, None] * state + kv[:, :, n]
    states = torch.stack(entering, dim=2)                                  # (B, H, N, dk, dv)
    read = g.exp()                                                         # (B, H, N, C)
    if segc is not None:       # position i reads the state only if its document began before the chunk
        prev = torch.cat([segc[..., :1, :1], segc[..., :-1, -1:]], dim=2)  # (B, 1, N, 1) start before chunk n
        read = read * (segc == prev)
    cross = (qc.float() * read[..., None]) @ states                       # (B, H, N, C, dv)
    out = (inner + cross).reshape(B, H, N * C, dv)[:, :, :T]
    return out.to(q.dtype), state


def _inner_chunks(qc, kc, vc, g, segc) -> torch.Tensor:
    """Within-chunk part: (q k^T * exp(g_i - g_j) [j <= i, same document]) v, fp32."""
    C = g.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()   # (C, C)
    if segc is not None:
        causal = causal & (segc[..., :, None] == segc[..., None, :])      # (B, 1, N, C, C)
    diff = g[..., :, None] - g[..., None, :]                              # (B, H, N, C, C)
    decay = torch.where(causal, diff, float("-inf")).exp()
    scores = qc.float() @ kc.float().transpose(-1, -2)                    # (B, H, N, C, C)
    return (scores * decay) @ vc.float()                                  # (B, H, N, C, dv)


def _chunk_states(kc, vc, g, segc) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk: its own contribution to the state at its end (B, H, N, dk, dv), and the
    factor (B, H, N) the state entering it is carried with: exp(sum of its log decays),
    0 when a document starts inside the chunk."""
    last = g[..., -1:]                                                    # (B, H, N, 1)
    weight = (last - g).exp()                                             # (B, H, N, C)
    carry = last[..., 0].exp()                                            # (B, H, N)
    if segc is not None:
        weight = weight * (segc == segc[..., -1:])                        # same document as the chunk end
        prev = torch.cat([segc[..., :1, :1], segc[..., :-1, -1:]], dim=2)  # (B, 1, N, 1)
        carry = carry * (segc[..., -1:] == prev)[..., 0]
    kv = (kc.float() * weight[..., None]).transpose(-1, -2) @ vc.float()  # (B, H, N, dk, dv)
    return kv, carry


def recurrent_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step per position (generation): q, k (B, H, T, dk) (k pre-scaled), v (B, H, T, dv),
    log_decay (B, H, T), state (B, H, dk, dv) fp32 -> (output (B, H, T, dv), new state)."""
    outs = []
    for t in range(q.shape[2]):
        kv = k[:, :, t, :, None].float() * v[:, :, t, None, :].float()   # (B, H, dk, dv)
        state = log_decay[:, :, t, None, None].float().exp() * state + kv
        outs.append(q[:, :, t, None, :].float() @ state)                 # (B, H, 1, dv)
    return torch.cat(outs, dim=2).to(q.dtype), state


def parallel_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       seg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference O(T^2) form, (q k^T * D) v with D_ij = exp(G_i - G_j) for j <= i (same
    document), G the cumulative log decay. For tests only."""
    G = log_decay.float().cumsum(-1)                                     # (B, H, T)
    T = G.shape[-1]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if seg is not None:
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    decay = torch.where(allowed, G[..., :, None] - G[..., None, :], float("-inf")).exp()
    return ((q.float() @ k.float().transpose(-1, -2)) * decay) @ v.float()
