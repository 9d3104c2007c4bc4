"""FP8 training: the ``precision.fp8`` section and its two backends.

Which projections compute in FP8 is decided by the *role* the linear slot gave them
(:data:`model.layers.ROLES`), never by their names:

* converted: modules whose class is exactly ``torch.nn.Linear`` with a role not in
  ``keep_roles`` (default ``head`` and ``router``), outside the first
  ``keep_first_blocks`` and last ``keep_last_blocks`` block units, whose (tensor-parallel
  local) dimensions are multiples of 16 (the FP8 GEMM's rule), and that are not K/V
  projections replicated over tensor-parallel ranks (``tensor > num_kv_heads``: each
  rank holds a partial output gradient, and FP8 of partial sums is not FP8 of the sum);
* never converted: the embedding (not a linear), linear kinds of other classes
  (BitNet's BitLinear and any subclass), modules that set ``fp8_exempt = True``, and
  projections without a role.

Backends (``precision.fp8.backend``):

``torchao``
    ``torchao.float8``'s training conversion (``Float8Linear``: dynamic per-tensor or
    row-wise scaling of the input, weight and output gradient at every GEMM). It runs
    before tensor parallelism; with the tensor-wise recipe the tensor-parallel roles use
    torchao's float8 styles (:func:`float8_tp_style`, FP8 all-gathers of activations)
    and FSDP2 all-gathers weights in FP8, with the weight scales precomputed for all
    weights at once after each optimizer step (:meth:`FP8.post_optimizer_hooks`). On
    CPU (and GPUs without FP8 units, with ``emulate``) the GEMMs are emulated: inputs are
    quantized exactly as on the GPU and multiplied in fp32.
``te``
    NVIDIA Transformer Engine: each selected projection becomes :class:`TELinear`,
    which keeps the ``weight``/``bias`` parameters of ``nn.Linear`` (so names, init,
    tensor-parallel styles, FSDP and checkpoints are unchanged) and runs the GEMM of its
    local shard through a ``transformer_engine.pytorch.Linear`` inside TE's FP8 autocast
    with the chosen recipe; delayed-scaling amaxes are reduced over the
    data x tensor-parallel group. Needs a CUDA GPU and ``pip install .[te]``.

Context parallelism (each cp rank holds part of every sequence): the scales of
token-indexed tensors must be the whole sequence's. torchao tensor-wise projections become
``CPFloat8Linear`` (:func:`cp_float8_linear_class`: input and output gradient cast with
their amax all-reduced over the cp ranks); rowwise_gw_hp scales per token and TE's
delayed scaling reduces over a group with the cp ranks, so both apply unchanged; the
rest is refused in one line (:func:`cp_refusal`).

Scaling state: the torchao recipes are stateless (scales are recomputed from the
tensors each step), so a resumed run continues exactly. TE's delayed scaling keeps
amax histories and scales; :meth:`FP8.state_dict` / :meth:`FP8.load_state_dict`
carry them in the checkpoint's ``extras.fp8``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from polytron.model.configlib import ConfigError, bad, doc
from polytron.model.protocols import TPRoles

if TYPE_CHECKING:
    from polytron.model.transformer import Transformer

RECIPES = ("tensorwise", "rowwise", "rowwise_gw_hp", "delayed", "mxfp8")
#: recipe -> backends that implement it
RECIPE_BACKENDS = {"tensorwise": ("torchao", "te"), "rowwise": ("torchao",), "rowwise_gw_hp": ("torchao",),
                   "delayed": ("te",), "mxfp8": ("te",)}
INSTALL = {"torchao": "pip install .[fp8]  (torchao>=0.18)",
           "te": "pip install .[te]  (transformer-engine[pytorch], on a CUDA machine)"}
#: FP8 GEMMs need every dimension to be a multiple of this
GEMM_MULTIPLE = 16


@dataclass
class FP8Config:
    """FP8 projections (``precision.fp8``); off unless ``enabled``. See docs/fp8.md."""
    enabled: bool = field(default=False, metadata=doc("Compute the selected projections in FP8."))
    backend: Literal["torchao", "te"] = field(default="torchao", metadata=doc(
        "torchao (float8 training conversion; CPU emulated and GPU) or te (Transformer Engine, "
        "CUDA only, pip install .[te])."))
    recipe: Literal["tensorwise", "rowwise", "rowwise_gw_hp", "delayed", "mxfp8"] = field(
        default="tensorwise", metadata=doc(
            "Scaling: tensorwise (per-tensor current scaling; torchao, te), rowwise (per-row "
            "scales, power-of-2; torchao), rowwise_gw_hp (row-wise, weight gradient in high "
            "precision; torchao), delayed (scales from an amax history; te), mxfp8 (32-element "
            "block scales; te on Blackwell, sm100+)."))
    format: Literal["auto", "hybrid", "e4m3"] = field(default="auto", metadata=doc(
        "hybrid: E4M3 forward, E5M2 gradients; e4m3: E4M3 throughout; auto: the recipe's own "
        "(hybrid for tensorwise/delayed, e4m3 for the row-wise recipes and mxfp8)."))
    amax_history_len: int = field(default=1024, metadata=doc(
        "delayed: steps of amax history the scale is taken from."))
    amax_compute_algo: Literal["max", "most_recent"] = field(default="max", metadata=doc(
        "delayed: the history's max, or its most recent amax."))
    margin: int = field(default=0, metadata=doc(
        "delayed: scale = fp8_max / amax / 2^margin (headroom for growing values)."))
    pow2_scales: bool = field(default=False, metadata=doc(
        "tensorwise (torchao): round every scale down to a power of two, so scaling itself "
        "adds no rounding error (the row-wise recipes always do)."))
    keep_roles: list[str] = field(default_factory=lambda: ["head", "router"], metadata=doc(
        "Projection roles that stay in high precision (model.layers.ROLES). The embedding "
        "always does; BitNet layers are never converted."))
    keep_first_blocks: int = field(default=0, metadata=doc(
        "Block units at the start of the model that stay in high precision."))
    keep_last_blocks: int = field(default=0, metadata=doc(
        "Block units at the end of the model that stay in high precision."))
    fsdp_all_gather: bool = field(default=True, metadata=doc(
        "torchao tensorwise under FSDP2: all-gather weights in FP8 (scales precomputed for "
        "every weight after each optimizer step). Other recipes gather in high precision."))
    emulate: bool = field(default=False, metadata=doc(
        "Emulate the FP8 GEMMs (quantize exactly, multiply in fp32) on a GPU without FP8 "
        "units (torchao). Always on for CPU."))

    def validate(self) -> None:
        """Ranges and recipe/backend combinations (no imports, no devices)."""
        if self.backend not in RECIPE_BACKENDS[self.recipe]:
            raise bad("precision.fp8.recipe", self.recipe, _recipe_help(self.backend, self.recipe))
        self._validate_format()
        self._validate_delayed()
        self._validate_selection()
        for key in ("pow2_scales", "emulate"):
            if getattr(self, key) and self.backend == "te":
                raise bad(f"precision.fp8.{key}", True, "false with backend 'te' (a torchao option)")

    def _validate_format(self) -> None:
        fmt = self.resolved_format()
        if self.recipe in ("rowwise", "rowwise_gw_hp") and fmt != "e4m3":
            raise bad("precision.fp8.format", self.format,
                      f"'e4m3' or 'auto' with recipe {self.recipe!r} (torchao's row-wise GEMMs take "
                      "E4M3 gradients only)")
        if self.recipe == "mxfp8" and fmt != "e4m3":
            raise bad("precision.fp8.format", self.format, "'e4m3' or 'auto' with recipe 'mxfp8'")

    def _validate_selection(self) -> None:
        from polytron.model.layers import ROLES
        for i, role in enumerate(self.keep_roles):
            if role not in ROLES:
                raise bad(f"precision.fp8.keep_roles[{i}]", role, "one of " + ", ".join(ROLES))
        for key in ("keep_first_blocks", "keep_last_blocks"):
            if getattr(self, key) < 0:
                raise bad(f"precision.fp8.{key}", getattr(self, key), "an integer >= 0")

    def _validate_delayed(self) -> None:
        defaults = FP8Config()
        if self.recipe != "delayed":
            for key in ("amax_history_len", "amax_compute_algo", "margin"):
                if getattr(self, key) != getattr(defaults, key):
                    raise bad(f"precision.fp8.{key}", getattr(self, key),
                              f"left at its default: it applies to recipe 'delayed' only "
                              f"(this run has recipe {self.recipe!r})")
            return
        if self.amax_history_len < 1:
            raise bad("precision.fp8.amax_history_len", self.amax_history_len, "an integer >= 1")
        if self.margin < 0:
            raise bad("precision.fp8.margin", self.margin, "an integer >= 0")

    def ignored_keys(self) -> list[str]:
        """With FP8 off: the settings given away from their defaults, which then do nothing
        (an FP8 recipe run with ``precision.fp8.enabled=false`` as its high-precision
        baseline keeps them; the trainer names them in one ``note:`` line)."""
        if self.enabled:
            return []
        defaults = FP8Config()
        return [f"precision.fp8.{f.name}" for f in dataclasses.fields(self)
                if f.name != "enabled" and getattr(self, f.name) != getattr(defaults, f.name)]

    def check_run(self, model_cfg, device: str) -> None:
        """Rules spanning sections and the machine: block counts, installed backend, device."""
        if not self.enabled:
            return
        layers = model_cfg.num_layers
        if self.keep_first_blocks + self.keep_last_blocks >= layers:
            raise bad("precision.fp8.keep_last_blocks", self.keep_last_blocks,
                      f"a count leaving some block in FP8: keep_first_blocks={self.keep_first_blocks} "
                      f"+ keep_last_blocks must be < model.num_layers={layers}")
        module = {"torchao": "torchao", "te": "transformer_engine"}[self.backend]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"precision.fp8.backend={self.backend!r} needs {module}, which is not "
                              f"installed: {INSTALL[self.backend]}")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if self.backend == "te" and not cuda:
            raise bad("precision.fp8.backend", "te", "'torchao' on a machine without CUDA "
                      "(Transformer Engine runs on NVIDIA GPUs only)")
        if cuda and torch.cuda.is_available():
            _check_gpu(self)

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "hybrid" if self.recipe in ("tensorwise", "delayed") else "e4m3"


def _recipe_help(backend: str, recipe: str) -> str:
    other = [b for b in RECIPE_BACKENDS.get(recipe, ()) if b != backend]
    hint = f"; recipe {recipe!r} needs precision.fp8.backend={other[0]!r}" if other else ""
    if backend == "torchao" and recipe == "delayed":
        hint += " (torchao removed delayed scaling in 0.10)"
    mine = [r for r, backends in RECIPE_BACKENDS.items() if backend in backends]
    return f"one of {', '.join(repr(r) for r in mine)} with backend {backend!r}{hint}"


def _check_gpu(cfg: FP8Config) -> None:
    """FP8 needs compute capability 8.9 (Ada/Hopper); MXFP8 needs 10.0 (Blackwell)."""
    cap = torch.cuda.get_device_capability()
    if cfg.recipe == "mxfp8" and cap < (10, 0):
        raise bad("precision.fp8.recipe", "mxfp8", f"a recipe this GPU runs: MXFP8 block scaling needs "
                  f"compute capability 10.0 (Blackwell), this GPU has {cap[0]}.{cap[1]}")
    if cap < (8, 9) and not cfg.emulate:
        raise bad("precision.fp8.enabled", True, f"false, or precision.fp8.emulate=true: this GPU "
                  f"(compute capability {cap[0]}.{cap[1]}) has no FP8 units (8.9+ needed)")


# ---------------------------------------------------------------- selection

def block_positions(part: Transformer) -> dict[str, int]:
    """Block unit name -> its index among the whole model's blocks (same on every stage)."""
    blocks = [u.name for u in part.spec.units(part.cfg) if u.kind == "block"]
    return {name: i for i, name in enumerate(blocks)}


def kept_reason(module: nn.Module, cfg: FP8Config) -> Optional[str]:
    """Why ``module`` stays in high precision (None: it converts). Only exact
    ``nn.Linear`` projections with a role convert."""
    if type(module) is not nn.Linear:
        return "class"
    role = getattr(module, "role", None)
    if role is None or getattr(module, "fp8_exempt", False):
        return "no role" if role is None else "exempt"
    if role in cfg.keep_roles:
        return f"role {role}"
    return None


def select(part: Transformer, cfg: FP8Config, tp: int,
           tp_roles: dict[str, object]) -> tuple[list[str], dict[str, int]]:
    """(paths of the linears of ``part`` to convert, {reason: count} of those kept)."""
    positions = block_positions(part)
    n_blocks = len(positions)
    chosen: list[str] = []
    kept: dict[str, int] = {}
    for unit, unit_module in part.unit_modules():
        edge = unit.kind == "block" and (positions[unit.name] < cfg.keep_first_blocks
                                         or positions[unit.name] >= n_blocks - cfg.keep_last_blocks)
        for sub, module in unit_module.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            path = f"{unit.name}.{sub}" if sub else unit.name
            reason = kept_reason(module, cfg) or ("first/last block" if edge else None)
            if reason is None and tp_roles.get(path) == "kv_replicated":
                # each rank holds a partial output gradient of the shared head: quantizing
                # partial sums is not quantizing their sum, so the projection stays exact
                reason = "replicated KV head (tensor > num_kv_heads)"
            if reason is None and not _gemm_ok(module, tp_roles.get(path), tp):
                reason = f"shape not a multiple of {GEMM_MULTIPLE}"
            if reason:
                kept[reason] = kept.get(reason, 0) + 1
            else:
                chosen.append(path)
    return chosen, kept


def _gemm_ok(module: nn.Linear, role, tp: int) -> bool:
    """Local (tensor-parallel shard) dimensions divisible by :data:`GEMM_MULTIPLE`."""
    out_f, in_f = module.out_features, module.in_features
    if tp > 1 and role in ("colwise", "kv"):
        out_f //= tp
    elif tp > 1 and role == "rowwise":
        in_f //= tp
    return out_f % GEMM_MULTIPLE == 0 and in_f % GEMM_MULTIPLE == 0


def declared_tp_roles(part: Transformer, tp: int) -> dict[str, object]:
    """Module path -> 'colwise' / 'rowwise' / 'kv' (split) / 'kv_replicated' from ``tp_roles()``."""
    out: dict[str, object] = {}
    for unit, unit_module in part.unit_modules():
        for path, module in unit_module.named_modules():
            for child, role in (module.tp_roles().items() if isinstance(module, TPRoles) else ()):
                full = ".".join(p for p in (unit.name, path, child) if p)
                if isinstance(role, tuple) and role[0] == "kv":
                    role = "kv" if role[1] % tp == 0 else "kv_replicated"
                out[full] = role
    return out


def replace(part: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = part.get_submodule(parent) if parent else part
    setattr(owner, leaf, new)


# ---------------------------------------------------------------- torchao

def torchao_config(cfg: FP8Config, emulate: bool, fsdp_all_gather: bool):
    """The ``Float8LinearConfig`` of the recipe and format."""
    from torchao.float8 import CastConfig, Float8LinearConfig  # type: ignore[import-untyped]
    from torchao.float8.config import e4m3_dtype  # type: ignore[import-untyped]
    if cfg.recipe in ("rowwise", "rowwise_gw_hp"):
        base = Float8LinearConfig.from_recipe_name("rowwise" if cfg.recipe == "rowwise" else "rowwise_with_gw_hp")
        return _with(base, emulate=emulate)
    grad = CastConfig(target_dtype=e4m3_dtype) if cfg.resolved_format() == "e4m3" else CastConfig()
    return Float8LinearConfig(cast_config_grad_output=grad, emulate=emulate,
                              enable_fsdp_float8_all_gather=fsdp_all_gather,
                              round_scales_to_power_of_2=cfg.pow2_scales)


def _with(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def to_float8_linear(module: nn.Linear, config, fp8_collectives: bool, cp_mesh=None) -> nn.Module:
    """torchao's ``Float8Linear`` over the same parameters, keeping the role;
    ``fp8_collectives``: its tensor-parallel all-gathers may move FP8 (NCCL). With a
    ``cp_mesh`` (tensor-wise recipe under context parallelism) the module is a
    :func:`cp_float8_linear_class`, whose token-indexed casts take cp-global amaxes."""
    from torchao.float8.float8_linear import Float8Linear  # type: ignore[import-untyped]
    cls = Float8Linear if cp_mesh is None else cp_float8_linear_class()
    new = cls.from_float(module, config=config)
    new.role = module.role
    new.fp8_collectives = fp8_collectives
    if cp_mesh is not None:
        new.cp_mesh = cp_mesh
    return new


def cast_over_mesh(x: torch.Tensor, dtype: torch.dtype, mm_config, role, pow2: bool, mesh) -> torch.Tensor:
    """``x`` as a tensor-wise FP8 ``Float8TrainingTensor`` whose amax is all-reduced (MAX)
    over ``mesh`` (the cp ranks, each holding part of the sequence): the scale of the
    whole sequence, as one process computes it. A tensor-parallel DTensor's amax is first
    taken over the whole DTensor (over tp), as torchao does for one."""
    from torch.distributed.tensor import DTensor, Replicate
    if not isinstance(x, DTensor):
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic  # type: ignore[import-untyped]
        return hp_tensor_to_float8_dynamic(x, dtype, mm_config, reduce_amax=True, gemm_input_role=role,
                                           device_mesh=mesh, round_scales_to_power_of_2=pow2)
    from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8  # type: ignore[import-untyped]
    from torchao.float8.float8_utils import amax_to_scale  # type: ignore[import-untyped]
    with torch.no_grad():
        amax = cast(DTensor, torch.max(torch.abs(x))).full_tensor()      # () over tp
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        scale = amax_to_scale(amax, dtype, pow2)
    tp_mesh = x.device_mesh
    scale = DTensor.from_local(scale, tp_mesh, [Replicate()] * tp_mesh.ndim, run_check=False)
    return hp_tensor_and_scale_to_float8(x, scale, dtype, mm_config, role)


class GradToFloat8OverMesh(torch.autograd.Function):
    """Forward: identity. Backward: the gradient cast to FP8 with :func:`cast_over_mesh`
    (torchao's ``NoopFwToFloat8BwDynamic`` with a mesh-global amax and pow2 scales)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, dtype: torch.dtype, mm_config, pow2: bool, mesh) -> torch.Tensor:
        ctx.cast = (dtype, mm_config, pow2, mesh)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from torchao.float8.distributed_utils import tensor_already_casted_to_fp8  # type: ignore[import-untyped]
        from torchao.float8.float8_training_tensor import GemmInputRole
        if tensor_already_casted_to_fp8(grad):
            return grad, None, None, None, None
        dtype, mm_config, pow2, mesh = ctx.cast
        return cast_over_mesh(grad, dtype, mm_config, GemmInputRole.GRAD_OUTPUT, pow2, mesh), None, None, None, None


@functools.lru_cache(maxsize=None)
def cp_float8_linear_class() -> Any:
    """``CPFloat8Linear``: torchao's tensor-wise ``Float8Linear`` under context parallelism.

    Same parameters (``weight``, ``bias``: names and checkpoints unchanged) and GEMMs; only
    the two token-indexed operands are cast before torchao sees them, with their amax
    all-reduced over ``cp_mesh``: the input in forward, the GEMM's output gradient in
    backward (before the bias, whose gradient stays high precision). torchao uses an
    already-cast operand as is, for its grad-weight GEMM too, so every scale equals the
    single-process one. The weight is whole on every cp rank and casts as usual. Under
    tensor parallelism the plain styles hand it DTensors (:func:`is_float8_tensorwise` is
    false for it), whose amaxes cover tp and then cp."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    from torchao.float8.float8_training_tensor import GemmInputRole

    class CPFloat8Linear(Float8Linear):
        cp_mesh: Any = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled("cuda"):        # as Float8Linear: cast in autocast's dtype
                x = x.to(torch.get_autocast_dtype("cuda"))
            c, mm = self.config, self.linear_mm_config
            pow2 = c.round_scales_to_power_of_2
            x8 = cast_over_mesh(x, c.cast_config_input.target_dtype, mm, GemmInputRole.INPUT, pow2, self.cp_mesh)
            y = matmul_with_hp_or_float8_args.apply(x8, self.weight.t(), mm, c)      # (..., out)
            y = GradToFloat8OverMesh.apply(y, c.cast_config_grad_output.target_dtype, mm, pow2, self.cp_mesh)
            return y if self.bias is None else y + self.bias.to(y.dtype)

        def extra_repr(self) -> str:
            return f"{super().extra_repr()}, cp-global amax"

    return CPFloat8Linear


def float8_config(module: nn.Module) -> Any:
    """The ``Float8LinearConfig`` of a torchao ``Float8Linear`` (torchao ships no types)."""
    return module.config


def is_float8_tensorwise(module: nn.Module) -> bool:
    """A torchao Float8Linear whose casts are dynamic and tensor-wise (torchao's float8
    tensor-parallel styles support exactly these) and whose collectives may move FP8.
    Elsewhere (gloo, row-wise, and ``CPFloat8Linear`` under context parallelism, whose
    casts must also reduce over cp) the plain styles apply: the module still casts its
    DTensor operands with global scales, only the all-gathers stay in high precision."""
    if type(module).__name__ != "Float8Linear" or not getattr(module, "fp8_collectives", False):
        return False
    from torchao.float8.config import ScalingGranularity, ScalingType
    c = float8_config(module)
    casts = (c.cast_config_input, c.cast_config_weight, c.cast_config_grad_output,
             c.cast_config_input_for_grad_weight, c.cast_config_weight_for_grad_input,
             c.cast_config_grad_output_for_grad_weight)
    return all(k.scaling_type is ScalingType.DYNAMIC and k.scaling_granularity is ScalingGranularity.TENSORWISE
               for k in casts)


def float8_tp_style(role, module: nn.Module, tp: int, sequence_parallel: bool):
    """torchao's float8 style for a tensor-parallel role of a tensor-wise Float8Linear
    (``colwise``, split ``kv``, ``rowwise``), or for the ``gather`` of a module whose
    gathered input feeds only such linears (the all-gather then moves FP8); else None."""
    from torch.distributed.tensor import Replicate, Shard
    if role in ("colwise", "kv") and is_float8_tensorwise(module):
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel  # type: ignore[import-untyped]
        return Float8ColwiseParallel()
    if role == "rowwise" and is_float8_tensorwise(module):
        from torchao.float8.float8_tensor_parallel import Float8RowwiseParallel
        return Float8RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate())
    if role == "gather" and sequence_parallel and _float8_consumers(module, tp):
        import inspect

        from torchao.float8.float8_tensor_parallel import PrepareFloat8ModuleInput
        n = len([p for p in inspect.signature(module.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        return PrepareFloat8ModuleInput(input_layouts=(Shard(1),) + (None,) * (n - 1),
                                        desired_input_layouts=(Replicate(),) + (None,) * (n - 1))
    return None


def _float8_consumers(module: nn.Module, tp: int) -> bool:
    """Every projection that reads ``module``'s input (its colwise / kv children) is a
    column-split, tensor-wise Float8Linear with E4M3 inputs, and there is at least one
    (a replicated KV head keeps the high-precision gather)."""
    roles = module.tp_roles() if isinstance(module, TPRoles) else {}
    kv = [r for r in roles.values() if isinstance(r, tuple) and r[0] == "kv"]
    if any(r[1] % tp for r in kv):
        return False
    readers = [module.get_submodule(c) for c, r in roles.items() if r == "colwise" or r in kv]
    return bool(readers) and all(is_float8_tensorwise(m) and float8_config(m).cast_config_input.target_dtype
                                 == torch.float8_e4m3fn for m in readers)


# ---------------------------------------------------------------- Transformer Engine

def te_recipe(cfg: FP8Config):
    """The ``transformer_engine.common.recipe`` object of the configured recipe."""
    from transformer_engine.common import recipe as te_r
    fmt = te_r.Format.E4M3 if cfg.resolved_format() == "e4m3" else te_r.Format.HYBRID
    if cfg.recipe == "delayed":
        return te_r.DelayedScaling(margin=cfg.margin, fp8_format=fmt, amax_history_len=cfg.amax_history_len,
                                   amax_compute_algo=cfg.amax_compute_algo)
    if cfg.recipe == "mxfp8":
        return te_r.MXFP8BlockScaling(fp8_format=fmt)
    return te_r.Float8CurrentScaling(fp8_format=fmt)


def te_autocast(recipe, group):
    """TE's FP8 autocast (``te.pytorch.fp8_autocast``; ``autocast`` in TE >= 2.8)."""
    import transformer_engine.pytorch as te
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


class TELinear(nn.Linear):
    """``nn.Linear`` whose GEMM runs in a Transformer Engine ``Linear`` under FP8 autocast.

    The parameters stay this module's ``weight``/``bias`` (tensor-parallel styles shard
    them as for any linear; names and checkpoints do not change). Each forward takes the
    local views of input and weight (DTensors under tensor parallelism), runs TE's
    ``Linear`` (built on first use with the local shape) on them with its own weight
    swapped for the local view, and hands the output back with the placement the GEMM
    implies: ``Shard(-1)`` for a column shard, ``Partial`` for a row shard (then the
    style's reduce-scatter / all-reduce follows). The TE module is not a child, so its
    unused own weight never reaches state dicts or the optimizer.
    """

    def __init__(self, linear: nn.Linear, recipe, group_fn: Callable[[], object]):
        with torch.device("meta"):
            super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight, self.bias = linear.weight, linear.bias
        self.role = linear.role
        self._recipe, self._group_fn = recipe, group_fn
        self._te: list[nn.Module] = []          # a list, so TE's module is not a child

    def _engine(self, w: torch.Tensor) -> nn.Module:
        if not self._te:
            import transformer_engine.pytorch as te
            mod = te.Linear(w.shape[1], w.shape[0], bias=False, params_dtype=w.dtype, device=w.device)
            mod.weight.data = torch.empty(0, device=w.device, dtype=w.dtype)   # the GEMM uses ours
            self._te.append(mod)
        return self._te[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Shard
        from torch.nn.utils.stateless import _reparametrize_module
        w = self.weight
        row = isinstance(w, DTensor) and any(isinstance(p, Shard) and p.dim == 1 for p in w.placements)
        if isinstance(x, DTensor):
            # a column shard's input is replicated and its gradient partial (summed over tp)
            x = x.to_local(grad_placements=None if row else [Partial()])
        w_local = w.to_local() if isinstance(w, DTensor) else w
        engine = self._engine(w_local)
        with _reparametrize_module(engine, {"weight": w_local}), te_autocast(self._recipe, self._group_fn()):
            y = engine(x)                                         # (..., out_local)
        if isinstance(w, DTensor):
            placement = Partial() if row else Shard(y.dim() - 1)
            y = DTensor.from_local(y, w.device_mesh, [placement], run_check=False)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transformer_engine"

    def te_state(self) -> Optional[torch.Tensor]:
        """TE's own serialized scaling state (``get_extra_state``: amax histories and
        scales of delayed scaling), or None before the first forward."""
        return self._te[0].get_extra_state() if self._te else None

    def load_te_state(self, state: torch.Tensor) -> None:
        """Restore it (``set_extra_state`` initializes TE's FP8 metadata first)."""
        from torch.distributed.tensor import DTensor
        w = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        self._engine(w.detach()).set_extra_state(state)


# ---------------------------------------------------------------- the plan

class FP8:
    """The FP8 plan of one engine: converts model parts, supplies hooks and state."""

    def __init__(self, cfg: FP8Config, dims, mesh, device: torch.device):
        self.cfg, self.dims, self.mesh, self.device = cfg, dims, mesh, device
        self.emulate = device.type != "cuda" or cfg.emulate
        # FP8 collectives need NCCL (gloo has no float8 types); torchao gathers FP8 weights
        # for tensor-wise scales only
        self.fp8_collectives = device.type == "cuda"
        self.fsdp_all_gather = (cfg.backend == "torchao" and cfg.recipe == "tensorwise" and self.fp8_collectives
                                and cfg.fsdp_all_gather and dims.dp_shard > 1)
        self.parts: list[nn.Module] = []
        self.converted = 0
        self.kept: dict[str, int] = {}

    # ------------------------------------------------------------ conversion

    def convert(self, part: Transformer) -> None:
        """Swap the selected projections of ``part`` (before tensor parallelism)."""
        tp = self.dims.tp
        chosen, kept = select(part, self.cfg, tp, declared_tp_roles(part, tp))
        make = self._torchao_maker() if self.cfg.backend == "torchao" else self._te_maker()
        for path in chosen:
            replace(part, path, make(part.get_submodule(path)))
        self.parts.append(part)
        self.converted += len(chosen)
        for k, v in kept.items():
            self.kept[k] = self.kept.get(k, 0) + v

    def _torchao_maker(self):
        if self.device.type != "cuda":      # torchao warns that its CUDA kernels do not load
            logging.getLogger("torchao").setLevel(logging.ERROR)
        try:
            config = torchao_config(self.cfg, self.emulate, self.fsdp_all_gather)
        except ImportError as e:
            raise ConfigError(f"precision.fp8.backend='torchao' cannot import torchao ({e}): "
                              f"{INSTALL['torchao']}") from None
        cp_mesh = self.mesh["cp"] if self.dims.cp > 1 and self.cfg.recipe == "tensorwise" else None
        return functools.partial(to_float8_linear, config=config, fp8_collectives=self.fp8_collectives,
                                 cp_mesh=cp_mesh)

    def _te_maker(self):
        try:
            recipe = te_recipe(self.cfg)
        except ImportError as e:
            raise ConfigError(f"precision.fp8.backend='te' cannot import Transformer Engine ({e}): "
                              f"{INSTALL['te']}") from None
        return lambda linear: TELinear(linear, recipe, self.amax_group)

    @functools.cached_property
    def _amax_group(self):
        """Delayed scaling reduces amaxes over every rank that shares the weights' scales:
        the data-parallel x tensor-parallel ranks of this pipeline stage (Megatron's amax
        reduction group); None in one process."""
        if self.mesh is None:
            return None
        return self.mesh["dp_replicate", "dp_shard", "cp", "tp"]._flatten("fp8_amax").get_group()

    def amax_group(self):
        return self._amax_group

    def prepare_groups(self) -> None:
        """Create the amax group on every rank at build time (a collective)."""
        if self.cfg.backend == "te" and self.mesh is not None:
            self.amax_group()

    # ------------------------------------------------------------ step and state

    def post_optimizer_hooks(self) -> list[Callable[[], None]]:
        """After each update: precompute every FP8 weight's scale in one all-reduce
        (torchao FP8 all-gather under FSDP2)."""
        if not self.fsdp_all_gather:
            return []
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
        return [functools.partial(precompute_float8_dynamic_scale_for_fsdp, part) for part in self.parts]

    def after_load(self) -> None:
        """Weights were replaced (a resume): refresh precomputed scales from them."""
        for hook in self.post_optimizer_hooks():
            hook()

    def te_modules(self) -> dict[str, TELinear]:
        return {name: m for part in self.parts for name, m in part.named_modules() if isinstance(m, TELinear)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's scaling state that is not a function of the weights: TE's per-module
        state (delayed scaling's amax histories and scales), saved as a per-rank checkpoint
        file. Empty for torchao, whose recipes recompute every scale from the tensors."""
        out = {}
        for name, m in self.te_modules().items():
            state = m.te_state()
            if state is not None:
                out[name] = state
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore this rank's saved scaling state, then refresh the weight-derived scales
        (the checkpointed per-rank state ``fp8``, :mod:`pretrain.checkpoint.rank_state`)."""
        modules = self.te_modules()
        for name, value in state.items():
            if name in modules:
                modules[name].load_te_state(value)
        self.after_load()

    def start_fresh(self, iteration: Optional[int]) -> None:
        """Nothing saved for this rank (another world size, a stateless recipe, or a
        weights-only load): only the weight-derived scales are refreshed."""
        self.after_load()

    def describe(self) -> str:
        """One log line: backend, recipe, what converted and what stayed high precision."""
        kept = ", ".join(f"{v} by {k}" for k, v in sorted(self.kept.items())) or "none"
        mode = " (emulated GEMMs)" if self.emulate and self.cfg.backend == "torchao" else ""
        gather = ", FP8 FSDP all-gather" if self.fsdp_all_gather else ""
        if self.cfg.backend == "torchao" and not self.fp8_collectives and (self.dims.tp > 1 or self.dims.dp_shard > 1):
            gather += ", all-gathers in high precision (gloo has no float8)"
        if self.cfg.backend == "torchao" and self.cfg.recipe == "tensorwise" and self.dims.cp > 1:
            gather += ", input/grad amaxes all-reduced over cp"
        return (f"fp8: {self.cfg.backend} {self.cfg.recipe} {self.cfg.resolved_format()}{mode}{gather}: "
                f"{self.converted} projections in FP8; kept in high precision: {kept}")


def cp_refusal(cfg: FP8Config, cp: int, seq_len: Optional[int] = None) -> Optional[str]:
    """Why FP8 with context parallelism ``cp`` cannot train like one process (one line),
    or None. The torchao tensor-wise recipe all-reduces its token-indexed amaxes over the
    cp ranks (:func:`cp_float8_linear_class`); rowwise_gw_hp scales per token only and TE's
    delayed scaling reduces amaxes over a group that includes cp. Refused: row-wise (its
    grad-weight operands are scaled per feature over all tokens), TE's current scaling
    (each rank's own amax), and MXFP8 unless every
    cp chunk is whole 32-token blocks (``seq_len`` known: RunConfig.validate)."""
    if not cfg.enabled or cp == 1:
        return None
    head = f"precision.fp8.recipe={cfg.recipe!r} (backend {cfg.backend!r}) with parallel.context={cp}"
    if cfg.recipe == "rowwise":
        return (f"{head} is not supported: its grad-weight GEMM scales each feature over all tokens, which "
                "the cp ranks split (use recipe 'tensorwise' or 'rowwise_gw_hp')")
    if cfg.backend == "te" and cfg.recipe == "tensorwise":
        return (f"{head} is not supported: Transformer Engine's current scaling takes each cp rank's own "
                "amax (use recipe 'delayed', or backend 'torchao')")
    if cfg.recipe == "mxfp8" and seq_len is not None and seq_len % (64 * cp):
        return (f"{head} needs data.seq_len divisible by 64 x parallel.context = {64 * cp} (each cp chunk "
                f"whole 32-token MXFP8 blocks), got {seq_len}")
    return None


def build_fp8(cfg: Optional[FP8Config], dims, mesh, device: torch.device) -> Optional[FP8]:
    """The FP8 plan for an engine, or None when ``precision.fp8`` is off."""
    if cfg is None or not cfg.enabled:
        return None
    refusal = cp_refusal(cfg, dims.cp)
    if refusal:
        raise ConfigError(refusal)
    plan = FP8(cfg, dims, mesh, device)
    plan.prepare_groups()
    return plan

