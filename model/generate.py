"""Autoregressive generation for a single-device model, and the dense key/value cache.

Caches
------
An inference cache is the object passed as ``cache=`` to ``Transformer.forward``; the
layers find it in ``Context.cache``. Each layer kind talks to it through a per-layer
method of its own, keyed by its ``layer_idx``: the dense attention calls
``update(layer_idx, k, v)``; a sliding-window cache, a recurrent state or the one
shared key/value of a YOCO decoder would declare theirs. What :func:`generate` needs
from every cache is :class:`InferenceCache`:

* ``length``: positions consumed so far, which is the ``start`` of the next forward;
* ``advance(n)``: called exactly once after each forward of ``n`` new positions, so
  every layer of one forward writes the same positions ``[length, length + n)``;
* ``bytes()``: memory the cache holds;
* optionally ``load_prefill(recorder)``: fill positions ``[0, T0)`` from a prefill run
  under context parallelism (:mod:`parallel.context_prefill`); a cache without it is
  refused there.

A spec returns its cache from ``ModelSpec.make_cache(cfg, batch, max_len, device, dtype)``
(``model/llama`` builds a :class:`DenseKVCache` over all its layers).

Generation
----------
:func:`generate` prefills the prompt in one forward (or with ``prefill=``, e.g. under
context parallelism: :mod:`parallel.context_prefill`) and then feeds one token per step
with ``start`` equal to the cache length; with ``use_cache=False`` (or a spec without
``make_cache``) it recomputes the whole sequence every step. Decoding is greedy at
``temperature=0``, else temperature plus nucleus (top-p) sampling from a
``torch.Generator`` seeded by ``seed``, so a seed always gives the same tokens on the
same device.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Protocol, runtime_checkable

import torch

from polytron.model.errors import PolytronError

if TYPE_CHECKING:
    from polytron.parallel.context_prefill import PrefillRecorder

#: A prefill other than one forward (``stream(prefill=...)``): (model, prompt (B, T0), the
#: empty cache) -> logits (B, V) of the last prompt position, with the cache's positions
#: [0, T0) filled (the caller advances it), e.g. :func:`parallel.context_prefill.context_parallel_prefill`.
Prefill = Callable[[Any, torch.Tensor, Any], torch.Tensor]


class GenerationError(PolytronError, ValueError):
    """A generation request that cannot run (too long, empty prompt, partial model)."""


class NoCacheWarning(UserWarning):
    """The model's spec declares no inference cache: generation recomputes every step."""


@runtime_checkable
class InferenceCache(Protocol):
    """What :func:`generate` needs from any cache (see the module docstring)."""

    @property
    def length(self) -> int:
        """Positions written so far: the ``start`` of the next forward."""
        ...

    def advance(self, n: int) -> None:
        """Mark the ``n`` positions of the forward just run as written (once per forward)."""
        ...

    def bytes(self) -> int:
        """Bytes of memory the cache holds."""
        ...


class DenseKVCache:
    """Preallocated keys and values (B, Hkv, max_len, hd) for every attention layer.

    ``update`` writes a forward's keys/values at ``[length, length + T)`` and returns the
    filled prefix ``[0, length + T)``; ``advance(T)`` then moves ``length`` once for the
    whole forward, so all layers of one forward write the same positions.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        if keys.keys() != values.keys():
            raise ValueError("keys and values must cover the same layers")
        self.keys = keys                  # layer_idx -> (B, Hkv, max_len, hd)
        self.values = values
        first = next(iter(keys.values()))
        self.max_len = first.shape[2]
        self._length = 0

    @classmethod
    def for_layers(cls, cfg, layers: Iterable[int], batch: int, max_len: int, device=None,
                   dtype: Optional[torch.dtype] = None) -> "DenseKVCache":
        """Zeroed buffers for ``layers``, shaped by ``cfg.num_kv_heads`` and ``cfg.head_dim``."""
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        layers = list(layers)
        if not layers:
            raise ValueError("a DenseKVCache needs at least one layer")
        make = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return cls({i: make() for i in layers}, {i: make() for i in layers})

    @property
    def length(self) -> int:
        """Positions written by earlier forwards: where the next forward starts."""
        return self._length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) at [length, length + T); return (B, Hkv, length + T, hd) each."""
        end = self._length + k.shape[2]
        if end > self.max_len:
            raise GenerationError(f"the cache holds {self.max_len} positions; this forward needs {end}")
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        kbuf[:, :, self._length:end] = k
        vbuf[:, :, self._length:end] = v
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def advance(self, n: int) -> None:
        """After a forward of ``n`` tokens (called once, not per layer): move ``length``."""
        if self._length + n > self.max_len:
            raise GenerationError(f"the cache holds {self.max_len} positions, not {self._length + n}")
        self._length += n

    def bytes(self) -> int:
        """Allocated bytes of all key and value buffers (the full max_len, not the filled part)."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())

    def load_prefill(self, rec: "PrefillRecorder") -> None:
        """Positions [0, T0) of every layer from a context-parallel prefill: each layer's
        recorded local keys/values, in prompt order, from one all-gather (the same on every rank)."""
        missing = [i for i in self.keys if i not in rec.kv]
        if missing:
            raise GenerationError(f"layer {missing[0]} recorded no keys/values in the context-parallel prefill")
        if rec.valid_len > self.max_len:
            raise GenerationError(f"the cache holds {self.max_len} positions; the prompt needs {rec.valid_len}")
        full = rec.full({(i, j): rec.kv[i][j] for i in self.keys for j in (0, 1)})   # (B, Hkv, T0, hd)
        for i in self.keys:
            self.keys[i][:, :, :rec.valid_len] = full[(i, 0)]
            self.values[i][:, :, :rec.valid_len] = full[(i, 1)]


# ---------------------------------------------------------------- sampling

def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): greedy at temperature 0, else
    temperature + nucleus sampling (the smallest set of tokens whose mass reaches top_p)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)              # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)                # (B, V)
        mass_before = sorted_p.cumsum(-1) - sorted_p                         # mass of better tokens
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)           # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)      # renormalizes


def _check_request(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse, with one message, what generation cannot do."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise GenerationError(f"the prompt must be a (batch, length >= 1) token tensor, got shape "
                              f"{tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if not (model.has_unit("embedding") and model.has_unit("head")):
        raise GenerationError("generation needs the whole model (embedding to head), not a pipeline stage")
    check_length(prompt.shape[1], max_new_tokens, model.cfg.max_seq_len)


def check_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse a request whose prompt plus new tokens exceed the model's ``max_seq_len``."""
    total = prompt_len + max_new_tokens
    if total > max_seq_len:
        raise GenerationError(f"prompt ({prompt_len} tokens) + new tokens ({max_new_tokens}) = {total} "
                              f"exceeds the model's max_seq_len of {max_seq_len}")


def _make_cache(model, batch: int, max_len: int):
    """The spec's cache for this request, or None (with a NoCacheWarning) when it has none."""
    make = getattr(model.spec, "make_cache", None)
    if make is None:
        warnings.warn(NoCacheWarning(f"architecture {model.cfg.arch!r} declares no inference cache "
                                     "(ModelSpec.make_cache); generating without one, recomputing "
                                     "the whole sequence every step"), stacklevel=2)
        return None
    ref = next(model.parameters())
    return make(model.cfg, batch, max_len, ref.device, ref.dtype)


# ---------------------------------------------------------------- decoding loop

@torch.no_grad()
def stream(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           seed: Optional[int] = None, use_cache: bool = True,
           prefill: Optional[Prefill] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (logits (B, V) of the last position, chosen tokens (B,)) once per new token.

    With a cache the prompt (B, T0) is prefilled in one forward (or by ``prefill``, e.g.
    under context parallelism), then each step feeds the previous token with ``start`` =
    cache length. Without one each step runs the full sequence so far. The caller may stop
    iterating at any time.
    """
    _check_request(model, prompt, max_new_tokens, temperature, top_p)
    if prefill is not None and not use_cache:
        raise GenerationError("a prefill function fills the inference cache: it needs use_cache=True")
    if max_new_tokens == 0:
        return
    gen = None                                  # seed None: torch's global generator
    if temperature > 0 and seed is not None:
        gen = torch.Generator(device=prompt.device)
        gen.manual_seed(seed)
    B, T0 = prompt.shape
    cache = _make_cache(model, B, T0 + max_new_tokens) if use_cache else None
    tokens = prompt
    feed = prompt                                                        # (B, T) tokens not yet seen
    for step in range(max_new_tokens):
        if cache is not None:
            if step == 0 and prefill is not None:
                logits = prefill(model, feed, cache)                     # (B, V)
            else:
                logits = model(feed, cache=cache, start=cache.length)[:, -1]  # (B, V)
            cache.advance(feed.shape[1])
        else:
            logits = model(tokens)[:, -1]
        nxt = sample_next(logits, temperature, top_p, gen)               # (B,)
        yield logits, nxt
        feed = nxt[:, None]                                              # (B, 1)
        tokens = torch.cat([tokens, feed], dim=1)


def generate(model, prompt_tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, use_cache: bool = True,
             eos_id: Optional[int] = None, prefill: Optional[Prefill] = None) -> torch.Tensor:
    """Prompt (B, T0) -> prompt plus N new tokens (B, T0 + N), N <= max_new_tokens.

    Greedy when ``temperature`` is 0; otherwise temperature + top-p sampling seeded by
    ``seed``. With ``eos_id``, a row that has produced it continues with ``eos_id`` and
    generation stops early once every row has. ``prefill`` replaces the prompt's forward
    (``context_parallel_prefill(group)``: the prefill runs under context parallelism and
    every rank then decodes the same tokens). Raises :class:`GenerationError` when the
    prompt plus new tokens exceed ``cfg.max_seq_len``.
    """
    was_training = model.training
    model.eval()
    out = [prompt_tokens]
    done = torch.zeros(prompt_tokens.shape[0], dtype=torch.bool, device=prompt_tokens.device)   # (B,)
    try:
        for _, nxt in stream(model, prompt_tokens, max_new_tokens, temperature, top_p, seed, use_cache,
                             prefill):
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out.append(nxt[:, None])
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
