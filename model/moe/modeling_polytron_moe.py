"""The MoE and MH-MoE piece of the assembled remote-code modeling file.

Copied into an export's modeling file (:mod:`model.hf_remote`) when a layer uses
``mlp: moe`` or ``mh_moe``; it computes what :mod:`model.moe.layer` computes at inference
(dropless, or with the evaluation capacity of ``moe.eval_capacity``), in the same order
of operations:

* MH-MoE (``mh_moe`` with ``moe.heads = h > 1``; Wu et al. 2024): a d x d ``split``
  projection, each token reshaped into h sub-tokens of width d/h routed on their own,
  reshaped back and a d x d ``merge`` projection;
* routing of each (sub-)token (fp32): ``softmax`` or ``sigmoid`` scores, the top
  ``moe.top_k`` chosen on scores plus ``e_score_correction_bias`` (when ``balance_bias``),
  combine weights the chosen scores, normalized if ``moe.normalize_top_k``, times
  ``moe.route_scale``;
* routed experts: SwiGLU with stacked weights ``experts.{gate,up,down}_proj`` (E, out, in)
  run through the config's linear kind (BitLinear experts quantize per expert); the k
  slots are summed in slot order; shared experts (always on) add one SwiGLU;
* capacity (``moe.eval_capacity`` ``train`` with ``capacity_factor > 0``, or ``fraction``):
  each expert keeps its first C assignments of the forward's N rows, first choices
  first, then by row; a dropped assignment adds nothing.

The imports above the piece are for reading this file as a module.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.hf_remote.pieces import MLPS, SwiGLU, linear_fn, make_linear


# piece: moe
class Router(nn.Module):
    def __init__(self, config, width: int):
        super().__init__()
        m = config.moe
        self.top_k, self.score = m["top_k"], m["score"]
        self.normalize, self.scale = m["normalize_top_k"], m["route_scale"]
        self.weight = nn.Parameter(torch.zeros(m["num_experts"], width))
        self.balance = bool(getattr(config, "balance_bias", False))
        if self.balance:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(m["num_experts"]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, w) -> experts (N, k), weights (N, k) fp32."""
        logits = x.float() @ self.weight.float().t()                           # (N, E)
        probs = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = probs + self.e_score_correction_bias.float() if self.balance else probs
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, experts)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale


class Experts(nn.Module):
    def __init__(self, config, num: int, width: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.zeros(num, inner, width))
        self.up_proj = nn.Parameter(torch.zeros(num, inner, width))
        self.down_proj = nn.Parameter(torch.zeros(num, width, inner))
        self.bias = bool(config.mlp_bias)
        if self.bias:
            self.gate_proj_bias = nn.Parameter(torch.zeros(num, inner))
            self.up_proj_bias = nn.Parameter(torch.zeros(num, inner))
            self.down_proj_bias = nn.Parameter(torch.zeros(num, width))
        self.fns = {role: linear_fn(config, role) for role in ("gate", "up", "down")}

    def _proj(self, role: str, e: int, x: torch.Tensor) -> torch.Tensor:
        b = getattr(self, f"{role}_proj_bias")[e] if self.bias else None
        return self.fns[role](x, getattr(self, f"{role}_proj")[e], b)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its rows (R, w) -> (R, w)."""
        return self._proj("down", e, F.silu(self._proj("gate", e, x)) * self._proj("up", e, x))


def capacity(m: dict, rows: int) -> Optional[int]:
    """Most rows an expert keeps of ``rows`` outside training (None: dropless)."""
    mode, cf, k, E = m.get("eval_capacity", "dropless"), m.get("capacity_factor", 0.0), m["top_k"], m["num_experts"]
    if mode == "fraction":
        return math.ceil(m["eval_capacity_fraction"] * rows)
    if mode != "train" or cf == 0:
        return None
    if m.get("capacity_rounding") == "per_choice":
        return k * math.ceil(cf * rows / E)
    return math.ceil(cf * rows * k / E)


def kept(experts: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """(N, k) chosen experts -> (N, k) bool: within the first ``cap`` of its expert, counting
    every row's first choice, then every second choice, ..."""
    N, k = experts.shape
    ids = experts.t().reshape(-1)                                              # (k*N,) slot-major
    onehot = F.one_hot(ids, num_experts)                                       # (k*N, E)
    pos = (onehot.cumsum(0) - 1).gather(1, ids[:, None])[:, 0]                 # place in its expert
    return (pos < cap).view(k, N).t()


class MoE(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        m, d = config.moe, config.hidden_size
        self.moe = m
        self.heads = m["heads"] if config.layer_mlp[layer_idx] == "mh_moe" else 1
        self.width, self.top_k = d // self.heads, m["top_k"]
        self.gate = Router(config, self.width)
        self.experts = Experts(config, m["num_experts"], self.width, m["expert_ffn_hidden_size"])
        self.shared_experts = (SwiGLU(config, self.width, m["shared_experts"] * m["expert_ffn_hidden_size"])
                               if m["shared_experts"] else None)
        if self.heads > 1:
            self.split = make_linear(config, d, d, True, "proj")
            self.merge = make_linear(config, d, d, True, "proj")

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """(N, w) rows -> (N, w): the k slots summed in order, plus the shared experts."""
        experts, weights = self.gate(x)                                        # (N, k) each
        cap = capacity(self.moe, x.shape[0])
        if cap is not None:                                                    # dropped: weight 0
            weights = weights * kept(experts, self.moe["num_experts"], cap)
        slots = x.new_zeros(self.top_k, *x.shape)                              # (k, N, w)
        for e in torch.unique(experts).tolist():
            rows, slot = torch.nonzero(experts == e, as_tuple=True)
            slots[slot, rows] = self.experts.one(e, x[rows])
        out = (slots * weights.t().to(x.dtype)[..., None]).sum(0)              # (N, w)
        return out + self.shared_experts(x) if self.shared_experts is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        if self.heads > 1:
            x = self.split(x)
        out = self.mix(x.reshape(-1, self.width)).reshape(B, T, d)              # rows (B*T*h, d/h)
        return self.merge(out) if self.heads > 1 else out


def _mlp(config, layer_idx: int) -> nn.Module:
    return MoE(config, layer_idx)


MLPS["moe"] = MLPS["mh_moe"] = _mlp
