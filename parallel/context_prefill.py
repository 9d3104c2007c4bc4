"""A generation prompt's prefill under context parallelism (docs/yoco.md, "Prefill under
context parallelism").

:func:`cp_prefill` runs the prefill of a prompt batch (B, T0) over a cp group and leaves on
every rank the inference cache that one process's prefill fills, plus the next-token
logits (B, V) of the last prompt position; decoding then continues with the ordinary
one-process cached decode on every rank (:func:`model.generate.generate` with
``prefill=context_parallel_prefill(group)``), so every rank holds the same cache and
chooses the same tokens.

How it runs
-----------
* The prompt is padded after its end to ``T = 2 cp c`` tokens, ``c`` the chunk length:
  ``ceil(T0 / 2 cp)``, at least the halo a windowed mixer needs (``window - 1``). A causal
  model never lets a prompt token see the padding, so the prompt's keys, values and
  hidden states are exact; a retention layer zeroes the padding's keys and decays so
  the state after the last prompt token passes through unchanged. Pad positions beyond
  ``max_seq_len`` reuse the last RoPE angle (no prompt token reads them).
* Each rank runs its two load-balanced chunks through the units with the training CP
  mixers (:class:`PrefillShard`: ring or all-gather attention, halos, the retention
  state scan) while a :class:`PrefillRecorder` stands in as ``ctx.cache``: the layers
  hand it their local keys/values (``update``, ``record_current``), retention its final
  state (``record_state``), YOCO's shared key/value unit its keys/values
  (``shared_update``), exactly where a real cache would get them.
* The CP part stops before the final norm and head, or right after the unit that wrote
  the shared key/value (YOCO's early exit: the cross-decoder reads only the cache).
  The cache assembles itself from the recorder (its ``load_prefill``): one all-gather of
  every full-length key/value (:meth:`PrefillRecorder.full`, prompt order, padding
  dropped) and one all-reduce of the last-positions tensors (:meth:`PrefillRecorder.last`:
  sliding windows, the last prompt position's hidden state).
* The rest of the model (the cross-decoder, the norm, the head) runs in one-process form
  on the last prompt position on every rank, reading the assembled cache.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from polytron.model.generate import GenerationError
from polytron.parallel.context import RingAttention, SequenceShard, shard_tensor

#: Test-only fault switches (tests/distributed/test_cp_prefill.py shows the checks fail
#: with them): "drop_chunk" zeroes the second chunk of every gathered key/value.
TEST_FAULTS: set[str] = set()

#: The unit kinds that run on the last prompt position only (after the sequence mixers).
TAIL_KINDS = ("norm", "head")


class PrefillShard(SequenceShard):
    """The cp shard of a prefill forward: the training primitives, with the recorder as cache."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Causal attention of local (B, Hq, T/cp, hd) queries over every rank's keys/values."""
        if k.shape[2] != q.shape[2]:
            raise ValueError("prefill attention needs q, k, v of the same local length")
        if self.kind == "allgather":
            return self._allgather_attention(q, k, v)
        return RingAttention.apply(q, k, v, self)


class PrefillRecorder:
    """``ctx.cache`` of a CP prefill forward: keeps what each layer would write into a cache
    (local shards), and gathers it in prompt order for the real cache's ``load_prefill``."""

    cp_prefill = True          # read by the CP mixers (model/yoco/context_parallel.py)
    early_exit = False         # the shared key/value unit hands on every local position

    def __init__(self, shard: SequenceShard, valid_len: int):
        self.shard = shard
        self.valid_len = valid_len                                        # T0, the prompt length
        self.layer: Optional[int] = None                                  # set per unit by cp_prefill
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}         # layer -> (B, H, T/cp, hd) x 2
        self.states: dict[int, torch.Tensor] = {}                         # layer -> (B, H, dk, dv) fp32
        self.shared: Optional[tuple[torch.Tensor, torch.Tensor]] = None   # (B, Hkv, T/cp, hd) x 2
        self._gathered: dict[int, torch.Tensor] = {}                      # id(local) -> (B, H, T0, hd)

    # ------------------------------------------------------------ what the layers call

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A dense layer's local keys/values (B, H, T/cp, hd): kept, and handed back unchanged."""
        self.kv[layer_idx] = (k, v)
        return k, v

    def record_current(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Local keys/values of the layer now running (a mixer that does not know its index)."""
        if self.layer is None:
            raise GenerationError("a context-parallel prefill recorded keys/values outside a layer")
        self.kv[self.layer] = (k, v)

    def record_state(self, state: torch.Tensor) -> None:
        """The recurrent state (B, H, dk, dv) of the layer now running after the last prompt token."""
        if self.layer is None:
            raise GenerationError("a context-parallel prefill recorded a state outside a layer")
        self.states[self.layer] = state

    def shared_update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """YOCO's shared key/value (local shards): kept; the prefill exits after this unit."""
        self.shared = (k, v)
        return k, v

    @property
    def exited(self) -> bool:
        """Whether the shared key/value was written (the rest reads the cache: early exit)."""
        return self.shared is not None

    # ------------------------------------------------------------ assembly (collectives)

    def full(self, named: dict[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Local (B, H_i, T/cp, hd) tensors -> (B, H_i, T0, hd) each in prompt order (padding
        dropped), with one all-gather for all of them (same dtype)."""
        keys = list(named)
        if not keys:
            return {}
        local = torch.cat([named[k] for k in keys], dim=1)               # (B, sum H_i, T/cp, hd)
        whole = self.shard.gather(local, 2)                              # (B, sum H_i, T, hd)
        if "drop_chunk" in TEST_FAULTS:
            c = self.shard.chunk_len
            whole[:, :, c:2 * c] = 0
        whole = whole[:, :, :self.valid_len]
        out = dict(zip(keys, whole.split([named[k].shape[1] for k in keys], dim=1)))
        self._gathered.update({id(named[k]): out[k] for k in keys})
        return out

    def last(self, named: dict[Hashable, torch.Tensor], n: int) -> dict[Hashable, torch.Tensor]:
        """Local (B, H_i, T/cp, hd) tensors -> their prompt positions [T0 - n, T0), (B, H_i, n, hd),
        on every rank, with one all-reduce for all of them."""
        keys = list(named)
        if not keys:
            return {}
        picked = self.last_positions(torch.cat([named[k] for k in keys], dim=1), n, 2)
        return dict(zip(keys, picked.split([named[k].shape[1] for k in keys], dim=1)))

    def last_positions(self, x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        """The prompt positions [T0 - n, T0) of the local tensor ``x`` (sequence along ``dim``),
        on every rank: each position comes from the one rank that holds it (an all-reduce
        of zeros elsewhere, so the values are exact)."""
        lo = self.valid_len - n
        pos = self.shard.positions.to(x.device)                           # (T/cp,) global
        mine = ((pos >= lo) & (pos < self.valid_len)).nonzero().squeeze(1)
        shape = list(x.shape)
        shape[dim] = n
        out = x.new_zeros(shape)
        out.index_copy_(dim, pos[mine] - lo, x.index_select(dim, mine))
        dist.all_reduce(out, group=self.shard.group)
        return out

    def gathered(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The prompt-order form of a local tensor :meth:`full` gathered (a carry the rest reads)."""
        if id(t) not in self._gathered:
            raise GenerationError(f"the carry {name!r} of the context-parallel prefill was not "
                                  "assembled by the cache")
        return self._gathered[id(t)]


# ---------------------------------------------------------------- the prefill

def padded_length(prompt_len: int, cp: int, halo: int = 0) -> int:
    """Length ``2 cp c`` the prompt is padded to: chunks of ``c = max(ceil(T0 / 2cp), halo, 1)``."""
    c = max(math.ceil(prompt_len / (2 * cp)), halo, 1)
    return 2 * cp * c


def halo_needed(model) -> int:
    """The keys a windowed mixer needs before each chunk (``window - 1``; 0 without one)."""
    from polytron.model.layers import ATTENTIONS
    kinds = tuple(ATTENTIONS.values())
    return max([getattr(m, "window", 1) - 1 for m in model.modules() if isinstance(m, kinds)], default=0)


def check_prefill(model, cache, cp: int, kind: str) -> None:
    """Refuse, with one line, a prefill that cannot run under this cp group."""
    from polytron.parallel.context import check_context_parallel
    if kind not in ("ring", "allgather"):
        raise GenerationError(f"context-parallel attention kind {kind!r}: use ring or allgather")
    if cache is None or not hasattr(cache, "load_prefill"):
        name = "no cache" if cache is None else f"a {type(cache).__name__}"
        raise GenerationError(f"a context-parallel prefill fills the model's inference cache; {name} "
                              "cannot be filled that way (generate without context parallelism)")
    if cache.length:
        raise GenerationError(f"a context-parallel prefill starts from an empty cache, not one "
                              f"holding {cache.length} positions")
    if not (model.has_unit("embedding") and model.has_unit("head")):
        raise GenerationError("generation needs the whole model (embedding to head), not a pipeline stage")
    err = check_context_parallel(model.cfg, cp)
    if err:
        raise GenerationError(err)


@torch.no_grad()
def cp_prefill(model, prompt: torch.Tensor, cache, group, kind: str = "ring") -> torch.Tensor:
    """Prefill the prompt (B, T0) over the cp ``group``: fill ``cache`` (empty, positions
    [0, T0), the same on every rank) as one process's prefill would and return the logits
    (B, V) of the last prompt position. The caller advances the cache by T0 afterwards
    (as after a forward). Every rank passes the same prompt and an equal cache."""
    from polytron.model.layers import Context, select_rope
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    check_prefill(model, cache, cp, kind)
    B, T0 = prompt.shape
    T = padded_length(T0, cp, halo_needed(model))
    tokens = F.pad(prompt, (0, T - T0))                                  # (B, T): padding after the prompt
    pos = torch.arange(T, device=prompt.device).clamp(max=model.cfg.max_seq_len - 1).expand(B, T)
    shard = PrefillShard(group, kind, T)
    shard.positions = shard.positions.to(prompt.device)
    rec = PrefillRecorder(shard, T0)
    cos, sin = select_rope(model.rope, T // cp, shard_tensor(pos, cp, rank))
    ctx = Context(cos=cos, sin=sin, mask=None, cache=rec, seq=shard)
    x = shard_tensor(tokens, cp, rank)                                   # (B, T/cp) this rank's chunks
    units = model.unit_modules()
    done = 0
    for unit, module in units:                                           # the sequence part, under cp
        if unit.kind in TAIL_KINDS or rec.exited:
            break
        rec.layer = getattr(getattr(module, "attention", None), "layer_idx", None)
        x = _run_unit(unit, module, x, ctx)
        done += 1
    cache.load_prefill(rec)                                              # the cache's collectives
    last = rec.last_positions(x, 1, 1)                                   # (B, 1, d) the last prompt token
    cos, sin = select_rope(model.rope, 1, None, T0 - 1)
    tail = Context(cos=cos, sin=sin, mask=None, cache=cache, start=T0 - 1,
                   carry={name: rec.gathered(name, t) for name, t in ctx.carry.items()})
    for unit, module in units[done:]:                                    # one position, one process
        last = _run_unit(unit, module, last, tail)
    return last[:, -1]                                                   # (B, V)


def _run_unit(unit, module, x: torch.Tensor, ctx) -> torch.Tensor:
    """One unit's forward, as Transformer.forward runs it (carry it produces goes to ctx)."""
    out = module(x, ctx) if unit.takes_context else module(x)
    if isinstance(out, tuple):
        out, produced = out
        ctx.carry.update(produced)
    return out


def context_parallel_prefill(group, kind: str = "ring") -> Callable[[Any, torch.Tensor, Any], torch.Tensor]:
    """The ``prefill`` argument of :func:`model.generate.generate` / ``stream`` that runs
    :func:`cp_prefill` over ``group``."""
    return lambda model, prompt, cache: cp_prefill(model, prompt, cache, group, kind)
