"""MHA/GQA -> DHA: head similarity, grouping within a budget, and adaptive heads fusion.

One device, no I/O: ``tools/convert_mha_to_dha.py`` loads the source and the
calibration batches and writes the result. The steps, after Chen et al. 2024 (DHA):

1. **Similarity** (:func:`head_grams`). On the calibration tokens, every source key
   head's projection ``Y_i = x W_i`` (N x hd, before RoPE, which rotates all heads
   alike) and every value head's are collected per layer; their Gram matrix
   ``C_ij = <Y_i, Y_j>`` gives the cosine similarity ``C_ij / sqrt(C_ii C_jj)`` (the
   heat maps of the paper's Fig. 2), separately for keys and values.
2. **Grouping** (:func:`choose_groups`). A group ``M`` is replaced by one head
   ``sum_j w_j W_j``; its *fusion residual* is the least error of such a head over its
   members, ``min_w sum_{i in M} ||Y_i - sum_j w_j Y_j||^2`` (closed form from ``C``),
   divided by the layer's key (or value) energy ``trace C``. Starting from one group
   per head, the merge of two groups that adds the least residual is taken, across all
   layers and both kinds at once (a fraction budget) or within each layer (a per-layer
   budget), until the budget is met. So redundant layers and kinds give up more heads,
   and key and value groups differ: the decoupled allocation of the paper's search
   stage, found here by a greedy search on the residual instead of learned masks.
3. **Adaptive heads fusion** (:class:`FusingProjection`, :func:`fuse`). Every member
   ``i`` of a group starts as itself, ``W'_i = sum_{j in M} Omega_ij W_j`` with
   ``Omega = I``, so the model is exactly the source. The fusion operators ``Omega``
   (all other weights frozen) are trained on the calibration set with the language-
   model loss plus an augmented Lagrangian that makes the rows of each group's
   ``Omega`` equal, following a target that falls linearly from the start distance to
   0: the heads of a group are fused step by step. Then each group becomes one head
   with the mean row (``merge``). With ``Omega`` never trained the mean row is
   ``1/|M|``: mean pooling (the GQA initialization), the baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("key", "value")
ROLE_KIND = {"k": "key", "v": "value"}

Groups = list[list[int]]                       # member source heads of each group, sorted


# ---------------------------------------------------------------- source projections

def kv_projections(model: nn.Module) -> dict[tuple[int, str], str]:
    """(layer, kind) -> module path of the source model's key / value projection (found by role)."""
    out = {}
    for name, module in model.named_modules():
        kind = ROLE_KIND.get(getattr(module, "role", ""))
        if kind and name.startswith("layers."):
            out[(int(name.split(".")[1]), kind)] = name
    return out


@torch.no_grad()
def head_grams(model: nn.Module, batches: Iterable[torch.Tensor], head_dim: int) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, kind) -> (H, H) float64 Gram matrix of the source heads' projections over all
    calibration tokens (``batches``: token tensors (B, T))."""
    grams: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def hook(key):
        def record(_module, _inputs, y):
            heads = y.detach().double().reshape(-1, y.shape[-1] // head_dim, head_dim)   # (N, H, hd)
            g = torch.einsum("nhd,ngd->hg", heads, heads)                               # (H, H)
            grams[key] = grams[key] + g if key in grams else g
        return record

    for key, path in kv_projections(model).items():
        hooks.append(model.get_submodule(path).register_forward_hook(hook(key)))
    try:
        for tokens in batches:
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return grams


def cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the heads (H, H) from their Gram matrix."""
    d = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / d[:, None] / d[None, :]


def fusion_residual(gram: torch.Tensor, members: list[int]) -> float:
    """min_w sum_{i in M} ||Y_i - sum_j w_j Y_j||^2 from the Gram matrix (float64).

    With C the members' Gram block and s = C 1: w* = C^+ s / |M|, residual trace C - s.w*."""
    C = gram[members][:, members]
    s = C.sum(0)
    w = torch.linalg.pinv(C) @ s / len(members)
    return float(C.trace() - s @ w)


# ---------------------------------------------------------------- grouping

@dataclass
class Pool:
    """(layer, kind) entries that share one head budget."""
    keys: list[tuple[int, str]]
    target: int                             # groups left in the pool when merging stops


def choose_groups(grams: dict[tuple[int, str], torch.Tensor], pools: list[Pool]) -> dict[tuple[int, str], Groups]:
    """Greedy least-residual merging until each pool holds its target number of groups."""
    groups: dict[tuple[int, str], Groups] = {k: [[i] for i in range(g.shape[0])] for k, g in grams.items()}
    energy = {k: float(g.trace()) or 1.0 for k, g in grams.items()}
    for pool in pools:
        count = sum(len(groups[k]) for k in pool.keys)
        while count > pool.target:
            best = None
            for key in pool.keys:
                cur = groups[key]
                costs = [fusion_residual(grams[key], m) for m in cur]
                for a in range(len(cur)):
                    for b in range(a + 1, len(cur)):
                        merged = sorted(cur[a] + cur[b])
                        delta = (fusion_residual(grams[key], merged) - costs[a] - costs[b]) / energy[key]
                        cand = (delta, key, a, b)
                        if best is None or cand[0] < best[0]:
                            best = cand
            if best is None:
                raise ValueError("the budget leaves a layer without a key or value head")
            _, key, a, b = best
            cur = groups[key]
            cur[a] = sorted(cur[a] + cur[b])
            del cur[b]
            groups[key] = sorted(cur)
            count -= 1
    return groups


def contiguous_groups(heads: int, count: int) -> Groups:
    """GQA-style groups: ``count`` contiguous blocks of ``heads / count`` heads."""
    size = heads // count
    return [list(range(g * size, (g + 1) * size)) for g in range(count)]


# ---------------------------------------------------------------- fusion

class FusingProjection(nn.Module):
    """A source K or V projection during fusion: member head i computes
    ``(sum_j Omega_ij W_j) x (+ bias likewise)`` with Omega block-diagonal by group.

    Only the entries inside multi-head groups train; singleton groups keep their head."""

    source_weight: torch.Tensor         # (H, hd*d) buffers, registered in __init__
    source_bias: Optional[torch.Tensor]  # (H, hd)
    mask: torch.Tensor                  # (H, H)
    average: torch.Tensor               # (H, H)

    def __init__(self, source: nn.Module, groups: Groups, head_dim: int):
        super().__init__()
        w = source.get_parameter("weight").detach()                         # (H*hd, d)
        self.heads, self.head_dim, self.groups = w.shape[0] // head_dim, head_dim, groups
        self.register_buffer("source_weight", w.reshape(self.heads, -1).clone())   # (H, hd*d)
        b = getattr(source, "bias", None)
        self.register_buffer("source_bias", None if b is None else b.detach().reshape(self.heads, head_dim).clone())
        mask = torch.zeros(self.heads, self.heads)
        for g in groups:
            if len(g) > 1:
                mask[torch.tensor(g)[:, None], torch.tensor(g)[None, :]] = 1.0
        self.register_buffer("mask", mask)
        average = torch.zeros(self.heads, self.heads)                       # group-mean of rows
        for g in groups:
            average[torch.tensor(g)[:, None], torch.tensor(g)[None, :]] = 1.0 / len(g)
        self.register_buffer("average", average)
        self.omega = nn.Parameter(torch.eye(self.heads))
        self.tied = False               # True: every member uses its group's mean row (merged)

    def mixing(self) -> torch.Tensor:
        """(H, H): Omega inside groups, identity for singleton groups, 0 elsewhere; when
        ``tied``, each row replaced by its group's mean row (the merged heads)."""
        fixed = torch.diag(1.0 - self.mask.diagonal())
        m = self.omega * self.mask + fixed
        return self.average @ m if self.tied else m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixing()
        w = (m @ self.source_weight).reshape(self.heads * self.head_dim, -1)          # (H*hd, d)
        b = None if self.source_bias is None else (m @ self.source_bias).reshape(-1)
        return F.linear(x, w, b)

    def distance(self) -> torch.Tensor:
        """Sum over groups of the squared distances of members' Omega rows to the group mean."""
        m = self.mixing()
        total = m.new_zeros(())
        for g in self.groups:
            if len(g) > 1:
                rows = m[g][:, g]                                           # (|g|, |g|)
                total = total + (rows - rows.mean(0, keepdim=True)).pow(2).sum()
        return total

    @torch.no_grad()
    def merge(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One head per group (mean Omega row over its members): weight (G*hd, d), bias (G*hd,)."""
        m = self.mixing()
        ws, bs = [], []
        for g in self.groups:
            if len(g) == 1:                       # the source head itself, bit for bit
                ws.append(self.source_weight[g[0]])
                if self.source_bias is not None:
                    bs.append(self.source_bias[g[0]])
                continue
            row = m[g][:, g].mean(0)                                        # (|g|,)
            ws.append(row @ self.source_weight[g])
            if self.source_bias is not None:
                bs.append(row @ self.source_bias[g])
        weight = torch.stack(ws).reshape(len(self.groups) * self.head_dim, -1)
        bias = torch.stack(bs).reshape(-1) if bs else None
        return weight, bias


@dataclass
class FusionLog:
    """Per-step history of :func:`fuse` (for the report)."""
    loss: list[float] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)


def install(model: nn.Module, groups: dict[tuple[int, str], Groups],
            head_dim: int) -> dict[str, tuple[tuple[int, str], FusingProjection]]:
    """Replace every K/V projection of ``model`` by a FusingProjection (in place); returns
    module path -> ((layer, kind), the FusingProjection)."""
    fusing = {}
    for key, path in kv_projections(model).items():
        fp = FusingProjection(model.get_submodule(path), groups[key], head_dim)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, fp)
        fusing[path] = (key, fp)
    return fusing


def merged_tensors(source: dict[str, torch.Tensor], fusing: dict[str, tuple[tuple[int, str], FusingProjection]]
                   ) -> dict[str, torch.Tensor]:
    """The DHA model's tensors: the source's, with every K/V projection merged to its groups."""
    out = dict(source)
    for path, (_, fp) in fusing.items():
        weight, bias = fp.merge()
        out[f"{path}.weight"] = weight.contiguous()
        if bias is not None:
            out[f"{path}.bias"] = bias.contiguous()
    return out


def fuse(model: nn.Module, fusing: list[FusingProjection], batches: list[dict], steps: int,
         lr: float = 0.01, penalty: float = 10.0, loss_fn: Optional[Callable] = None) -> FusionLog:
    """Train the fusion operators (only them) for ``steps`` steps over ``batches`` (cycled).

    Steps [0, 3/4): LM loss + lambda (D - t) + penalty/2 (D - t)^2, with D the fusion
    distance relative to its start and a target t falling linearly from 1 to 0 over the
    first half of all steps, then 0; lambda follows the augmented-Lagrangian update
    lambda += penalty (D - t) after every step. Steps [3/4, 1): the heads are merged
    (each member uses its group's mean row, D = 0 exactly) and the merged fusion
    weights train on the LM loss alone, so the result is the model that was trained."""
    log = FusionLog()
    params = [fp.omega for fp in fusing if fp.mask.any()]
    if not params or steps <= 0:
        return log
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        d0 = float(sum(fp.distance() for fp in fusing))
    lam, half, merge_at = 0.0, steps / 2, (3 * steps) // 4
    loss_fn = loss_fn or lm_loss
    model.train()
    for step in range(steps):
        if step == merge_at:
            for fp in fusing:
                fp.tied = True
        target = max(0.0, 1.0 - step / half)
        ce = loss_fn(model, batches[step % len(batches)])
        gap = cast(torch.Tensor, sum(fp.distance() for fp in fusing)) / d0 - target
        loss = ce if step >= merge_at else ce + lam * gap + 0.5 * penalty * gap * gap
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lam += penalty * float(gap.detach())
        log.loss.append(float(ce.detach()))
        log.distance.append(float(gap.detach()) + target)
        log.target.append(target)
    for fp in fusing:
        fp.tied = True
    model.eval()
    return log


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token loss of one micro-batch ({tokens, labels[, loss_mask, position_ids, doc_ids]})."""
    labels = batch["labels"]
    if "loss_mask" in batch:
        labels = labels.masked_fill(batch["loss_mask"] == 0, -100)
    kwargs = {k: batch[k] for k in ("position_ids", "doc_ids") if k in batch}
    logits = model(batch["tokens"], **kwargs)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[dict]) -> float:
    """Token-weighted mean next-token loss over ``batches``."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        labels = b["labels"]
        if "loss_mask" in b:
            labels = labels.masked_fill(b["loss_mask"] == 0, -100)
        n = int((labels != -100).sum())
        total += float(lm_loss(model, b)) * n
        count += n
    return total / max(count, 1)


# ---------------------------------------------------------------- the DHA result

def query_maps(groups: Groups, num_heads: int, source_heads: int) -> list[int]:
    """Query head -> group: each query head keeps its source KV head's group."""
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    rep = num_heads // source_heads
    return [group_of[h // rep] for h in range(num_heads)]


def dha_lists(groups: dict[tuple[int, str], Groups], num_layers: int, num_heads: int,
              source_heads: int) -> dict[str, list]:
    """``model.dha`` lists of the grouping (a layer's map is [] where it is the contiguous default)."""
    out: dict[str, list] = {"key_heads": [], "value_heads": [], "key_map": [], "value_map": []}
    for layer in range(num_layers):
        for kind in KINDS:
            g = groups[(layer, kind)]
            mapping = query_maps(g, num_heads, source_heads)
            default = [h * len(g) // num_heads for h in range(num_heads)] if num_heads % len(g) == 0 else None
            out[f"{kind}_heads"].append(len(g))
            out[f"{kind}_map"].append([] if mapping == default else mapping)
    if all(not m for m in out["key_map"]):
        out["key_map"] = []
    if all(not m for m in out["value_map"]):
        out["value_map"] = []
    return out


def fraction_pool(fraction: float, num_layers: int, source_heads: int) -> list[Pool]:
    """One pool over every layer and both kinds, keeping ``fraction`` of the source key+value heads."""
    slots = fraction * 2 * num_layers * source_heads
    target = round(slots) if math.isfinite(slots) else 0
    if not 0 < fraction <= 1 or abs(slots - target) > 1e-6:
        raise ValueError(f"--budget {fraction}: {fraction} x {2 * num_layers * source_heads} source key+value "
                         f"heads = {slots:g} must be a whole number, with the fraction in (0, 1]")
    if target < 2 * num_layers:
        raise ValueError(f"--budget {fraction} leaves {target} key+value heads for {num_layers} layers; every "
                         f"layer needs a key and a value head (budget >= {1 / source_heads:.4g})")
    return [Pool([(layer, kind) for layer in range(num_layers) for kind in KINDS], target)]


def layer_pools(counts: list[float], num_layers: int, source_heads: int) -> list[Pool]:
    """One pool per layer: layer l keeps 2 n_l key+value heads (``counts`` = n_l, KV heads)."""
    if len(counts) != num_layers:
        raise ValueError(f"--layer-budget needs {num_layers} entries (one per layer), got {len(counts)}")
    pools = []
    for layer, n in enumerate(counts):
        if not 1 <= n <= source_heads or not float(2 * n).is_integer():
            raise ValueError(f"--layer-budget entry {layer} = {n:g}: KV heads of the layer, in [1, "
                             f"{source_heads}] (its key + value heads are 2 n, so n may end in .5)")
        pools.append(Pool([(layer, kind) for kind in KINDS], int(2 * n)))
    return pools
