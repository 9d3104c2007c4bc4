"""Context parallelism: the sequence dimension sharded over the ``cp`` mesh dimension.

Layout (load-balanced causal chunking): a sequence of ``T`` tokens is cut into
``2 * cp`` chunks of ``chunk_len = T / (2 cp)``; cp rank ``r`` holds chunks ``r`` and
``2 cp - 1 - r``, in that order (local length ``T / cp``), so every rank does the same
causal attention work. Every rank of a cp group reads the same samples; the engine
keeps each rank's chunks of the token-indexed batch keys (:func:`shard_batch`).

API (stable; architecture folders build their CP mixers on it):

* :class:`SequenceShard` (implements :class:`model.protocols.SequenceShard`), set as
  ``Context.seq`` for one forward pass by :meth:`SequenceShard.bind`:

  - ``size``, ``rank``, ``kind`` (``"ring"`` | ``"allgather"``), ``seq_len``, ``chunk_len``,
    ``positions`` (T/cp,) global positions of the local tokens, ``doc_ids`` the whole
    sequence's document ids (B, T) or None (gathered once per forward);
  - ``gather(x, dim)``: local tokens -> the full sequence in global order; backward: the
    matching slice of the gradient summed over the ranks;
  - ``halo(x, n, dim)``: for each of the two local chunks, the ``n <= chunk_len`` tokens
    preceding it in the global sequence (zeros before position 0), as a pair; backward
    sends the gradients back to their owners;
  - ``shard(x, dim)``: full sequence -> local chunks (loader, tests);
  - ``attention(q, k, v, ctx)``: what :func:`model.layers.attend` delegates to.

* ``register_cp_mixer(kind, fn=None, check=None)`` / ``cp_mixer(kind)``: the CP form of
  the sequence mixer registered as ``ATTENTIONS[kind]``. ``fn(module, x, ctx) -> y``
  replaces the module's forward while ``ctx.seq`` is set (:func:`apply_context_parallel`);
  ``fn=None`` declares that the module's own forward is already correct under CP (it
  attends through ``attend``). ``check(cfg, cp) -> error line | None`` is run by the
  layout checks before any process group exists. A kind without an entry is refused.

Ring attention (``kind="ring"``): K/V blocks travel around the cp ring with isend/irecv
while the current block computes; partial outputs are merged with their log-sum-exps
in fp32; chunk pairs above the causal diagonal are skipped; document masks are built
per chunk pair from the global document ids (never T x T). The backward is a custom
autograd function that runs the ring again, the K/V gradients travelling with their
blocks back to their owners. ``kind="allgather"`` gathers K/V once and attends locally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

#: CP form of a sequence mixer: (module, x (B, T/cp, d), ctx) -> (B, T/cp, d).
CPMixer = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]
#: Layout check of a mixer kind: (model cfg, cp) -> one error line or None.
CPCheck = Callable[[Any, int], Optional[str]]

#: Batch keys indexed by token (B, T): sharded over cp. Others (``source`` (B, K)) stay whole.
TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "doc_ids")

#: Test-only fault switches (tests/distributed/test_context_parallel.py shows the checks
#: fail with them): "skip_block" drops one ring step's contribution, "per_rank_loss"
#: normalizes the loss per rank instead of over the whole sequence.
TEST_FAULTS: set[str] = set()


@dataclass(frozen=True)
class CPMixerEntry:
    """A registered CP form: the forward replacement (None: native) and its layout check."""
    fn: Optional[CPMixer]
    check: Optional[CPCheck]


CP_MIXERS: dict[str, CPMixerEntry] = {}


def register_cp_mixer(kind: str, fn: Optional[CPMixer] = None, check: Optional[CPCheck] = None) -> None:
    """Declare the CP form of the attention kind ``kind`` (see the module docstring)."""
    CP_MIXERS[kind] = CPMixerEntry(fn, check)


def cp_mixer(kind: str) -> Optional[CPMixerEntry]:
    """The registered CP form of ``kind``, or None (the kind is refused under cp)."""
    return CP_MIXERS.get(kind)


# The core GQA attends through model.layers.attend, so its CP form is the native forward
# (tests/distributed/layouts_cp.py); an architecture folder registers its own kinds (DHA
# and BitNet's gqa_subnorm in their tp_styles.py, YOCO's in model/yoco/context_parallel.py).
register_cp_mixer("gqa")


# ---------------------------------------------------------------- layout

def chunk_order(size: int) -> list[int]:
    """Chunk index of each rank-major local chunk: [0, 2P-1, 1, 2P-2, ...]."""
    return [c for r in range(size) for c in (r, 2 * size - 1 - r)]


def local_positions(seq_len: int, size: int, rank: int, device=None) -> torch.Tensor:
    """(T/size,) global positions of rank ``rank``'s two chunks."""
    c = seq_len // (2 * size)
    first, second = rank * c, (2 * size - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c, device=device),
                      torch.arange(second, second + c, device=device)])


def shard_tensor(x: torch.Tensor, size: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Full sequence along ``dim`` -> rank ``rank``'s two chunks, concatenated."""
    chunks = x.chunk(2 * size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=dim)


def unshard(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Every rank's local tokens (rank order) -> the full sequence in global order."""
    size = len(parts)
    chunks: list[Optional[torch.Tensor]] = [None] * (2 * size)
    for r, part in enumerate(parts):
        a, b = part.chunk(2, dim=dim)
        chunks[r], chunks[2 * size - 1 - r] = a, b
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]  # every slot is filled


def shard_batch(mb: dict[str, torch.Tensor], size: int, rank: int) -> dict[str, torch.Tensor]:
    """This cp rank's part of a micro-batch: token-indexed keys keep its two chunks;
    ``position_ids`` are added (global positions) when absent, so RoPE stays global."""
    out = dict(mb)
    if "position_ids" not in out:
        B, T = mb["tokens"].shape
        out["position_ids"] = torch.arange(T).expand(B, T)
    for key in TOKEN_KEYS:
        if key in out:
            out[key] = shard_tensor(out[key], size, rank, dim=1)
    return out


# ---------------------------------------------------------------- differentiable collectives

class _AllGather(torch.autograd.Function):
    """x -> (P, *x.shape) of every rank's x; backward: reduce-scatter (each rank receives the
    sum over ranks of its own slot: 1/P of an all-reduce's traffic)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()                                  # (P, *x.shape)
        out = torch.empty((1, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out[0], None


def all_gather_stack(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather: (P, *x.shape)."""
    return _AllGather.apply(x, group)


# ---------------------------------------------------------------- the shard

class SequenceShard:
    """A cp group's sequence layout and primitives; :meth:`bind` makes the per-forward view."""

    def __init__(self, group, kind: str = "ring", seq_len: int = 0, doc_ids: Optional[torch.Tensor] = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.kind = kind
        self.seq_len = seq_len
        self.chunk_len = seq_len // (2 * self.size)
        self.positions = local_positions(seq_len, self.size, self.rank) if seq_len else torch.empty(0)
        self.doc_ids = doc_ids              # (B, T) global, or None

    def bind(self, local_len: int, doc_ids: Optional[torch.Tensor]) -> "SequenceShard":
        """The view of one forward pass over local sequences of ``local_len`` tokens;
        ``doc_ids`` (B, T/cp) local document ids are gathered once to the whole sequence."""
        full = None
        if doc_ids is not None:
            full = unshard(list(all_gather_stack(doc_ids, self.group).unbind(0)), dim=1)   # (B, T)
        view = SequenceShard(self.group, self.kind, local_len * self.size, full)
        view.positions = view.positions.to(doc_ids.device if doc_ids is not None else "cpu")
        return view

    # ------------------------------------------------------------ primitives

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Local tokens along ``dim`` -> the whole sequence in global order (differentiable)."""
        return unshard(list(all_gather_stack(x, self.group).unbind(0)), dim=dim)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence along ``dim`` -> this rank's two chunks."""
        return shard_tensor(x, self.size, self.rank, dim)

    def halo(self, x: torch.Tensor, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each local chunk, the ``n`` tokens before it in the global sequence (zeros
        before position 0); gradients flow back to their owners."""
        c = x.shape[dim] // 2
        if not 0 <= n <= c:
            raise ValueError(f"halo of {n} tokens needs n <= chunk_len={c}")
        tails = torch.stack([x.narrow(dim, c - n, n), x.narrow(dim, 2 * c - n, n)])   # (2, ..n..)
        every = all_gather_stack(tails, self.group)                      # (P, 2, ..n..)
        by_chunk = {ch: every[r, j] for r in range(self.size)
                    for j, ch in enumerate((r, 2 * self.size - 1 - r))}
        out = []
        for ch in (self.rank, 2 * self.size - 1 - self.rank):
            out.append(by_chunk[ch - 1] if ch > 0 else torch.zeros_like(by_chunk[0]))
        return out[0], out[1]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Causal, document-masked attention of local (B, Hq, T/cp, hd) queries over every
        rank's (B, Hkv, T/cp, hd) keys/values."""
        if k.shape[2] != q.shape[2] or ctx.cache is not None:
            raise ValueError("context-parallel attention needs training-style q, k, v of the same "
                             "local length and no inference cache")
        if self.kind == "allgather":
            return self._allgather_attention(q, k, v)
        return RingAttention.apply(q, k, v, self)

    def _allgather_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kf, vf = self.gather(k, 2), self.gather(v, 2)                   # (B, Hkv, T, hd)
        qpos = self.positions.to(q.device)
        kpos = torch.arange(self.seq_len, device=q.device)
        allowed = _allowed(qpos, kpos, self._docs(qpos), self._docs(kpos))   # (B|1, 1, T/cp, T)
        n_rep = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, kf, vf, attn_mask=allowed, enable_gqa=n_rep > 1)

    def _docs(self, pos: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, len(pos)) document ids at global positions ``pos``, or None."""
        return None if self.doc_ids is None else self.doc_ids.to(pos.device)[:, pos]

    def chunk_ids(self, rank: int) -> tuple[int, int]:
        """The two chunk indices rank ``rank`` holds."""
        return rank, 2 * self.size - 1 - rank


def _allowed(qpos: torch.Tensor, kpos: torch.Tensor, qdoc: Optional[torch.Tensor],
             kdoc: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool (B|1, 1, Lq, Lk): causal by global position, within one document."""
    allowed = (kpos[None, :] <= qpos[:, None])[None, None]              # (1, 1, Lq, Lk)
    if qdoc is not None and kdoc is not None:
        allowed = allowed & (qdoc[:, :, None] == kdoc[:, None, :])[:, None]
    return allowed


# ---------------------------------------------------------------- ring attention

def _ring_peers(shard: SequenceShard) -> tuple[int, int]:
    """Global ranks of the next and previous cp ranks."""
    nxt = dist.get_global_rank(shard.group, (shard.rank + 1) % shard.size)
    prv = dist.get_global_rank(shard.group, (shard.rank - 1) % shard.size)
    return nxt, prv


def _shift(tensors: list[torch.Tensor], shard: SequenceShard, backward: bool = False) -> Callable[[], list]:
    """Start sending ``tensors`` to the next rank (previous if ``backward``) and receiving
    the same shapes from the other side; returns a wait() giving the received tensors."""
    nxt, prv = _ring_peers(shard)
    dst, src = (prv, nxt) if backward else (nxt, prv)
    recv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst, shard.group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, src, shard.group) for r in recv]
    reqs = dist.batch_isend_irecv(ops)

    def wait() -> list:
        for req in reqs:
            req.wait()
        return recv
    return wait


def _pairs(shard: SequenceShard, src: int) -> list[tuple[int, int, bool]]:
    """(local q chunk, block k chunk, diagonal) pairs not fully above the causal diagonal
    when this rank's queries meet rank ``src``'s keys."""
    out = []
    for i, qc in enumerate(shard.chunk_ids(shard.rank)):
        for j, kc in enumerate(shard.chunk_ids(src)):
            if kc <= qc:
                out.append((i, j, kc == qc))
    return out


def _pair_mask(shard: SequenceShard, i: int, j: int, src: int, diag: bool,
               device) -> Optional[torch.Tensor]:
    """Bool (B|1, 1, c, c) mask of a chunk pair, or None when every key is visible."""
    c = shard.chunk_len
    if not diag and shard.doc_ids is None:
        return None
    qpos = shard.chunk_ids(shard.rank)[i] * c + torch.arange(c, device=device)
    kpos = shard.chunk_ids(src)[j] * c + torch.arange(c, device=device)
    return _allowed(qpos, kpos, shard._docs(qpos), shard._docs(kpos))


def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out (B, H, c, hd), lse (B, H, c)) of one chunk pair; fully masked rows: lse -inf."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                   # (B, H, c, c)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                    # (B, H, c)
    p = torch.exp(s - lse.clamp_min(-1e30)[..., None])
    return torch.matmul(p, v), lse


def _merge(out: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor,
           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial results (fp32); -inf rows stay neutral."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w, w_b = torch.exp(lse - safe), torch.exp(lse_b - safe)
    return out * w[..., None] + o_b * w_b[..., None], new


def _expand(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, hd) -> (B, Hkv*n_rep, L, hd) (GQA heads repeated per group)."""
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x.chunk(2, dim=2)
    return a, b


class RingAttention(torch.autograd.Function):
    """Ring attention over the cp group (forward and backward both walk the ring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                shard: SequenceShard) -> torch.Tensor:
        n_rep = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        qf = q.float()
        B, H, L, hd = q.shape
        out = torch.zeros(B, H, L, hd, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k, v]
        for step in range(shard.size):
            src = (shard.rank - step) % shard.size
            wait = _shift(kv, shard) if step < shard.size - 1 else None   # overlap with compute
            if not (step == 1 and "skip_block" in TEST_FAULTS):
                out, lse = _ring_block(shard, qf, kv, src, n_rep, scale, out, lse)
            if wait is not None:
                kv = wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shard, ctx.n_rep, ctx.scale = shard, n_rep, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        shard, n_rep, scale = ctx.shard, ctx.n_rep, ctx.scale
        do, qf = grad.float(), q.float()
        delta = (do * out).sum(-1)                                         # (B, H, L)
        dq = torch.zeros_like(qf)
        kv = [k, v]
        dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        for step in range(shard.size):
            src = (shard.rank - step) % shard.size
            wait = _shift(kv, shard) if step < shard.size - 1 else None
            _ring_block_backward(shard, qf, kv, dkv, dq, do, lse, delta, src, n_rep, scale)
            if wait is not None:
                kv = wait()
            dkv = _shift(dkv, shard)()          # the gradients travel with their block
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def _ring_block(shard: SequenceShard, qf: torch.Tensor, kv: list[torch.Tensor], src: int, n_rep: int,
                scale: float, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge rank ``src``'s K/V block into (out, lse) of the local queries."""
    k, v = _expand(kv[0].float(), n_rep), _expand(kv[1].float(), n_rep)
    qs, ks, vs = _halves(qf), _halves(k), _halves(v)
    outs, lses = list(_halves(out)), list(lse.chunk(2, dim=2))
    for i, j, diag in _pairs(shard, src):
        o_b, l_b = _block_forward(qs[i], ks[j], vs[j], _pair_mask(shard, i, j, src, diag, qf.device), scale)
        outs[i], lses[i] = _merge(outs[i], lses[i], o_b, l_b)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _ring_block_backward(shard: SequenceShard, qf: torch.Tensor, kv: list[torch.Tensor],
                         dkv: list[torch.Tensor], dq: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                         delta: torch.Tensor, src: int, n_rep: int, scale: float) -> None:
    """Accumulate rank ``src``'s block's share of dq (local) and dk/dv (travelling), in place."""
    k, v = _expand(kv[0].float(), n_rep), _expand(kv[1].float(), n_rep)
    qs, ks, vs = _halves(qf), _halves(k), _halves(v)
    dos, lses, deltas = _halves(do), lse.chunk(2, dim=2), delta.chunk(2, dim=2)
    dqs = _halves(dq)
    c = shard.chunk_len
    for i, j, diag in _pairs(shard, src):
        s = torch.matmul(qs[i], ks[j].transpose(-1, -2)) * scale         # (B, H, c, c)
        mask = _pair_mask(shard, i, j, src, diag, qf.device)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.exp(s - lses[i][..., None])                             # (B, H, c, c)
        dp = torch.matmul(dos[i], vs[j].transpose(-1, -2))
        ds = p * (dp - deltas[i][..., None])
        dqs[i].add_(torch.matmul(ds, ks[j]) * scale)
        dk = torch.matmul(ds.transpose(-1, -2), qs[i]) * scale           # (B, H, c, hd)
        dv = torch.matmul(p.transpose(-1, -2), dos[i])
        sl = slice(j * c, (j + 1) * c)
        dkv[0][:, :, sl] += _fold(dk, n_rep)
        dkv[1][:, :, sl] += _fold(dv, n_rep)


def _fold(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv*n_rep, c, hd) -> (B, Hkv, c, hd): sum the gradient over each KV group."""
    if n_rep == 1:
        return x
    B, H, c, hd = x.shape
    return x.view(B, H // n_rep, n_rep, c, hd).sum(2)


# ---------------------------------------------------------------- applying it

def apply_context_parallel(part: nn.Module, group, kind: str) -> None:
    """Give a model part (a Transformer or a pipeline stage) its sequence shard and install
    the registered CP forms of its mixers."""
    from polytron.model.layers import ATTENTIONS
    part.seq_shard = SequenceShard(group, kind)  # type: ignore[assignment]  # read by Transformer.context
    kinds = {cls: name for name, cls in ATTENTIONS.items()}
    for module in part.modules():
        entry = cp_mixer(kinds.get(type(module), ""))
        if entry is not None and entry.fn is not None:
            module.forward = _cp_forward(module, entry.fn)
    attach_sequence_reduction(part, group)


def _sum_over(group, t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` summed over ``group``."""
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def attach_sequence_reduction(part: nn.Module, group) -> None:
    """Statistics that must cover the whole sequence (an MoE router's load, balancing and
    z losses: :class:`~polytron.model.protocols.SequenceReducing`) are summed over the cp
    ``group``; observed load that balances after the optimizer step
    (:class:`~polytron.model.protocols.LoadReducing`) over the cp ranks as well as the
    data-parallel ranks its reducer already covers."""
    from functools import partial

    from polytron.model.protocols import LoadReducing, SequenceReducing
    over_cp = partial(_sum_over, group)
    for m in part.modules():
        if isinstance(m, SequenceReducing):
            m.seq_reducer = over_cp
        if isinstance(m, LoadReducing):
            m.load_reducer = _then(m.load_reducer, over_cp)


def _then(first: Optional[Callable[[torch.Tensor], torch.Tensor]],
          second: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``second(first(t))`` (``second(t)`` without a first)."""
    if first is None:
        return second
    return lambda t: second(first(t))


def _cp_forward(module: nn.Module, fn: CPMixer) -> Callable:
    own = module.forward

    def forward(x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return fn(module, x, ctx) if ctx.seq is not None else own(x, ctx)
    return forward


def check_context_parallel(cfg: Any, cp: int, seq_len: Optional[int] = None) -> Optional[str]:
    """The first reason the model ``cfg`` cannot run at ``parallel.context=cp``, or None.
    Builds the model on the meta device to see every layer's mixer kind."""
    from polytron.model.layers import ATTENTIONS
    from polytron.model.transformer import Transformer
    if seq_len is not None and seq_len % (2 * cp):
        return (f"data.seq_len={seq_len} must be divisible by 2 x parallel.context = {2 * cp} "
                f"(load-balanced causal chunking)")
    with torch.device("meta"):
        model = Transformer(cfg)
    kinds = {cls: name for name, cls in ATTENTIONS.items()}
    for name, module in model.named_modules():
        err = _routing_check(module, name, cfg, cp)
        if err:
            return err
        kind = kinds.get(type(module))
        if kind is None:
            continue
        entry = cp_mixer(kind)
        if entry is None:
            return (f"parallel.context={cp}: attention kind {kind!r} ({name}, model.arch={cfg.arch}) "
                    f"has no context-parallel form yet")
        err = entry.check(cfg, cp) if entry.check else None
        if err:
            return err
    return None


def _routing_check(module: nn.Module, name: str, cfg: Any, cp: int) -> Optional[str]:
    """A routed layer runs under cp within its declared limits (CPRequirements) and balances
    on statistics it can sum over the sequence (SequenceReducing); anything else is refused."""
    from polytron.model.protocols import CPRequirements, ExpertLayer, LoadReducing, SequenceReducing
    if isinstance(module, CPRequirements):
        return type(module).cp_requirements(cfg, cp)
    if isinstance(module, ExpertLayer) or (isinstance(module, LoadReducing)
                                           and not isinstance(module, SequenceReducing)):
        return (f"parallel.context={cp}: model.mlp={cfg.mlp} ({name}) has no context-parallel "
                f"form yet (routing statistics must see the whole sequence)")
    return None
