"""Test plugin: an MoE MLP kind whose routing never reaches the upper half of the experts.

``model.mlp=test_moe_skewed`` (registered on import; load it with
``model.plugins=[tests.distributed.moe_skew]``) is the ``moe`` layer with its balancing bias
initialized to +10 for the lower half of the experts and 0 for the upper half, and a
negligible update rate, so every top-k choice (k <= half the experts) falls in the lower
half for the few steps of a test. Under two-way expert parallelism rank 1 owns the upper
half: it receives no rows at all, yet must run the same collectives and end with the same
losses, gradients and parameters as one process.
"""
from __future__ import annotations

from polytron.model.layers import MLPS, register
from polytron.model.moe.layer import MoE

NAME = "test_moe_skewed"


@register(MLPS, NAME)
class SkewedMoE(MoE):
    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.router.init_buffers = self._skew

    def _skew(self) -> None:
        bias = self.router.expert_bias
        bias.zero_()
        bias[: self.num_experts // 2] = 10.0
        self.router.expert_load.zero_()
