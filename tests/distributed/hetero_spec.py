"""A second architecture, defined only for the tests: heterogeneous layers and a carry.

``arch="test_hetero"`` (registered on import) has four blocks of two kinds:

* ``layers.0``: a plain block (GQA + SwiGLU);
* ``layers.1``: the same block, which also *produces* the carry tensor ``memory`` =
  W_m(norm(x)) from its output;
* ``layers.2``, ``layers.3``: another block kind (GQA + a squared-ReLU MLP of another
  width) that *consumes* ``memory``: x + attn + mlp + g * memory, and adds an
  auxiliary loss on g * memory (model.hooks.add_aux_loss).

It also reports step statistics: ``test/sequences`` (sum; stage 0) and
``test/max_layer`` (max; the consumers, on the last stage); and the consumers keep a
persistent buffer ``updates`` that a post-optimizer hook advances after every update
and that their forward reads (state that must survive a resume).

Cut into two pipeline stages of two blocks, the producer ends stage 0 and the
consumers start stage 1, so ``memory`` must cross the stage border. Nothing outside
this file names its modules: the parallel passes see only units and declared roles.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.hooks import add_aux_loss, report
from polytron.model.layers import (
    ATTENTIONS,
    MLPS,
    Block,
    Context,
    RMSNorm,
    block_tp_requirements,
    make_linear,
    register,
)
from polytron.model.spec import ModelSpec, Unit, register_spec

NAME = "test_hetero"
RELU2 = "test_relu2"


@register(MLPS, RELU2)
class SquaredReLU(nn.Module):
    """down(relu(up x)^2), with half the configured inner width."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        inner = cfg.ffn_hidden_size // 2
        self.up = make_linear(cfg, cfg.hidden_size, inner, False, "up")
        self.down = make_linear(cfg, inner, cfg.hidden_size, False, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())

    def tp_roles(self) -> dict:
        return {"up": "colwise", "down": "rowwise"}

    @classmethod
    def tp_requirements(cls, cfg, layer_idx: int, tp: int) -> Optional[str]:
        if (cfg.ffn_hidden_size // 2) % tp:
            return f"parallel.tensor={tp} must divide half of model.ffn_hidden_size={cfg.ffn_hidden_size}"
        return None


class Scale(nn.Module):
    """y = g * x with a learned per-channel g (d,), and an auxiliary loss
    0.1 (1e4 mean(y^2) - 1)^2, of the order of the main loss's gradients.

    Under sequence parallelism ``x`` arrives here as a sequence-sharded DTensor, so the
    mean (and with it the aux loss) is global, as model code must make it."""

    def __init__(self, dim: int, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight * x                                        # (B, T, d)
        aux = 0.1 * (1e4 * y.float().pow(2).mean() - 1.0).square()
        return add_aux_loss(y, aux, f"gate_l2_{self.layer_idx}")


class ProducerBlock(Block):
    """A plain block that also hands ``memory`` (B, T, d) to later layers."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx, "gqa", "swiglu")
        self.memory_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.memory = make_linear(cfg, cfg.hidden_size, cfg.hidden_size, False, "proj")

    def forward(self, x: torch.Tensor, ctx: Context):
        x = super().forward(x, ctx)                               # (B, T, d)
        report("test/sequences", torch.tensor(float(x.shape[0])), "sum")
        return x, {"memory": self.memory(self.memory_norm(x))}   # (B, T, d)

    def tp_roles(self) -> dict:
        # the residual is a sequence shard under SP: the projection runs on the shard
        return {**super().tp_roles(), "memory_norm": "sequence", "memory": "sequence_local"}


class ConsumerBlock(Block):
    """A block of another MLP kind that adds g * memory to its output."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx, "gqa", RELU2)
        self.layer_idx = layer_idx
        self.gate = Scale(cfg.hidden_size, layer_idx)
        self.register_buffer("updates", torch.zeros(()))     # persistent: checkpointed

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        report("test/max_layer", torch.tensor(float(self.layer_idx)), "max")
        boost = 1.0 + 0.1 * self.updates                      # changes with every optimizer step
        return super().forward(x, ctx) + self.gate(ctx.carry["memory"]) * boost

    def post_optimizer_step(self) -> None:
        """A post-optimizer hook with state (like an aux-loss-free router bias update)."""
        self.updates.add_(1.0)

    def init_buffers(self) -> None:
        self.updates.zero_()

    def tp_roles(self) -> dict:
        return {**super().tp_roles(), "gate": "sequence_local"}


def units(cfg) -> list[Unit]:
    n = cfg.num_layers
    assert n == 4, "test_hetero has exactly 4 layers"
    return ([Unit("tok_embeddings", "embedding"), Unit("layers.0", "block"),
             Unit("layers.1", "block", produces=("memory",))]
            + [Unit(f"layers.{i}", "block", consumes=("memory",)) for i in (2, 3)]
            + [Unit("norm", "norm"), Unit("output", "head")])


def build_unit(cfg, unit: Unit) -> nn.Module:
    if unit.kind == "embedding":
        return nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    if unit.kind == "norm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    if unit.kind == "head":
        return make_linear(cfg, cfg.hidden_size, cfg.vocab_size, False, "head")
    index = int(unit.name.split(".")[1])
    if index == 0:
        return Block(cfg, 0, "gqa", "swiglu")
    return ProducerBlock(cfg, index) if index == 1 else ConsumerBlock(cfg, index)


def check_layout(cfg, tp: int) -> Optional[str]:
    for i, mlp in enumerate(["swiglu", "swiglu", RELU2, RELU2]):
        err = block_tp_requirements(cfg, i, tp, "gqa", mlp)
        if err:
            return err
    return None if cfg.vocab_size % tp == 0 else f"parallel.tensor={tp} must divide model.vocab_size"


SPEC = register_spec(ModelSpec(name=NAME, units=units, build_unit=build_unit, check_layout=check_layout,
                               doc="Test-only: two block kinds and a carry across layers."))
assert "gqa" in ATTENTIONS
