"""The toy MLP kind ``toy_glu``: s * down(norm(relu(up x)^2)), inner width inner_mult * d,
s = model.toy.out_scale; the inner norm declares the folder's own role ``toy_inner_norm``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.layers import MLPS, RMSNorm, make_linear, register
from tests.model.toyarch import tp_styles  # noqa: F401  (registers the "toy_inner_norm" role)

KIND = "toy_glu"


def inner(cfg) -> int:
    return cfg.toy.inner_mult * cfg.hidden_size


@register(MLPS, KIND)
class ToyMLP(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.scale = cfg.toy.out_scale
        self.up = make_linear(cfg, cfg.hidden_size, inner(cfg), cfg.mlp_bias, "up")
        self.inner_norm = RMSNorm(inner(cfg), cfg.norm_eps)
        self.down = make_linear(cfg, inner(cfg), cfg.hidden_size, cfg.mlp_bias, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.up(x)).square()                          # (B, T, inner)
        return self.scale * self.down(self.inner_norm(h))       # (B, T, d)

    def tp_roles(self) -> dict:
        return {"up": "colwise", "inner_norm": "toy_inner_norm", "down": "rowwise"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        if inner(cfg) % tp:
            return f"parallel.tensor={tp} must divide the toy MLP width {inner(cfg)}"
        return None
