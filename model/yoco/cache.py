"""YOCO's inference cache: one global key/value, plus a window or a state per self-decoder layer.

:class:`YOCOCache` follows the cache protocol of :mod:`model.generate` (``length``,
``advance``, ``bytes``) and offers each YOCO layer kind its own method:

* ``shared_update(k, v)`` (the :class:`~model.yoco.layers.SharedKV` unit): the global
  keys/values (B, Hkv, max_len, hd), written once per position and read by every
  cross-decoder layer; ``early_exit`` tells the unit to run the cross-decoder only for
  the last position of a multi-token forward (prefill).
* ``window_update(layer, k, v)`` (sliding-window layers): the last ``W - 1`` keys and
  values of each layer (B, Hkv_self, W - 1, hd), oldest first; a forward sees them
  followed by its own.
* ``recurrent_state(layer)`` / ``set_recurrent_state(layer, S)`` (retention layers): the
  state (B, H, hd, hd) in fp32;
* ``load_prefill(recorder)``: the same contents from a prefill run under context
  parallelism (:mod:`parallel.context_prefill`).

Every buffer is allocated when the cache is built, so ``bytes()`` is what the cache
holds for its ``max_len``: for YOCO it grows with the context by one layer's keys and
values per position, against ``num_layers`` for a dense model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from polytron.model.generate import GenerationError

if TYPE_CHECKING:
    from polytron.parallel.context_prefill import PrefillRecorder


class YOCOCache:
    """Preallocated generation state of a YOCO model (see the module doc)."""

    def __init__(self, shared_k: torch.Tensor, shared_v: torch.Tensor, windows: dict[int, tuple],
                 states: dict[int, torch.Tensor], early_exit: bool = True):
        self.shared_k, self.shared_v = shared_k, shared_v                # (B, Hkv, max_len, hd)
        self.windows = windows                                           # layer -> (k, v) (B, Hs, W-1, hd)
        self.states = states                                             # layer -> (B, H, hd, hd) fp32
        self.max_len = shared_k.shape[2]
        self.early_exit = early_exit
        self._length = 0

    @classmethod
    def build(cls, cfg, batch: int, max_len: int, device=None, dtype: Optional[torch.dtype] = None,
              early_exit: bool = True) -> "YOCOCache":
        """Zeroed buffers for ``cfg``'s decoders and ``max_len`` positions."""
        shapes = cache_shapes(cfg, batch, max_len)
        zeros = lambda shape, dt=dtype: torch.zeros(shape, device=device, dtype=dt)  # noqa: E731
        windows = {i: (zeros(shapes["window"]), zeros(shapes["window"])) for i in shapes["window_layers"]}
        states = {i: zeros(shapes["state"], torch.float32) for i in shapes["state_layers"]}
        return cls(zeros(shapes["shared"]), zeros(shapes["shared"]), windows, states, early_exit)

    # ------------------------------------------------------------ protocol

    @property
    def length(self) -> int:
        """Positions written by earlier forwards: where the next forward starts."""
        return self._length

    def advance(self, n: int) -> None:
        """After a forward of ``n`` tokens (called once, not per layer): move ``length``."""
        if self._length + n > self.max_len:
            raise GenerationError(f"the cache holds {self.max_len} positions, not {self._length + n}")
        self._length += n

    def bytes(self) -> int:
        """Allocated bytes of every buffer (shared key/value, windows, states)."""
        tensors = [self.shared_k, self.shared_v, *self.states.values()]
        tensors += [t for pair in self.windows.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------ per layer kind

    def shared_update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) at [length, length + T); return the prefix (B, Hkv, length + T, hd)."""
        end = self._length + k.shape[2]
        if end > self.max_len:
            raise GenerationError(f"the cache holds {self.max_len} positions; this forward needs {end}")
        self.shared_k[:, :, self._length:end] = k
        self.shared_v[:, :, self._length:end] = v
        return self.shared_k[:, :, :end], self.shared_v[:, :, :end]

    def window_update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept window followed by k, v (B, Hs, T, hd): (B, Hs, kept + T, hd); keeps the
        newest W - 1 of them for the next forward."""
        kbuf, vbuf = self.windows[layer_idx]
        kept = min(self._length, kbuf.shape[2])
        k_all = torch.cat([kbuf[:, :, :kept], k], dim=2)
        v_all = torch.cat([vbuf[:, :, :kept], v], dim=2)
        keep = min(kbuf.shape[2], k_all.shape[2])
        if keep:
            kbuf[:, :, :keep] = k_all[:, :, k_all.shape[2] - keep:]
            vbuf[:, :, :keep] = v_all[:, :, v_all.shape[2] - keep:]
        return k_all, v_all

    def recurrent_state(self, layer_idx: int) -> torch.Tensor:
        """The retention state (B, H, hd, hd) fp32 after the positions so far."""
        return self.states[layer_idx]

    def set_recurrent_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.states[layer_idx].copy_(state)

    # ------------------------------------------------------------ context-parallel prefill

    def load_prefill(self, rec: "PrefillRecorder") -> None:
        """Fill the cache from a prefill run under context parallelism
        (:mod:`parallel.context_prefill`), as one process's prefill of the T0 prompt tokens
        fills it: the shared key/value [0, T0) in prompt order (one all-gather), each
        window's last min(T0, W-1) keys/values (one all-reduce for all layers), each
        retention layer's state after the last prompt token (scanned by every rank)."""
        T0 = rec.valid_len
        if rec.shared is None:
            raise GenerationError("the context-parallel prefill recorded no shared key/value")
        if T0 > self.max_len:
            raise GenerationError(f"the cache holds {self.max_len} positions; the prompt needs {T0}")
        full = rec.full({"k": rec.shared[0], "v": rec.shared[1]})        # (B, Hkv, T0, hd) each
        self.shared_k[:, :, :T0] = full["k"]
        self.shared_v[:, :, :T0] = full["v"]
        missing = [i for i in self.windows if i not in rec.kv] + [i for i in self.states if i not in rec.states]
        if missing:
            raise GenerationError(f"self-decoder layer {missing[0]} recorded nothing in the context-parallel prefill")
        n = min(T0, next(iter(self.windows.values()))[0].shape[2]) if self.windows else 0
        if n:
            last = rec.last({(i, j): rec.kv[i][j] for i in self.windows for j in (0, 1)}, n)   # (B, Hs, n, hd)
            for i, (kbuf, vbuf) in self.windows.items():
                kbuf[:, :, :n] = last[(i, 0)]
                vbuf[:, :, :n] = last[(i, 1)]
        for i, state in self.states.items():
            state.copy_(rec.states[i])


def cache_shapes(cfg, batch: int, max_len: int) -> dict:
    """Buffer shapes of a :class:`YOCOCache` (the single source of its layout)."""
    y = cfg.yoco
    self_layers = list(range(y.num_self_layers(cfg)))
    swa = y.self_decoder == "swa"
    return {
        "shared": (batch, cfg.num_kv_heads, max_len, cfg.head_dim),
        "window": (batch, y.kv_heads(cfg), y.sliding_window - 1, cfg.head_dim),   # fixed, any max_len
        "window_layers": self_layers if swa else [],
        "state": (batch, cfg.num_heads, cfg.head_dim, cfg.head_dim),
        "state_layers": [] if swa else self_layers,
    }


def cache_bytes(cfg, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a :class:`YOCOCache` of ``context`` positions allocates (computed, not allocated)."""
    s = cache_shapes(cfg, batch, context)
    size = torch.tensor([], dtype=dtype).element_size()
    numel = lambda shape: int(torch.Size(shape).numel())  # noqa: E731
    total = 2 * numel(s["shared"]) * size + 2 * len(s["window_layers"]) * numel(s["window"]) * size
    return total + len(s["state_layers"]) * numel(s["state"]) * 4


def dense_cache_bytes(cfg, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a dense model's key/value cache of the same shape (every layer keeps
    ``num_kv_heads`` keys and values per position), computed."""
    size = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * context * cfg.head_dim * size


def make_cache(cfg, batch: int, max_len: int, device=None, dtype=None) -> YOCOCache:
    """``ModelSpec.make_cache`` of YOCO: a cache with prefill early exit on."""
    return YOCOCache.build(cfg, batch, max_len, device, dtype)
