"""The MoE MLP slot entries: ``moe`` (token routing) and ``mh_moe`` (multi-head MoE).

Both share one core, :class:`MoE`, over rows of width ``w`` (tokens: ``w = d``; MH-MoE
sub-tokens: ``w = d / h``). Per micro-batch of N rows:

1. the router picks k experts per row and their combine weights (model/moe/router.py);
2. the N*k assignments are ordered *slot-major* (every row's first choice, then every
   second choice) and stably sorted by expert, so each expert's rows are contiguous and,
   within an expert, first choices come first, then earlier rows. With capacity-factor
   routing an expert keeps its first ``C`` rows in that order (GShard / Switch priority;
   the released MH-MoE gate's order too); the rest move behind the kept rows and get a
   zero output. Training: ``C = ceil(cf * N * k / E)``, or ``k * ceil(cf * N / E)`` with
   ``capacity_rounding: per_choice``; outside training ``eval_capacity`` decides (dropless,
   the training C, or ``ceil(fraction * N)``);
3. ``self.dispatch(rows, groups, experts)`` runs the experts: on one device it calls them
   directly; expert parallelism (parallel/expert_parallel.py) replaces it with the
   all-to-all exchange;
4. each assignment's output goes back to its (slot, row) place and the k slots are summed
   with the combine weights, in a fixed order (so every layout adds the same numbers);
5. shared experts (always on, DeepSeekMoE) add their SwiGLU output.

MH-MoE (Wu et al. 2024, "Multi-Head Mixture-of-Experts", and its released torchscale
code): a d x d split projection with bias, reshape of each token into h sub-tokens of
width d/h (consecutive feature chunks), the core on the N*h sub-tokens, reshape back and
a d x d merge projection with bias. Init as released: Xavier-uniform weights, the split
with gain 1/sqrt(2) and PyTorch's default bias init, the merge bias zero. h = 1 is the
plain MoE (no projections), as in the released code.

Statistics (model.hooks.report): ``moe/load_max_l<i>`` (largest expert load over the mean
load: 1 is balanced), ``moe/dropped_l<i>`` (fraction of assignments dropped, with
capacity routing), and with ``model.moe.log_expert_load`` every expert's share
``moe_load.l<i>.e<j>``. Losses: ``aux/moe_balance_l<i>``, ``aux/moe_z_l<i>``.

Tensor parallelism: the layer declares the ``replicated`` role: with sequence
parallelism its input is all-gathered and handed in as a local tensor, the layer runs
whole on every tensor-parallel rank (identical routing, losses and statistics on the
peers), and its output is handed back as the rank's sequence shard. Experts are not
split over tensor-parallel ranks.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.hooks import add_aux_loss, report
from polytron.model.layers import MLP_PLACEMENT, MLPS, make_linear, register
from polytron.model.moe import tp_styles  # noqa: F401  (registers the "replicated" role)
from polytron.model.moe.config import MOE_KINDS, is_moe_layer
from polytron.model.moe.experts import Experts, Groups
from polytron.model.moe.router import Router, Routing

#: How the experts run on expert-sorted rows (the :data:`polytron.model.protocols.Dispatch` hook).
Dispatch = Callable[[torch.Tensor, Groups, nn.Module], torch.Tensor]


def local_dispatch(rows: torch.Tensor, groups: Groups, experts: nn.Module) -> torch.Tensor:
    """Run the experts on this device's expert-sorted rows (M, w); dropped rows give zero."""
    if groups.capacity is None:
        return experts(rows, groups)
    kept = (groups.row_expert < groups.num_experts)[:, None]                  # (M, 1)
    y = experts(torch.where(kept, rows, 0), groups)
    return torch.where(kept, y, 0)


class SharedExperts(nn.Module):
    """The always-on experts: one SwiGLU of ``count x ffn`` inner width."""

    def __init__(self, cfg, width: int, inner: int):
        super().__init__()
        b = cfg.mlp_bias
        self.w1 = make_linear(cfg, width, inner, b, "gate")
        self.w3 = make_linear(cfg, width, inner, b, "up")
        self.w2 = make_linear(cfg, inner, width, b, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route_order(routing: Routing, num_experts: int, capacity: Optional[int]) -> tuple[torch.Tensor, Groups]:
    """(order, groups): ``order[r]`` is the slot-major assignment index (slot * N + row) of
    sorted row r; kept rows grouped by expert, dropped rows last."""
    N, k = routing.experts.shape
    ids = routing.experts.t().reshape(-1)                                       # (k*N,) slot-major
    order = torch.argsort(ids, stable=True)                                     # (k*N,)
    if capacity is None:
        return order, Groups(routing.counts, ids[order])
    sorted_ids = ids[order]
    starts = routing.counts.cumsum(0) - routing.counts                          # (E,)
    pos = torch.arange(ids.shape[0], device=ids.device) - starts[sorted_ids]
    key = torch.where(pos < capacity, sorted_ids, num_experts)                 # dropped -> E
    again = torch.argsort(key, stable=True)
    return order[again], Groups(routing.counts.clamp(max=capacity), key[again], capacity)


class MoE(nn.Module):
    """Routed experts (+ shared experts) over rows of ``width``; the ``moe`` MLP kind."""

    tp_role = "replicated"

    def __init__(self, cfg, layer_idx: int, width: Optional[int] = None, rows_per_token: int = 1):
        super().__init__()
        moe = cfg.moe
        self.layer_idx = layer_idx
        self.width = width or cfg.hidden_size
        self.rows_per_token = rows_per_token
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.ffn = moe.ffn(cfg)
        self.capacity_factor = moe.capacity_factor
        self.capacity_rounding, self.eval_capacity = moe.capacity_rounding, moe.eval_capacity
        self.eval_capacity_fraction = moe.eval_capacity_fraction
        self.log_expert_load = moe.log_expert_load
        self.router = Router(cfg, self.width)
        self.experts = Experts(cfg, moe.num_experts, self.width, self.ffn)
        self.shared = SharedExperts(cfg, self.width, moe.shared_experts * self.ffn) if moe.shared_experts else None
        self.dispatch: Dispatch = local_dispatch

    def set_dispatch(self, dispatch: Dispatch) -> None:
        """Replace how the experts run on the sorted rows (expert parallelism)."""
        self.dispatch = dispatch

    def routed_experts(self) -> nn.Module:
        """The routed experts (stacked parameters, dim 0: expert) expert parallelism shards."""
        return self.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x.reshape(-1, self.width)).view_as(x)

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Saved for backward per token at uniform routing (docs/scaling.md): per row the input
        ``w``, router logits and scores ``2 E``, its ``k`` gathered rows with their expert's
        SwiGLU terms and output ``k (2 w + 4 f_e)``, the combine weights ``2 k``, and the shared
        experts' SwiGLU terms; replicated over ``tp``."""
        w, k, f = self.width, self.top_k, self.ffn
        shared = 4 * next(self.shared.parameters()).shape[0] if self.shared is not None else 0  # w1: (inner, w)
        return self.rows_per_token * (w + 2 * self.num_experts + k * (2 * w + 4 * f) + 2 * k + shared)

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        """Under a 16-bit dtype the router runs in fp32: its copy of the row ``x.float()``
        (its own storage, ``2 w``), logits and scores ``2 E`` and combine weights ``2 k``."""
        return self.rows_per_token * (2 * self.width + 2 * self.num_experts + 2 * self.top_k)

    def capacity(self, rows: int) -> Optional[int]:
        """Most rows an expert keeps of a micro-batch of ``rows`` (None: dropless)."""
        if not self.training and self.eval_capacity != "train":
            return math.ceil(self.eval_capacity_fraction * rows) if self.eval_capacity == "fraction" else None
        if self.capacity_factor == 0:
            return None
        if self.capacity_rounding == "per_choice":                              # released: k * ceil(N / E)
            return self.top_k * math.ceil(self.capacity_factor * rows / self.num_experts)
        return math.ceil(self.capacity_factor * rows * self.top_k / self.num_experts)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """(N, w) rows -> (N, w): routed experts combined, plus the shared experts."""
        N = x.shape[0]
        routing = self.router(x)
        order, groups = route_order(routing, self.num_experts, self.capacity(N))
        rows = x[order % N]                                                     # (k*N, w) sorted by expert
        y = self.dispatch(rows, groups, self.experts)                           # (k*N, w)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=x.device))
        slots = y.index_select(0, inverse).view(self.top_k, N, self.width)      # (k, N, w)
        weights = routing.weights.t().to(x.dtype)[..., None]                    # (k, N, 1)
        out = (slots * weights).sum(0)                                          # (N, w)
        if self.shared is not None:
            out = out + self.shared(x)
        self._report(routing, groups, N)
        if routing.aux is not None:
            out = add_aux_loss(out, routing.aux, f"moe_balance_l{self.layer_idx}")
        if routing.z is not None:
            out = add_aux_loss(out, routing.z, f"moe_z_l{self.layer_idx}")
        return out

    def _report(self, routing: Routing, groups: Groups, rows: int) -> None:
        if not torch.is_grad_enabled():
            return
        i = self.layer_idx
        share = routing.counts.float() / (rows * self.top_k) if routing.share is None else routing.share  # (E,)
        report(f"moe/load_max_l{i}", share.max() * self.num_experts)
        if groups.capacity is not None:
            report(f"moe/dropped_l{i}", 1.0 - groups.counts.sum().float() / (rows * self.top_k))
        if self.log_expert_load:
            for e in range(self.num_experts):
                report(f"moe_load.l{i}.e{e}", share[e])

    # ------------------------------------------------------------ declarations

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        return None                       # runs whole on every tensor-parallel rank

    @classmethod
    def cp_requirements(cls, cfg, cp: int) -> Optional[str]:
        """Routing is token-local and the router's statistics are summed over cp
        (``Router.seq_reducer``); capacity dropping ranks a token against the whole sequence's
        assignments, which no rank sees, so it is refused (in training and evaluation)."""
        if cfg.moe.capacity_factor > 0:
            return (f"parallel.context={cp} with model.moe.capacity_factor={cfg.moe.capacity_factor}: "
                    f"capacity dropping ranks tokens over the whole sequence; use capacity_factor=0 "
                    f"(dropless) under context parallelism")
        if cfg.moe.eval_drops():
            return (f"parallel.context={cp} with model.moe.eval_capacity={cfg.moe.eval_capacity}: "
                    f"capacity dropping ranks tokens over the whole sequence; use eval_capacity=dropless "
                    f"under context parallelism")
        return None

    @classmethod
    def num_experts_of(cls, cfg) -> int:
        """Routed experts per layer (expert parallelism shards them)."""
        return cfg.moe.num_experts

    def active_params(self) -> int:
        """Matmul parameters one token activates (MFU): per row the router, top_k experts and
        the shared experts, times rows per token."""
        expert = sum(p[0].numel() for p in self.experts.parameters() if p.dim() >= 3)
        shared = sum(p.numel() for p in self.shared.parameters() if p.dim() >= 2) if self.shared else 0
        return self.rows_per_token * (self.router.weight.numel() + self.top_k * expert + shared)


def _xavier(fan_in: int, fan_out: int, gain: float, name: str):
    """Init rule: Xavier-uniform weight with ``gain``; bias left to the module's default."""
    return ("uniform", gain * math.sqrt(6.0 / (fan_in + fan_out))) if name == "weight" else None


def _uniform_bias(fan_in: int, name: str):
    """nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return ("uniform", 1.0 / math.sqrt(fan_in)) if name == "bias" else None


def _split_rule(d: int, name: str):
    return _xavier(d, d, 1.0 / math.sqrt(2.0), name) or _uniform_bias(d, name)


def _merge_rule(d: int, name: str):
    return _xavier(d, d, 1.0, name) or ("zeros" if name == "bias" else None)


class MHMoE(MoE):
    """Multi-head MoE: split each token into ``h`` sub-tokens, route those, merge back."""

    def __init__(self, cfg, layer_idx: int):
        h, d = cfg.moe.heads, cfg.hidden_size
        super().__init__(cfg, layer_idx, width=d // h, rows_per_token=h)
        self.heads = h
        if h > 1:
            self.split = make_linear(cfg, d, d, True, "proj")
            self.merge = make_linear(cfg, d, d, True, "proj")
            self.split.init_rule = functools.partial(_split_rule, d)  # type: ignore[assignment]
            self.merge.init_rule = functools.partial(_merge_rule, d)  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.heads == 1:
            return super().forward(x)
        B, T, d = x.shape
        sub = self.split(x).reshape(B * T * self.heads, d // self.heads)       # (B*T*h, d/h)
        y = self.mix(sub).reshape(B, T, d)                                      # (B, T, d)
        return self.merge(y)

    def active_params(self) -> int:
        projections = [self.split, self.merge] if self.heads > 1 else []
        extra = sum(p.numel() for m in projections for p in m.parameters() if p.dim() >= 2)
        return super().active_params() + extra


register(MLPS, "moe")(MoE)
register(MLPS, "mh_moe")(MHMoE)


def moe_placement(cfg, layer_idx: int) -> str:
    """MoE layers per model.moe.every / offset / first_dense; the others keep the dense SwiGLU."""
    return cfg.mlp if is_moe_layer(cfg.moe, layer_idx) else "swiglu"


for _kind in MOE_KINDS:
    MLP_PLACEMENT[_kind] = moe_placement
