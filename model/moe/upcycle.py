"""Upcycling dense checkpoints into MoE checkpoints (docs/upcycling.md).

Two recipes, both producing the state dict of a ``model.arch=moe`` model whose attention,
norms and embeddings come from the dense source(s):

* **sparse upcycling** (Komatsuzaki et al. 2022): every routed expert starts as a copy of
  the dense SwiGLU (optionally plus small noise), or, with ``partition``, the dense
  inner width is cut into fine-grained slices, one per expert (and per shared expert);
* **UpIT** (Hui et al. 2024): K intermediate checkpoints of one dense run give K experts;
  a genetic algorithm grows them to N (offspring: parameter merges of the two most
  different experts plus mutation, the most diverse of several candidates kept); the
  routers are pre-optimized to send each seed sample to the expert whose dense model
  has the lowest loss on it.

Names: the dense MLP of layer i is ``layers.i.mlp.{w1,w3,w2}.<p>`` (gate, up, down); an MoE
layer holds ``layers.i.mlp.router.weight`` (E, d) fp32, ``layers.i.mlp.experts.{gate,up,
down}.<p with . -> _>`` stacked (E, ...) and, with shared experts, ``layers.i.mlp.shared.
{w1,w3,w2}.<p>`` (one SwiGLU of shared_experts x expert width).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, cast

import torch
import torch.nn.functional as F

from polytron.model.hf import ConvertError
from polytron.model.moe.config import MoEConfig, is_moe_layer

DENSE = ("w1", "w3", "w2")                                   # gate, up, down of the dense SwiGLU
STACKED = {"w1": "gate", "w3": "up", "w2": "down"}


# ====================================================================== configs

def check_dense(cfg) -> None:
    """The source must be a dense decoder with the SwiGLU MLP slot: an architecture laid out
    in the dense decoder's units (model/llama), whichever slots it fills them with."""
    from polytron.model.llama import units as dense_units
    from polytron.model.spec import get_spec
    if cfg.mlp != "swiglu" or get_spec(cfg.arch).units is not dense_units:
        raise ConvertError(f"source model: arch={cfg.arch}, mlp={cfg.mlp}; upcycling reads a dense decoder "
                           "with the swiglu MLP (model.mlp=swiglu)")


def moe_config(dense, moe: MoEConfig, partition: bool):
    """The MoE ModelConfig: ``dense`` with ``model.arch=moe, mlp=moe`` and ``moe`` (whose
    expert width is derived here: the dense width, or for ``partition`` the dense width
    over routed + shared experts)."""
    check_dense(dense)
    ffn = dense.ffn_hidden_size
    if partition:
        if dense.linear != "linear":
            raise ConvertError(f"--partition slices plain linear projections (model.linear={dense.linear}); "
                               "use copies for other linear kinds")
        parts = moe.num_experts + moe.shared_experts
        if ffn % parts:
            raise ConvertError(f"--partition: the dense ffn_hidden_size={ffn} does not split into num_experts + "
                               f"shared_experts = {parts} equal slices")
        moe = dataclasses.replace(moe, expert_ffn_hidden_size=ffn // parts)
    else:
        moe = dataclasses.replace(moe, expert_ffn_hidden_size=ffn)
    arch = "moe" if dense.arch == "llama" else dense.arch
    cfg = dataclasses.replace(dense, arch=arch, mlp="moe", moe=moe)
    cfg.validate()
    return cfg


# ====================================================================== sparse upcycling

def _ffn(tensors: dict, layer: int) -> dict[str, dict[str, torch.Tensor]]:
    """{w1|w3|w2: {param suffix: tensor}} of the dense MLP of ``layer``."""
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in DENSE}
    for name in DENSE:
        prefix = f"layers.{layer}.mlp.{name}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                out[name][k[len(prefix):]] = v
    if not all(out.values()):
        raise ConvertError(f"source checkpoint: layer {layer} has no dense SwiGLU tensors layers.{layer}.mlp.w1/w3/w2")
    return out


def _non_ffn(tensors: dict, moe_layers: list[int]) -> dict[str, torch.Tensor]:
    drop = tuple(f"layers.{i}.mlp." for i in moe_layers)
    return {k: v for k, v in tensors.items() if not k.startswith(drop)}


def _router(num_experts: int, width: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """(E, d) fp32 router weight: N(0, std) (zero when std is 0)."""
    return torch.randn(num_experts, width, generator=gen) * std


def _stack(experts: list[dict[str, dict[str, torch.Tensor]]], layer: int) -> dict[str, torch.Tensor]:
    """E per-expert {w1|w3|w2: {suffix: t}} -> the MoE layer's stacked expert tensors."""
    out = {}
    for name in DENSE:
        for suffix in experts[0][name]:
            key = f"layers.{layer}.mlp.experts.{STACKED[name]}.{suffix.replace('.', '_')}"
            out[key] = torch.stack([e[name][suffix] for e in experts])          # (E, ...)
    return out


def _shared(pieces: list[dict[str, dict[str, torch.Tensor]]], layer: int, bias2: Optional[torch.Tensor]):
    """S SwiGLU pieces -> the shared SwiGLU of S x width: gate/up rows and down columns
    concatenated, one down bias."""
    out = {}
    for name in DENSE:
        for suffix in pieces[0][name]:
            key = f"layers.{layer}.mlp.shared.{name}.{suffix}"
            if name == "w2" and suffix == "bias":
                out[key] = bias2
            else:
                out[key] = torch.cat([p[name][suffix] for p in pieces], dim=1 if name == "w2" else 0)
    return out


def _scaled(ffn: dict, scale: float) -> dict:
    """The SwiGLU with its output (down weight and bias) times ``scale``."""
    return {**ffn, "w2": {k: v * scale for k, v in ffn["w2"].items()}}


def _noisy(ffn: dict, noise: float, gen: torch.Generator) -> dict:
    """Weights (not biases) plus Gaussian noise of ``noise`` x each tensor's std."""
    if noise == 0:
        return ffn
    return {n: {k: (v + torch.randn(v.shape, generator=gen).to(v.dtype) * noise * v.float().std().item()
                    if not k.endswith("bias") else v) for k, v in d.items()} for n, d in ffn.items()}


def _slice(ffn: dict, start: int, stop: int) -> dict:
    """Inner columns [start, stop) of the SwiGLU (gate/up rows, down columns; down bias dropped)."""
    out: dict[str, dict] = {"w1": {}, "w3": {}, "w2": {}}
    for name in ("w1", "w3"):
        for k, v in ffn[name].items():
            out[name][k] = v[start:stop].clone()
    out["w2"] = {k: v[:, start:stop].clone() for k, v in ffn["w2"].items() if k != "bias"}
    if "bias" in ffn["w2"]:
        out["w2"]["bias"] = torch.zeros_like(ffn["w2"]["bias"])
    return out


def sparse_layer(ffn: dict, moe: MoEConfig, layer: int, partition: bool, noise: float, gen) -> dict:
    """The MoE tensors of one layer from its dense SwiGLU ``ffn``.

    Copies: S shared + E routed copies, every down projection (and bias) scaled by 1/(S+1);
    with top-k weights summing to 1 the routed sum is one dense MLP/(S+1), the shared part
    S of them: exactly the dense output. Partition: the inner width cut into S + E slices
    (the first S the shared expert), down bias on the shared expert, else 1/E per routed
    expert; exact when all E experts are chosen with weight 1 each.
    """
    S, E = moe.shared_experts, moe.num_experts
    bias2 = ffn["w2"].get("bias")
    if partition:
        w = moe.expert_ffn_hidden_size
        pieces = [_slice(ffn, j * w, (j + 1) * w) for j in range(S + E)]
        routed, shared = pieces[S:], pieces[:S]
        if bias2 is not None and not S:
            for p in routed:
                p["w2"]["bias"] = bias2 / E
        out = _stack(routed, layer)
        if S:
            out.update(_shared(shared, layer, bias2))
        return out
    scale = 1.0 / (S + 1)
    routed = [_noisy(_scaled(ffn, scale), noise, gen) for _ in range(E)]
    out = _stack(routed, layer)
    if S:
        out.update(_shared([_scaled(ffn, scale)] * S, layer, None if bias2 is None else bias2 * (S * scale)))
    return out


def sparse_upcycle(tensors: dict, cfg, partition: bool = False, noise: float = 0.0,
                   router_std: Optional[float] = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense ``tensors`` -> the state dict of the MoE model ``cfg`` (from :func:`moe_config`).
    Routers: N(0, router_std) (default: the model's init_std) for copies, zero for a
    partition (every expert scores the same; with top_k = E all are chosen)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [i for i in range(cfg.num_layers) if is_moe_layer(cfg.moe, i)]
    out = _non_ffn(tensors, layers)
    std = 0.0 if partition else (cfg.init_std if router_std is None else router_std)
    for i in layers:
        out.update(sparse_layer(_ffn(tensors, i), cfg.moe, i, partition, noise, gen))
        out[f"layers.{i}.mlp.router.weight"] = _router(cfg.moe.num_experts, cfg.hidden_size, std, gen)
    return with_buffers(out, cfg)


def with_buffers(tensors: dict, cfg) -> dict[str, torch.Tensor]:
    """Add the MoE model's persistent buffers (the balancing bias / load: zeros) and check
    every name and shape against the model."""
    from polytron.model.transformer import param_shapes
    shapes = param_shapes(cfg)
    for k, shape in shapes.items():
        if k not in tensors and (k.endswith("expert_bias") or k.endswith("expert_load")):
            tensors[k] = torch.zeros(shape)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    bad = [k for k in shapes if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    if missing or extra or bad:
        raise ConvertError(f"upcycled tensors do not fit the MoE model: missing {missing[:3]}, unexpected "
                           f"{extra[:3]}, wrong shape {bad[:3]}")
    return tensors


# ====================================================================== UpIT: sources

def check_same(cfgs: list, tensors: list[dict], names: list[str]) -> None:
    """All sources must share one model config (architecture and shapes) and tensor set."""
    base = dataclasses.asdict(cfgs[0])
    for cfg, t, name in zip(cfgs[1:], tensors[1:], names[1:]):
        diff = [k for k, v in dataclasses.asdict(cfg).items() if base.get(k) != v]
        if diff:
            k = diff[0]
            raise ConvertError(f"{name}: model.{k}={getattr(cfg, k)!r} differs from {names[0]} "
                               f"(model.{k}={base[k]!r}); UpIT checkpoints must share one architecture and shape")
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        ref = {k: tuple(v.shape) for k, v in tensors[0].items()}
        if shapes != ref:
            k = sorted(set(shapes.items()) ^ set(ref.items()))[0][0]
            raise ConvertError(f"{name}: tensor {k} differs in presence or shape from {names[0]}")


def mean_tensors(tensors: list[dict]) -> dict[str, torch.Tensor]:
    """Elementwise mean of the sources (fp32 accumulate, source dtype)."""
    return {k: (sum(t[k].float() for t in tensors) / len(tensors)).to(v.dtype) for k, v in tensors[0].items()}


# ====================================================================== UpIT: expert expansion

@dataclass
class Expansion:
    """Genetic expert expansion settings (UpIT sec. 3.2)."""
    merge: str = "average"          # "average" (random convex weight) or "dare" (drop-and-rescale deltas)
    weight_range: tuple[float, float] = (0.2, 0.8)   # the parents' mixing weight lambda ~ U(range)
    dare_drop: float = 0.5          # DARE drop rate p of each parent's delta from the population mean
    mutation_rate: float = 0.1      # fraction of elements mutated
    mutation_scale: float = 0.1     # mutation noise std, relative to each tensor's std
    candidates: int = 8             # offspring generated per new expert; the most diverse is kept


@dataclass
class Offspring:
    """One new expert: its parents, distances and the diversity it was selected by."""
    index: int
    parents: tuple[int, int]
    weight: float
    distance_to_parents: list[float] = field(default_factory=list)
    diversity: float = 0.0          # min distance to every expert before it


def _flat(expert: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for d in expert.values() for v in d.values()])


def distance(a: dict, b: dict) -> float:
    """1 - cosine similarity of two experts' flattened parameters."""
    return 1.0 - F.cosine_similarity(_flat(a), _flat(b), dim=0).item()


def _merge(a: dict, b: dict, lam: float, base: Optional[dict], cfg: Expansion, gen) -> dict:
    """lam * a + (1 - lam) * b, or with DARE: base + lam * drop(a - base) + (1 - lam) * drop(b - base)
    (each delta element kept with probability 1 - p and rescaled by 1 / (1 - p))."""
    out: dict[str, dict] = {}
    for n in a:
        out[n] = {}
        for k in a[n]:
            x, y = a[n][k].float(), b[n][k].float()
            if cfg.merge == "dare":
                assert base is not None                 # DARE merges deltas from the base
                c = base[n][k].float()
                keep = 1.0 - cfg.dare_drop
                mx = (torch.rand(x.shape, generator=gen) < keep).float() / keep
                my = (torch.rand(y.shape, generator=gen) < keep).float() / keep
                z = c + lam * (x - c) * mx + (1 - lam) * (y - c) * my
            else:
                z = lam * x + (1 - lam) * y
            out[n][k] = z
    return out


def _mutate(expert: dict, cfg: Expansion, gen, dtype) -> dict:
    """Gaussian noise (mutation_scale x tensor std) on a mutation_rate fraction of elements."""
    out: dict[str, dict] = {}
    for n, d in expert.items():
        out[n] = {}
        for k, v in d.items():
            if cfg.mutation_rate > 0 and cfg.mutation_scale > 0:
                mask = (torch.rand(v.shape, generator=gen) < cfg.mutation_rate).float()
                v = v + mask * torch.randn(v.shape, generator=gen) * cfg.mutation_scale * v.std().item()
            out[n][k] = v.to(dtype)
    return out


def expand(experts: list[dict], target: int, cfg: Expansion,
           gen: torch.Generator) -> tuple[list[dict], list[Offspring]]:
    """Grow ``experts`` (each {w1|w3|w2: {suffix: t}}) to ``target``: parents = the pair at the
    largest distance; ``candidates`` offspring by merge + mutation; keep the one whose smallest
    distance to all current experts is largest (diversity); repeat."""
    pop = list(experts)
    base = {n: {k: sum(e[n][k].float() for e in experts) / len(experts) for k in d} for n, d in experts[0].items()}
    dtype = next(iter(experts[0]["w1"].values())).dtype
    log = []
    while len(pop) < target:
        pairs = [(distance(pop[i], pop[j]), i, j) for i in range(len(pop)) for j in range(i + 1, len(pop))]
        _, a, b = max(pairs)
        best = None
        for _ in range(cfg.candidates):
            lo, hi = cfg.weight_range
            lam = lo + (hi - lo) * torch.rand((), generator=gen).item()
            child = _mutate(_merge(pop[a], pop[b], lam, base, cfg, gen), cfg, gen, dtype)
            div = min(distance(child, e) for e in pop)
            if best is None or div > best[0]:
                best = (div, lam, child)
        assert best is not None                         # at least one attempt per child
        div, lam, child = best
        log.append(Offspring(len(pop), (a, b), round(lam, 4), [distance(child, pop[a]), distance(child, pop[b])], div))
        pop.append(child)
    return pop, log


def upit_tensors(sources: list[dict], cfg, num_experts: int, expansion: Expansion, seed: int = 0):
    """K dense sources -> (MoE tensors with N = cfg.moe.num_experts experts, per-layer offspring
    logs, per-expert dense tensors for labelling). Non-MoE tensors: the mean of the sources.
    Routers start at N(0, init_std); :func:`pre_optimize_routers` trains them."""
    gen = torch.Generator().manual_seed(seed)
    layers = [i for i in range(cfg.num_layers) if is_moe_layer(cfg.moe, i)]
    shared = mean_tensors(sources)
    out = _non_ffn(shared, layers)
    logs = {}
    dense = [dict(shared) for _ in range(num_experts)]       # expert e's dense model: shared + FFN e
    for i in layers:
        pop, logs[i] = expand([_ffn(t, i) for t in sources], num_experts, expansion, gen)
        out.update(_stack(pop, i))
        out[f"layers.{i}.mlp.router.weight"] = _router(num_experts, cfg.hidden_size, cfg.init_std, gen)
        for e, ex in enumerate(pop):
            for n in DENSE:
                for k, v in ex[n].items():
                    dense[e][f"layers.{i}.mlp.{n}.{k}"] = v
    for e in range(len(sources)):
        dense[e] = sources[e]                                  # a source expert labels with its own checkpoint
    return with_buffers(out, cfg), logs, dense


# ====================================================================== UpIT: router pre-optimization

def _masked_labels(batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    if "loss_mask" in batch:
        labels = labels.masked_fill(batch["loss_mask"] == 0, -100)
    return labels


@torch.no_grad()
def sample_losses(model, batches: list[dict]) -> torch.Tensor:
    """(S,) mean next-token loss of every sample (row) of ``batches``."""
    model.eval()
    out = []
    for b in batches:
        kwargs = {k: b[k] for k in ("position_ids", "doc_ids") if k in b}
        logits = model(b["tokens"], **kwargs).float()                          # (B, T, V)
        labels = _masked_labels(b)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")   # (B, T)
        out.append(nll.sum(1) / (labels != -100).sum(1).clamp_min(1))
    return torch.cat(out)


def seed_labels(dense_models: list, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (S,), losses (N, S)): each sample's label is the expert whose dense model has
    the lowest loss on it."""
    losses = torch.stack([sample_losses(m, batches) for m in dense_models])   # (N, S)
    return losses.argmin(0), losses


def select_seed(losses: torch.Tensor, per_expert: int) -> list[list[int]]:
    """Seed samples each expert excels at: score[e, s] = loss[e, s] - mean over experts of
    loss[:, s] (below zero: better than the average expert on s); experts take turns picking
    their lowest-score sample not yet taken, ``per_expert`` each. Returns sample ids per expert."""
    score = losses - losses.mean(0, keepdim=True)                             # (N, S)
    order = score.argsort(1).tolist()                                         # best first per expert
    taken: set[int] = set()
    picks: list[list[int]] = [[] for _ in order]
    cursor = [0] * len(order)
    for _ in range(per_expert):
        for e, ranked in enumerate(order):
            while cursor[e] < len(ranked) and ranked[cursor[e]] in taken:
                cursor[e] += 1
            if cursor[e] == len(ranked):
                raise ValueError(f"{len(ranked)} seed samples cannot give {per_expert} to each of {len(order)} experts")
            picks[e].append(ranked[cursor[e]])
            taken.add(ranked[cursor[e]])
    return picks


def rows(batches: list[dict]) -> list[dict]:
    """Micro-batches -> one dict per sample (row slices of every per-row tensor)."""
    out = []
    for b in batches:
        B = b["tokens"].shape[0]
        for r in range(B):
            out.append({k: v[r:r + 1] for k, v in b.items() if torch.is_tensor(v) and v.dim() and v.shape[0] == B})
    return out


def rebatch(samples: list[dict], labels: list[int], size: int) -> tuple[list[dict], list[torch.Tensor]]:
    """Samples and their labels -> micro-batches of ``size`` rows and per-batch label tensors."""
    batches, ys = [], []
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        batches.append({k: torch.cat([c[k] for c in chunk]) for k in chunk[0]})
        ys.append(torch.tensor(labels[i:i + size]))
    return batches, ys


class _Done(Exception):
    """Ends a forward once the last router has run."""


class _RouterTap:
    """Forward hooks collecting every router's logits (N_tokens, E) over detached inputs."""

    def __init__(self, model):
        from polytron.model.moe.router import Router
        self.logits: list[torch.Tensor] = []
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, router, args, output):
        x = args[0].detach().float()                                           # (N, d)
        with torch.enable_grad():
            self.logits.append(x @ router.weight.float().t())                  # (N, E)
        if router is self.routers[-1]:
            raise _Done                                                        # nothing after it is needed

    def close(self):
        for h in self.handles:
            h.remove()


def _forward_logits(model, batch: dict) -> list[torch.Tensor]:
    """Every MoE layer's router logits (B*T, E) for ``batch``: the model runs without gradients
    up to the last router; the logits carry gradients to the router weights only."""
    tap = _RouterTap(model)
    try:
        kwargs = {k: batch[k] for k in ("position_ids", "doc_ids") if k in batch}
        with torch.no_grad():
            model(batch["tokens"], **kwargs)
    except _Done:
        pass
    finally:
        tap.close()
    return tap.logits


def routed_experts(model, batches: list[dict], k: int = 1) -> torch.Tensor:
    """(S, k) each sample's k experts, best first: the top-k of the router probabilities
    averaged over its tokens and the MoE layers."""
    out = []
    with torch.no_grad():
        for b in batches:
            B, T = b["tokens"].shape
            means = (lg.softmax(-1).view(B, T, -1).mean(1) for lg in _forward_logits(model, b))  # (B, E) each
            probs = cast(torch.Tensor, sum(means))                                                 # (B, E)
            out.append(probs.topk(k, -1).indices)                                                     # (B, k)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def routing_accuracy(model, batches: list[dict], labels: list[torch.Tensor], k: int = 1) -> float:
    """Fraction of samples whose label is among their ``k`` routed experts
    (:func:`routed_experts`; k = 1: the argmax)."""
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if not len(y):
        return 0.0
    return (routed_experts(model, batches, k) == y[:, None]).any(-1).float().mean().item()


def confusion(model, batches: list[dict], labels: list[torch.Tensor], n: int) -> list[list[int]]:
    """(N, N) counts: row = a sample's label, column = its routed expert (top-1)."""
    y = torch.cat(labels)
    m = torch.zeros(n, n, dtype=torch.long)
    m.index_put_((y, routed_experts(model, batches)[:, 0]), torch.ones_like(y), accumulate=True)
    return m.tolist()


def pre_optimize_routers(model, batches: list[dict], labels: list[torch.Tensor], steps: int,
                         lr: float) -> list[float]:
    """Train only the router weights for ``steps`` Adam steps (cycling over ``batches``):
    cross-entropy of every MoE layer's router logits, averaged over the sample's tokens,
    against the sample's label, averaged over layers. Returns the loss per step."""
    from polytron.model.moe.router import Router
    model.eval()
    routers = [m.weight for m in model.modules() if isinstance(m, Router)]
    opt = torch.optim.Adam(routers, lr=lr)
    history = []
    for step in range(steps):
        b, y = batches[step % len(batches)], labels[step % len(batches)]
        B, T = b["tokens"].shape
        logits = _forward_logits(model, b)
        loss = cast(torch.Tensor, sum(F.cross_entropy(lg.view(B, T, -1).mean(1), y) for lg in logits)) / len(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(round(loss.item(), 5))
    return history


__all__ = ["moe_config", "sparse_upcycle", "upit_tensors", "Expansion", "expand", "distance", "seed_labels",
           "select_seed", "pre_optimize_routers", "routing_accuracy", "routed_experts", "confusion",
           "check_same"]
