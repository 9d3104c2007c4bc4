"""YOCO's RoPE conventions: ours (rotate-half pairs, theta^(-2i/hd)) or the released code's.

Two settings of ``model.yoco`` (``model.arch=yoco``):

* ``rope_pairing``: which dimensions of a head rotate together. ``rotate_half`` pairs
  (i, i + hd/2), as Hugging Face Llama and the rest of polytron; ``interleaved`` pairs
  (2i, 2i + 1), as the released YOCO code (flash-attn's ``interleaved=True``).
* ``rope_frequencies``: pair i turns at ``theta^(-2i/hd)`` (``standard``) or at
  ``theta^(-i/(hd/2 - 1))`` (``released``: ``theta ** -linspace(0, 1, hd/2)``, computed in
  float32 as the released code does).

The table the model builds (:func:`model.layers.rope_table`, rotate-half layout) takes its
frequencies from :func:`inv_freq` (registered for ``yoco`` in ``ROPE_FREQUENCIES``); every
YOCO layer rotates through :func:`rope`, which reads that table in either pairing, so
training, the inference cache and context parallelism (each reads ``ctx.cos`` / ``ctx.sin``
of its own positions) follow the setting alike.

The pairing is a fixed permutation of each head's dimensions: a model whose query and
key projection rows are permuted by :func:`pairing_permutation` computes the same logits
with the other pairing (attention scores are dot products of q and k permuted alike).
:func:`convert_pairing` applies it to a whole YOCO state dict, so weights trained with the
released convention load into ``rope_pairing: rotate_half`` (and back).
"""
from __future__ import annotations

import re

import torch

from polytron.model.layers import ROPE_FREQUENCIES

PAIRINGS = ("rotate_half", "interleaved")
FREQUENCIES = ("standard", "released")


def inv_freq(cfg) -> torch.Tensor:
    """Unscaled inverse frequencies (hd/2,) float64 of ``cfg.yoco.rope_frequencies``."""
    hd = cfg.head_dim
    if cfg.yoco.rope_frequencies == "released":
        # float32 like the released code, so its angles come out bit for bit; float64 holds them exactly
        exponents = torch.linspace(0, 1, hd // 2, dtype=torch.float32)
        return (1.0 / (cfg.rope_theta ** exponents)).double()
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))


ROPE_FREQUENCIES["yoco"] = inv_freq


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate (B, T, H, hd) by position; ``cos`` / ``sin`` in the rotate-half table layout
    (..., hd) = [angles, angles], read in ``pairing``."""
    if pairing == "rotate_half":
        x1, x2 = x.chunk(2, dim=-1)
        return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    half = x.shape[-1] // 2
    c = cos[..., :half].repeat_interleave(2, dim=-1)                   # (..., hd): a0 a0 a1 a1 ...
    s = sin[..., :half].repeat_interleave(2, dim=-1)
    pairs = x.unflatten(-1, (half, 2))                                 # (B, T, H, hd/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)   # (-x1, x0, -x3, x2, ...)
    return (x * c + rotated * s).to(x.dtype)


# ---------------------------------------------------------------- weight conversion

def pairing_permutation(head_dim: int) -> torch.Tensor:
    """Index (hd,): rotate-half dimension j takes interleaved dimension ``perm[j]``
    (pair i = interleaved (2i, 2i+1) -> rotate-half (i, i + hd/2))."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_rows(t: torch.Tensor, head_dim: int, to: str) -> torch.Tensor:
    """Rows (H*hd, ...) of a query/key projection weight or bias, each head's dimensions
    reordered from the other pairing into ``to``."""
    perm = pairing_permutation(head_dim)
    if to == "interleaved":
        perm = torch.argsort(perm)
    heads = t.shape[0] // head_dim
    return t.reshape(heads, head_dim, *t.shape[1:])[:, perm].reshape(t.shape)


#: Our names of the RoPE'd projections of a YOCO model (self-decoder q/k, cross-decoder q, shared k).
_ROTATED = re.compile(r"^(layers\.\d+\.attention\.w[qk]|shared_kv\.proj\.wk)\.(weight|bias)$")


def convert_pairing(tensors: dict[str, torch.Tensor], cfg, to: str) -> dict[str, torch.Tensor]:
    """A YOCO state dict of ``cfg`` (whose ``yoco.rope_pairing`` is the weights' pairing) with
    every query/key projection permuted into pairing ``to``: loaded into a model with
    ``rope_pairing: to`` (other settings equal) it computes the same logits."""
    if to not in PAIRINGS:
        raise ValueError(f"pairing {to!r}: choose one of {', '.join(PAIRINGS)}")
    if to == cfg.yoco.rope_pairing:
        return dict(tensors)
    return {name: permute_rows(t, cfg.head_dim, to) if _ROTATED.match(name) else t
            for name, t in tensors.items()}
