"""Parameter counts and training FLOPs per token, for any spec (MFU's numerator).

Counted from the model built on the meta device, so every architecture is counted by
the same rules:

* ``total``: every parameter once (tied ones once);
* ``matmul``: parameters of dimension >= 2 outside embedding tables: the weights every
  token multiplies through (the output head included, also when tied);
* ``active``: ``matmul`` with sparse modules (a module defining ``active_params()``,
  e.g. an MoE layer) counting only what one token activates.

Training FLOPs per token = 6 x active matmul parameters + the attention score and
weighted-sum work the attention modules report (``attention_flops(seq_len)``), the
PaLM appendix-B convention (also torchtitan's): the causal mask's skipped half is
not subtracted, so MFU stays comparable across codebases.

KV-cache bytes per token (:func:`kv_cache_bytes_per_token`) come from the spec's own
inference cache, so every architecture reports its figure (the trainer logs it at start).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Counts:
    total: int
    embedding: int
    matmul: int
    active: int
    attention_flops_per_pos: float        # attention FLOPs per token per unit of sequence length


def _count(model: nn.Module) -> Counts:
    seen: set[int] = set()
    total = embedding = matmul = active = 0
    attn = 0.0
    sparse_roots: list[str] = []
    for name, module in model.named_modules():
        if hasattr(module, "active_params") and not any(name.startswith(r + ".") for r in sparse_roots):
            sparse_roots.append(name)
            active += module.active_params()
        if hasattr(module, "attention_flops"):
            attn += module.attention_flops(1)
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if isinstance(module, nn.Embedding):
                embedding += p.numel()
            elif p.dim() >= 2:
                matmul += p.numel()
                inside_sparse = any(name == r or name.startswith(r + ".") for r in sparse_roots)
                if not inside_sparse:
                    active += p.numel()
    if _tied_head(model):
        head_weight: torch.Tensor = model.get_submodule("output").weight  # type: ignore[assignment]
        matmul += head_weight.numel()
        active += head_weight.numel()
    return Counts(total, embedding, matmul, active, attn)


def _tied_head(model: nn.Module) -> bool:
    head, emb = getattr(model, "output", None), getattr(model, "tok_embeddings", None)
    return head is not None and emb is not None and head.weight is emb.weight


_CACHE: dict[str, Counts] = {}


def counts(cfg) -> Counts:
    """Counts for model config ``cfg`` (cached per configuration)."""
    import dataclasses
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _CACHE:
        from polytron.model.transformer import Transformer
        with torch.device("meta"):
            _CACHE[key] = _count(Transformer(cfg))
    return _CACHE[key]


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), attention included."""
    c = counts(cfg)
    return 6.0 * c.active + c.attention_flops_per_pos * seq_len


def kv_cache_bytes_per_token(cfg, dtype: torch.dtype = torch.bfloat16):
    """Bytes the architecture's inference cache (``spec.make_cache``) grows by per token of one
    sequence, at ``dtype`` (None when the spec declares no cache). Measured on the meta device as
    the difference between caches of 2 and 1 positions, so it is the per-token part only."""
    from polytron.model.spec import get_spec
    make = get_spec(cfg.arch).make_cache
    if make is None:
        return None
    size = lambda n: make(cfg, 1, n, "meta", dtype).bytes()  # noqa: E731
    return size(2) - size(1)


def describe_kv_cache(cfg, dtype: torch.dtype = torch.bfloat16) -> str:
    """One log line: the inference cache's bytes per token (all layers, one sequence)."""
    n = kv_cache_bytes_per_token(cfg, dtype)
    what = "no inference cache declared" if n is None else f"{n} bytes/token ({n / 1024:.1f} KiB)"
    return f"kv cache: {what} at {str(dtype).replace('torch.', '')}, all layers, per sequence"
