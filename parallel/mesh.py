"""One validated description of the parallel layout, and the device mesh built from it.

``ParallelDims.resolve(pcfg, model_cfg, world_size)`` checks every rule *before*
any process group exists (so an impossible layout fails on every rank at once
with the same one-line message, and no rank waits for peers). ``build_mesh``
then creates a :class:`DeviceMesh` with named dimensions
``("pp", "dp_replicate", "dp_shard", "cp", "tp")`` plus the flattened ``"dp"``
(replicate x shard) used for loss averaging and data sharding, and ``"pp_dp"`` over
which per-step statistics are reduced. With context parallelism (``cp > 1``) also
``"dp_cp"`` and ``"pp_dp_cp"``: loss sums, token counts and statistics are reduced over
the cp ranks too, since each holds part of every sequence (parallel/context.py). The mesh is passed
explicitly to everything that communicates; there are no process-group globals.

Expert parallelism (``parallel.expert = ep > 1``, torchtitan's layout) is carved from
the data-parallel shard ranks: ``dp_shard`` is built as ``efsdp x ep`` (``ep`` inner, so
an expert group is ``ep`` neighbouring data-parallel ranks) and flattened back to
``"dp_shard"``, so data sharding, ``"dp"`` and everything that is not an expert see the
same ranks as without it. Experts are sharded over ``"ep"`` and FSDP-sharded over
``"efsdp"`` (with ``dp_replicate``: HSDP over ``("dp_replicate", "efsdp")``).

With context parallelism an expert group may also span cp ranks (as Megatron carves its
expert groups from dp x cp): ``ep`` must divide ``dp_shard x cp``; it takes
``ep_dp = gcd(ep, dp_shard)`` data-parallel ranks and ``ep_cp = ep / ep_dp`` cp ranks. When
``ep_cp > 1`` the mesh is ``(pp, dp_replicate, efsdp, ep_dp, ecp, ep_cp, tp)`` with
``"dp_shard"`` = efsdp x ep_dp, ``"cp"`` = ecp x ep_cp and ``"ep"`` = ep_dp x ep_cp all
flattened, so every dimension that is not about experts holds the same ranks in the same
order as without expert parallelism. Experts are still FSDP-sharded over ``"efsdp"``; the
cp ranks outside the group, ``"ecp"``, hold the same expert shard for other tokens of the
same sequences and sum its gradients (parallel/expert_parallel.py ``cp_grad_groups``).
When ``ep`` divides ``dp_shard`` the mesh is the one above (``ep_cp = 1``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

from polytron.model.config import ModelConfig
from polytron.model.configlib import ConfigError
from polytron.parallel.config import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
#: The mesh with expert parallelism: dp_shard = efsdp x ep (flattened back to "dp_shard").
EP_MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp")
#: Expert groups spanning cp ranks: dp_shard = efsdp x ep_dp, cp = ecp x ep_cp, ep = ep_dp x ep_cp.
EP_CP_MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep_dp", "ecp", "ep_cp", "tp")


class LayoutError(ConfigError):
    """An impossible parallel layout for this model and world size."""


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees of each kind of parallelism (all >= 1)."""
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int
    virtual_stages: int
    world_size: int

    @property
    def dp(self) -> int:
        """Data-parallel size: ranks that see different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def ep_dp(self) -> int:
        """Expert-parallel ranks taken from the data-parallel shard ranks."""
        return math.gcd(self.ep, self.dp_shard)

    @property
    def ep_cp(self) -> int:
        """Expert-parallel ranks taken from the context-parallel ranks (1: none)."""
        return self.ep // self.ep_dp

    @property
    def num_stages(self) -> int:
        """Pipeline stages in total (virtual stages included)."""
        return self.pp * self.virtual_stages

    @classmethod
    def resolve(cls, p: ParallelConfig, model: ModelConfig, world_size: int,
                seq_len: Optional[int] = None) -> "ParallelDims":
        """Fill data_parallel_shard=-1 and validate against the model, world size and (when
        given) the training sequence length ``data.seq_len``."""
        fixed = p.data_parallel_replicate * p.context * p.tensor * p.pipeline
        shard = p.data_parallel_shard
        if shard == -1:
            if world_size % fixed:
                raise LayoutError(
                    f"parallel layout: replicate={p.data_parallel_replicate} x context={p.context} x "
                    f"tensor={p.tensor} x pipeline={p.pipeline} = {fixed} does not divide the world "
                    f"size {world_size}")
            shard = world_size // fixed
        if fixed * shard != world_size:
            raise LayoutError(
                f"parallel layout: degrees multiply to {fixed * shard} (replicate="
                f"{p.data_parallel_replicate} x shard={shard} x context={p.context} x tensor="
                f"{p.tensor} x pipeline={p.pipeline}) but the world size is {world_size}")
        dims = cls(pp=p.pipeline, dp_replicate=p.data_parallel_replicate, dp_shard=shard,
                   cp=p.context, tp=p.tensor, ep=p.expert, virtual_stages=p.virtual_stages,
                   world_size=world_size)
        dims._check_model(p, model, seq_len)
        return dims

    def _check_model(self, p: ParallelConfig, m: ModelConfig, seq_len: Optional[int] = None) -> None:
        from polytron.model.spec import get_spec, layer_units
        spec = get_spec(m.arch)
        err = spec.check_layout(m, self.tp) if self.tp > 1 else None
        if err:
            raise LayoutError(err)
        num_blocks = len(layer_units(spec.units(m)))
        if self.num_stages > num_blocks:
            raise LayoutError(
                f"parallel.pipeline={self.pp} x parallel.virtual_stages={self.virtual_stages} = "
                f"{self.num_stages} stages but model.num_layers={num_blocks}")
        if p.pipeline_split:
            if len(p.pipeline_split) != self.num_stages or sum(p.pipeline_split) != num_blocks \
                    or min(p.pipeline_split) < 1:
                raise LayoutError(
                    f"parallel.pipeline_split={p.pipeline_split}: need {self.num_stages} positive "
                    f"layer counts summing to model.num_layers={num_blocks}")
        if self.virtual_stages > 1 and self.pp == 1:
            raise LayoutError("parallel.virtual_stages > 1 needs parallel.pipeline > 1")
        if self.virtual_stages > 1 and p.pipeline_schedule == "gpipe":
            raise LayoutError("parallel.pipeline_schedule=gpipe runs one stage per rank; "
                              "parallel.virtual_stages > 1 needs interleaved_1f1b (or 1f1b, which "
                              "then means interleaved)")
        if self.cp > 1:
            self._check_context(p, m, seq_len)
        if self.ep > 1:
            self._check_experts(m)

    def _check_context(self, p: ParallelConfig, m: ModelConfig, seq_len: Optional[int]) -> None:
        """Context parallelism: a layout the sequence sharding can serve, every mixer kind with a
        CP form (parallel/context.py), and no feature that does not compose with it yet."""
        from polytron.parallel.context import check_context_parallel
        if p.compile:
            raise LayoutError(f"parallel.context={self.cp} with parallel.compile=true is not supported "
                              f"yet (ring attention runs eagerly)")
        err = check_context_parallel(m, self.cp, seq_len)
        if err:
            raise LayoutError(err)

    def _check_experts(self, m: ModelConfig) -> None:
        """Expert parallelism needs routed experts that ep divides, carved from dp_shard x cp."""
        from polytron.model.layers import MLPS
        experts = getattr(MLPS.get(m.mlp), "num_experts_of", None)
        if experts is None:
            raise LayoutError(f"parallel.expert={self.ep} needs a mixture-of-experts model "
                              f"(model.mlp=moe or mh_moe); model.mlp={m.mlp} has no experts")
        if experts(m) % self.ep:
            raise LayoutError(f"parallel.expert={self.ep} must divide model.moe.num_experts={experts(m)}")
        if (self.dp_shard * self.cp) % self.ep:
            raise LayoutError(f"parallel.expert={self.ep} must divide the data-parallel shard degree "
                              f"{self.dp_shard} x parallel.context={self.cp} = {self.dp_shard * self.cp} "
                              f"(experts are sharded over data-parallel and context-parallel ranks)")

    def build_mesh(self, device_type: str):
        """DeviceMesh over all ranks with named dims and a flattened 'dp' dim."""
        from torch.distributed.device_mesh import init_device_mesh
        shape: tuple[int, ...]
        if self.ep_cp > 1:    # expert groups span cp ranks: ep_dp data-parallel x ep_cp cp ranks
            shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep_dp, self.ep_dp,
                     self.cp // self.ep_cp, self.ep_cp, self.tp)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=EP_CP_MESH_DIMS)
            mesh["efsdp", "ep_dp"]._flatten("dp_shard")
            mesh["ecp", "ep_cp"]._flatten("cp")
            mesh["ep_dp", "ep_cp"]._flatten("ep")
            shard: tuple[str, ...] = ("efsdp", "ep_dp")
            cp: tuple[str, ...] = ("ecp", "ep_cp")
        elif self.ep > 1:
            shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, self.cp, self.tp)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=EP_MESH_DIMS)
            mesh["efsdp", "ep"]._flatten("dp_shard")
            shard, cp = ("efsdp", "ep"), ("cp",)
        else:
            shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
            shard, cp = ("dp_shard",), ("cp",)
        dp_dims, pp_dp_dims = ("dp_replicate", *shard), ("pp", "dp_replicate", *shard)
        mesh[dp_dims]._flatten("dp")
        mesh[pp_dp_dims]._flatten("pp_dp")        # step statistics
        if self.cp > 1:       # loss, token counts and statistics are summed over cp as well
            mesh[dp_dims + cp]._flatten("dp_cp")
            mesh[pp_dp_dims + cp]._flatten("pp_dp_cp")
        # torch 2.11+ warns that slicing the flattened "dp" from the root mesh will be
        # deprecated; it still works in 2.13 and is the documented way to reach the
        # group. Silence only that message (moving to the bookkept flattened mesh is
        # tracked in docs/parallelism.md).
        warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
        return mesh

    def describe(self) -> str:
        """One line for the run log."""
        return (f"world={self.world_size} pp={self.pp}(x{self.virtual_stages} virtual) "
                f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} cp={self.cp} tp={self.tp}"
                + (f" ep={self.ep}" if self.ep > 1 else "")
                + (f" (expert groups: {self.ep_dp} dp x {self.ep_cp} cp ranks)" if self.ep_cp > 1 else ""))
