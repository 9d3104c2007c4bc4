"""YOCO's mixers under context parallelism (``ctx.seq`` set; docs/yoco.md, "Context parallelism").

The sequence of T tokens is cut into ``2 cp`` chunks of ``c = T / (2 cp)``; rank r holds
chunks r and 2cp-1-r, in that order (:class:`~model.protocols.SequenceShard`). Every
function here takes this rank's two chunks side by side along the sequence dimension and
returns the same layout; the collectives are the shard's (``gather``, ``halo``), which
are differentiable, so autograd carries every gradient back the way the data came.

* **Sliding window** (:func:`window_attention`): each chunk needs only the ``W - 1``
  keys/values before it: one halo exchange, then the one-device kernel with those keys
  in front (its queries are the last rows of the key range). The halo may not span more
  than one chunk: ``seq_len / (2 cp) >= W - 1`` (:func:`check_layout`, before any process
  group exists).
* **Gated retention** (:func:`retention`): each chunk is run from a zero state, giving its
  output, its final state and its carry factor (its total decay, 0 when a document
  starts in it). The (state, carry) pairs of all ``2 cp`` chunks are all-gathered in fp32
  (global order), an exclusive scan gives each chunk its incoming state, and each chunk
  adds ``exp(G_i) q_i S_in`` to its output (``G`` the cumulative log decay from the chunk
  start, 0 once a document started inside the chunk): the exact chunkwise recurrence.
* **Cross-decoder** (:func:`shared_kv`): the shared key/value stays a sequence shard in
  the carry (a pipeline border sends shards); the first cross-decoder layer of a forward
  all-gathers it once and leaves the full K/V in the carry for the others, so one
  all-gather per forward (its backward: one reduce-scatter of the summed gradients).
  :func:`cross_attention` runs each local query chunk over the key prefix that ends with
  it (causal by global position), never a T x T mask.

Packed documents: the shard holds the whole sequence's document ids (``seq.doc_ids``,
gathered once per forward by the shard); every mixer cuts at the document starts
(:func:`global_segments`), as the one-device kernels do.

Generation prefill (:mod:`parallel.context_prefill`): the same functions run with the
prefill's recorder as ``ctx.cache`` (:func:`prefill_recorder`); the window records its
local keys/values, retention zeroes the padding after the prompt (:func:`without_padding`)
and records the state after the whole sequence, which every rank has from the scan.

The registrations at the bottom declare the ``swa`` and ``retention`` attention kinds
native under CP (their forwards in :mod:`model.yoco.layers` call the functions here when
``ctx.seq`` is set) and give ``swa`` its layout check.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from polytron.model.errors import BadInput
from polytron.model.protocols import SequenceShard
from polytron.model.yoco.kernels import chunk_retention, sliding_window_attention
from polytron.parallel.context import register_cp_mixer

#: Carry names of the gathered (full-sequence) shared key/value, kept beside the shards.
FULL_KV = ("yoco_k_full", "yoco_v_full")

#: Test-only: False drops the retention state scan (every chunk starts from zero), which
#: tests/model/test_yoco_cp.py shows the equivalence check catches.
SCAN_STATES = True
#: All-gathers of the shared key/value since import (tests count them per step).
KV_GATHERS = 0


def chunk_ids(seq: SequenceShard) -> tuple[int, int]:
    """Global indices of this rank's two chunks, in local order."""
    return seq.rank, 2 * seq.size - 1 - seq.rank


def split_chunks(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The local shard (2c along ``dim``) -> its two chunks."""
    a, b = x.chunk(2, dim=dim)
    return a, b


def window_limit(window: int, cp: int, seq_len: int) -> Optional[str]:
    """The sliding window's halo must come from one chunk: seq_len / (2 cp) >= W - 1."""
    chunk = seq_len // (2 * cp)
    if chunk >= window - 1:
        return None
    return (f"parallel.context={cp}: model.yoco.sliding_window={window} needs chunks of at least "
            f"{window - 1} tokens (seq_len / (2 x context) >= sliding_window - 1), but seq_len={seq_len} "
            f"gives {chunk}")


def check_window(cfg, cp: int, seq_len: Optional[int] = None) -> Optional[str]:
    """Layout check of the ``swa`` kind (before any process group): :func:`window_limit` at
    ``seq_len`` (the model's ``max_seq_len`` when the caller does not know the data's)."""
    return window_limit(cfg.yoco.sliding_window, cp, seq_len or cfg.max_seq_len)


def training_only(ctx: Any) -> None:
    """Context parallelism runs training-style forwards: no inference cache, but for the
    recorder of a context-parallel prefill (:func:`prefill_recorder`)."""
    if ctx.cache is not None and prefill_recorder(ctx) is None:
        raise BadInput("YOCO under parallel.context > 1 runs without an inference cache "
                       "(a generation prefill under cp goes through parallel/context_prefill.py)")


def prefill_recorder(ctx: Any) -> Optional[Any]:
    """``ctx.cache`` when it is the recorder of a context-parallel prefill
    (:class:`parallel.context_prefill.PrefillRecorder`: ``record_current``, ``record_state``,
    ``valid_len``), else None (training)."""
    return ctx.cache if getattr(ctx.cache, "cp_prefill", False) else None


# ---------------------------------------------------------------- documents

def global_segments(seq: SequenceShard) -> Optional[torch.Tensor]:
    """Document start (global position) of every position of the whole sequence (B, T), from
    the shard's global document ids, or None without documents."""
    doc_ids = getattr(seq, "doc_ids", None)
    return None if doc_ids is None else segments_of(doc_ids)


def segments_of(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of contiguous documents -> each position's document start."""
    T = doc_ids.shape[1]
    pos = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)     # (B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(start, pos, torch.zeros_like(pos)).cummax(1).values


def chunk_segments(seg: Optional[torch.Tensor], g: int, c: int, before: int = 0) -> Optional[torch.Tensor]:
    """Chunk ``g``'s document starts (B, before + c), with ``before`` positions in front."""
    return None if seg is None else seg[:, g * c - before:(g + 1) * c]


# ---------------------------------------------------------------- sliding window

def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, ctx: Any) -> torch.Tensor:
    """Sliding-window attention of this rank's chunks: q (B, Hq, 2c, hd), k, v (B, Hkv, 2c, hd)
    -> (B, Hq, 2c, hd), with the W-1 keys/values before each chunk from a halo exchange."""
    seq, n = ctx.seq, window - 1
    training_only(ctx)
    rec = prefill_recorder(ctx)
    if rec is not None:                          # prefill: the cache keeps the last W-1 of these
        rec.record_current(k, v)
    err = window_limit(window, seq.size, seq.seq_len)
    if err:
        raise BadInput(err)
    seg = global_segments(ctx.seq)
    c = q.shape[2] // 2
    halos = (seq.halo(k, n, 2), seq.halo(v, n, 2)) if n else None     # ((B, Hkv, n, hd) x 2) x 2
    outs = []
    for j, (g, qj, kj, vj) in enumerate(zip(chunk_ids(seq), *(split_chunks(t, 2) for t in (q, k, v)))):
        before = min(n, g * c)                                          # chunk 0 has nothing before
        if before and halos is not None:
            kj = torch.cat([halos[0][j][:, :, n - before:], kj], dim=2)  # (B, Hkv, before + c, hd)
            vj = torch.cat([halos[1][j][:, :, n - before:], vj], dim=2)
        outs.append(sliding_window_attention(qj, kj, vj, window, chunk_segments(seg, g, c, before)))
    return torch.cat(outs, dim=2)                                        # (B, Hq, 2c, hd)


# ---------------------------------------------------------------- gated retention

def chunk_summary(q, k, v, log_decay, chunk: int, seg: Optional[torch.Tensor], first: int):
    """One sequence chunk from a zero state: output (B, H, c, dv), final state (B, H, dk, dv)
    fp32, carry (B, H) fp32 and the read factors (B, H, c) fp32 of the incoming state.

    ``seg`` (B, c) global document starts or None; ``first`` the chunk's first global position."""
    out, state = chunk_retention(q, k, v, log_decay, chunk, seg)
    G = log_decay.float().cumsum(-1)                                     # (B, H, c)
    read = G.exp()
    carry = G[..., -1].exp()                                             # (B, H)
    if seg is not None:                    # the incoming state reaches positions of its document only
        cont = (seg < first)[:, None, :]                                 # (B, 1, c) document began before
        read = read * cont
        carry = carry * cont[..., -1]
    return out, state, carry, read


def incoming_states(states: torch.Tensor, carries: torch.Tensor) -> torch.Tensor:
    """Exclusive scan over chunks in global order: states (B, H, N, dk, dv), carries (B, H, N)
    -> the state entering each chunk (B, H, N, dk, dv), zero for chunk 0 (fp32)."""
    run = torch.zeros_like(states[:, :, 0])
    entering = []
    for n in range(states.shape[2]):                                     # O(2 cp) small steps
        entering.append(run)
        run = carries[:, :, n, None, None] * run + states[:, :, n]
    return torch.stack(entering, dim=2)


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk: int,
              ctx: Any) -> torch.Tensor:
    """Gated retention of this rank's chunks: q, k (B, H, 2c, dk) (k pre-scaled), v (B, H, 2c, dv),
    log_decay (B, H, 2c) -> (B, H, 2c, dv), equal to the one-device chunkwise form."""
    seq = ctx.seq
    training_only(ctx)
    rec = prefill_recorder(ctx)
    if rec is not None:                          # prefill: the padding leaves the state alone
        k, log_decay = without_padding(k, log_decay, seq.positions, rec.valid_len)
    seg = global_segments(seq)
    c = q.shape[2] // 2
    ids = chunk_ids(seq)
    parts = [chunk_summary(qj, kj, vj, lj, chunk, chunk_segments(seg, g, c), g * c)
             for g, qj, kj, vj, lj in zip(ids, *(split_chunks(t, 2) for t in (q, k, v, log_decay)))]
    if not SCAN_STATES:
        if rec is not None:                      # what dropping the scan leaves: the last chunk's own
            rec.record_state(seq.gather(torch.stack([p[1] for p in parts], dim=2), 2)[:, :, -1])
        return torch.cat([p[0] for p in parts], dim=2)
    states = seq.gather(torch.stack([p[1] for p in parts], dim=2), 2)   # (B, H, 2cp, dk, dv) fp32
    carries = seq.gather(torch.stack([p[2] for p in parts], dim=2), 2)  # (B, H, 2cp)
    entering = incoming_states(states, carries)
    if rec is not None:                          # the state after the whole (padded) sequence
        rec.record_state(carries[:, :, -1, None, None] * entering[:, :, -1] + states[:, :, -1])
    outs = [with_incoming(out, qj, read, entering[:, :, g])
            for g, qj, (out, _, _, read) in zip(ids, split_chunks(q, 2), parts)]
    return torch.cat(outs, dim=2)                                        # (B, H, 2c, dv)


def without_padding(k: torch.Tensor, log_decay: torch.Tensor, positions: torch.Tensor,
                    valid_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill padding (global positions >= ``valid_len``) with zero keys (B, H, 2c, dk) and
    zero log decays (B, H, 2c): a padded position neither adds to the state nor decays it,
    so the state after the padded sequence is the state after the last prompt token."""
    real = (positions.to(k.device) < valid_len)                          # (2c,)
    return k * real[:, None], log_decay * real


def with_incoming(out: torch.Tensor, q: torch.Tensor, read: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A chunk's zero-state output (B, H, c, dv) plus what its incoming state (B, H, dk, dv)
    adds: (q * read) @ state, in fp32 (``read`` (B, H, c) from :func:`chunk_summary`)."""
    cross = (q.float() * read[..., None]) @ state                        # (B, H, c, dv)
    return (out.float() + cross).to(out.dtype)


# ---------------------------------------------------------------- cross-decoder

def shared_kv(k: torch.Tensor, v: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-sequence shared key/value (B, Hkv, T, hd) from the carry's shards k, v
    (B, Hkv, 2c, hd): gathered by the first cross-decoder layer of a forward and kept in
    ``ctx.carry`` for the others."""
    global KV_GATHERS
    training_only(ctx)
    if FULL_KV[0] not in ctx.carry:
        KV_GATHERS += 1
        kv = torch.cat([k, v], dim=1)                                    # (B, 2 Hkv, 2c, hd): one gather
        full_k, full_v = ctx.seq.gather(kv, 2).chunk(2, dim=1)           # (B, Hkv, T, hd) each
        ctx.carry.update(zip(FULL_KV, (full_k, full_v)))
    return ctx.carry[FULL_KV[0]], ctx.carry[FULL_KV[1]]


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Local queries (B, Hq, 2c, hd) over the full key/value (B, Hkv, T, hd): chunk g's queries
    see the keys [0, (g+1)c) causally (and within their documents) -> (B, Hq, 2c, hd)."""
    seg = global_segments(ctx.seq)
    c = q.shape[2] // 2
    outs = []
    for g, qj in zip(chunk_ids(ctx.seq), split_chunks(q, 2)):
        S = (g + 1) * c
        allowed = torch.ones(c, S, dtype=torch.bool, device=q.device).tril(S - c)   # (c, S)
        if seg is not None:
            same = seg[:, g * c:S, None] == seg[:, None, :S]             # (B, c, S)
            allowed = (allowed & same)[:, None]                          # (B, 1, c, S)
        outs.append(F.scaled_dot_product_attention(qj, k[:, :, :S], v[:, :, :S], attn_mask=allowed,
                                                   enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(outs, dim=2)


# ---------------------------------------------------------------- registration

register_cp_mixer("swa", check=check_window)     # SlidingWindowAttention.forward calls window_attention
register_cp_mixer("retention")                   # GatedRetention._retain calls retention
