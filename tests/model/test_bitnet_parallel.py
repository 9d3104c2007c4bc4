"""Shard-local BitNet scales fail the equivalence suite's criterion; global ones pass it.

Under tensor parallelism a BitLinear sees DTensor weights (column- or row-sharded) and,
in row-parallel projections, inputs sharded along the hidden dimension. BitLinear takes
the absmean over the whole weight and the absmax over the whole hidden vector (DTensor
reductions). Two deliberately wrong variants, registered here as linear kinds, take them
on the local shard instead (``.to_local()``); under TP2 they must leave the 1e-5 band of
tests/distributed/test_equivalence.py, while the real BitLinear (its ``bitnet_tp2`` entry
in tests/distributed/layouts_bitnet.py) stays inside it. The first loss (the suite's first
batch, forward only) already shows it; off TP the variants equal BitLinear.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytron.model.bitnet import quant
from polytron.model.bitnet.layers import BitLinear
from polytron.model.layers import LINEARS
from tests.distributed import equivalence as eq
from tests.distributed.harness import run_distributed
from tests.distributed.layouts_bitnet import B2B4T
from tests.distributed.test_equivalence import REL

VARIANTS = {"test_bitlinear_local_weight": (True, False), "test_bitlinear_local_activation": (False, True)}


def _local(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn`` of this rank's shard, claimed to be the replicated value (the bug)."""
    from torch.distributed.tensor import DTensor, Replicate
    if not isinstance(t, DTensor):
        return fn(t)
    return DTensor.from_local(fn(t.to_local()), t.device_mesh, [Replicate()] * t.device_mesh.ndim,
                              run_check=False)


class ShardLocalBitLinear(BitLinear):
    """BitLinear with the weight scale and/or the activation scale of the local shard."""
    local_weight = local_activation = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = _local(quant.activation_scale, x) if self.local_activation else quant.activation_scale(x)
        beta = _local(quant.weight_scale, self.weight) if self.local_weight else quant.weight_scale(self.weight)
        xi = quant._Integers.apply(x, s, "activation")
        ti = quant._Integers.apply(self.weight, beta, "weight")
        return quant._ExactSum.apply(F.linear(xi, ti)) * (beta / s)


def _factory(local_weight: bool, local_activation: bool):
    def make(cfg, i, o, bias, role):
        if role not in cfg.bitnet.quantize:
            return torch.nn.Linear(i, o, bias=bias)
        layer = ShardLocalBitLinear(i, o, bias)
        layer.local_weight, layer.local_activation = local_weight, local_activation
        return layer
    return make


for _name, (_w, _a) in VARIANTS.items():
    LINEARS[_name] = _factory(_w, _a)


def _overrides(linear: str) -> dict:
    return {**B2B4T, "linear": linear}


def first_loss(linear: str, world: int) -> float:
    """Loss of the suite's first batch for ``bitnet_tp2``'s layout (world 2) or one process."""
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    layout = eq.LAYOUTS["bitnet_tp2"]
    par, variant = layout.parallel, layout.data
    mcfg, pcfg = eq.model_config(**_overrides(linear)), ParallelConfig(**(par if world > 1 else {}))
    dims = ParallelDims.resolve(pcfg, mcfg, world)
    mesh = dims.build_mesh("cpu") if world > 1 else None
    engine = build_engine(mcfg, pcfg, dims, mesh, torch.device("cpu"), torch.float32, eq.SEED)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    return float(engine.eval_loss(eq.microbatches(eq.global_batch(0, variant, mcfg.vocab_size), dp_rank, dims.dp)))


def run_variants() -> dict:
    """Worker body: the first loss of BitLinear and of each shard-local variant under TP2."""
    import os
    world = int(os.environ["WORLD_SIZE"])
    return {name: first_loss(name, world) for name in ("bitlinear", *VARIANTS)}


@pytest.mark.timeout(600)
def test_shard_local_scales_fail_equivalence():
    tp2 = run_distributed(run_variants, 2, backend="gloo", timeout=540)[0]
    one = {name: first_loss(name, 1) for name in tp2}
    assert one["bitlinear"] == one["test_bitlinear_local_weight"] == one["test_bitlinear_local_activation"], \
        "off tensor parallelism the variants must be BitLinear"
    rel = {name: abs(tp2[name] - one[name]) / one[name] for name in tp2}
    assert rel["bitlinear"] <= REL, rel
    for name in VARIANTS:
        assert rel[name] > 10 * REL, f"{name}: a shard-local scale stayed within {rel[name]:.1e} ({rel})"
