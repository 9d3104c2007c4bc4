"""Plan a run before renting the cluster: per-rank memory, communication and step time.

Everything is read from the model built on the meta device (so a 70B plans instantly):

* parameters per rank: each unit's parameter shapes, cut by the layout the way the
  engine cuts them (pipeline stages by units, tensor parallel by the modules' ``tp_roles``,
  experts over ``ep``, FSDP over the data-parallel shard ranks with dim-0 padding);
* saved activations: every module that declares ``saved_elements(tp, sp)`` (elements saved
  for backward per token of the micro-batch, at the compute width) reports its own terms, and
  ``saved_fp32_elements(tp, sp)`` what a 16-bit run keeps wider (norms' and routers' fp32
  copies, log-sum-exps; model/protocols.py ``SavedActivations``); modules that declare none
  are walked into, and a bare projection counts its input (docs/scaling.md derives the
  per-block formulas and checks them against measurement in fp32 and bf16);
* collectives per step, per kind and mesh dimension, from the same shapes;
* step time from the spec's own FLOP accounting (model/accounting.py) and bytes over a
  hardware profile (:data:`PROFILES`), with the stated efficiency and overlap assumptions.

``ParallelDims.resolve`` decides which layouts are valid; its ``LayoutError`` text is the
reason a searched layout is refused.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from polytron.model.configlib import ConfigError
from polytron.model.transformer import Transformer
from polytron.parallel.mesh import LayoutError, ParallelDims

GIB = 1024 ** 3


@dataclass(frozen=True)
class Hardware:
    """One accelerator and its links (rates per GPU, one direction)."""
    name: str
    memory_gb: float        # usable device memory, GB (1e9 bytes)
    bf16_tflops: float      # dense peak
    fp8_tflops: float
    hbm_tbs: float
    nvlink_gbs: float       # per GPU, one direction
    ib_gbs: float           # per GPU, one direction (one 400 Gb/s NIC per GPU)
    gpus_per_node: int = 8


#: Vendor datasheet figures (NVIDIA H100 SXM5 / H200 SXM; ConnectX-7 400 Gb/s per GPU).
PROFILES: dict[str, Hardware] = {
    "h100-80gb": Hardware("h100-80gb", 80.0, 989.0, 1979.0, 3.35, 450.0, 50.0),
    "h200-141gb": Hardware("h200-141gb", 141.0, 989.0, 1979.0, 4.8, 450.0, 50.0),
}


def hardware(name: str, **overrides: float) -> Hardware:
    """The profile ``name`` with the non-None ``overrides`` applied; one-line error if unknown."""
    if name not in PROFILES:
        raise ConfigError(f"--gpu {name!r}: unknown hardware profile; known: {', '.join(PROFILES)}")
    hw = PROFILES[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return hw if not changes else Hardware(**{**hw.__dict__, **changes})


@dataclass(frozen=True)
class Assumptions:
    """What the step-time estimate assumes (stated in every report, never fitted)."""
    matmul_efficiency: float = 0.75     # achieved / peak tensor-core rate of the model's GEMMs
    overlap_fsdp: bool = True           # FSDP gathers and reduce-scatters hidden behind compute
    overlap_ring: bool = True           # ring attention's K/V passes hidden behind the attention
    #                                     score work (only as much of it as that work lasts)
    expert_load: float = 1.0            # rows a rank's experts receive / the uniform share k s b / cp
    #                                     (1: uniform routing; a run's measured balance otherwise)
    expert_kept: float = 1.0            # routed rows kept after capacity (1 - the dropped share)


# ---------------------------------------------------------------- activations

def saved_elements(module: nn.Module, tp: int, sp: bool) -> float:
    """Elements saved for backward per token by ``module`` (its own declaration, else the sum
    of its children's; a bare projection saves its input)."""
    declared = getattr(type(module), "saved_elements", None)
    if declared is not None:
        return float(declared(module, tp, sp))
    if isinstance(module, nn.Linear):
        return float(module.in_features)
    return sum(saved_elements(c, tp, sp) for c in module.children())


def saved_fp32_elements(module: nn.Module, tp: int, sp: bool) -> float:
    """What ``module`` saves per token wider than a 16-bit compute dtype, in the 2-byte units of
    model/protocols.py ``SavedActivations`` (its declaration; 0 for a module declaring only
    ``saved_elements`` or a bare projection; else the sum of its children's)."""
    declared = getattr(type(module), "saved_fp32_elements", None)
    if declared is not None:
        return float(declared(module, tp, sp))
    if isinstance(module, nn.Linear) or getattr(type(module), "saved_elements", None) is not None:
        return 0.0
    return sum(saved_fp32_elements(c, tp, sp) for c in module.children())


def saved_fixed(module: nn.Module, tp: int) -> float:
    """Elements saved once per forward of ``module`` whatever the tokens (BitLinear's quantized
    weight copies): the sum of every submodule's ``saved_fixed_elements(tp)``."""
    total = 0.0
    for m in module.modules():
        declared = getattr(type(m), "saved_fixed_elements", None)
        total += float(declared(m, tp)) if declared is not None else 0.0
    return total


# ---------------------------------------------------------------- parameters

def _role_shards(role: Any, tp: int) -> tuple[bool, bool]:
    """(weight sharded, bias sharded) for a tensor-parallel role."""
    if isinstance(role, tuple) and role and role[0] == "kv":
        split = role[1] % tp == 0
        return split, split
    if role in ("colwise", "vocab_colwise"):
        return True, True
    if role in ("rowwise", "vocab_rowwise"):
        return True, False
    return False, False


def _expert_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__name__ == "Experts"]


@dataclass
class StagePlan:
    """One pipeline rank: its units, parameter elements, saved activations and FLOP share."""
    rank: int
    units: list[str]
    params: int = 0               # elements on this rank (after TP/EP/FSDP sharding)
    params_unsharded: int = 0     # elements gathered by FSDP (after TP/EP), what all-gathers move
    expert_params: int = 0        # of params_unsharded: expert elements (sharded over efsdp)
    last_block_dense: int = 0     # the last block's non-expert elements (FSDP keeps them gathered)
    act_bytes_per_mb: float = 0.0  # saved activations of one micro-batch, all units of the rank
    block_act_bytes: list[float] = field(default_factory=list)
    blocks: int = 0
    moe_layers: int = 0
    attn_layers: int = 0
    vocab_units: int = 0          # embedding and head units on this rank (vocab-parallel under TP)
    embedding: bool = False       # the rank holds the embedding unit
    head: bool = False            # the rank holds the head unit


@dataclass
class Plan:
    """The plan of one layout."""
    layout: str
    dims: ParallelDims
    stages: list[StagePlan]
    micro_batches: int
    in_flight: list[float]
    weights_bytes: float
    grads_bytes: float
    optim_bytes: float
    fp8_bytes: float
    act_bytes: float
    total_bytes: float
    comm: dict[tuple[str, str], float]       # (kind, mesh dim) -> bytes per rank per step (payload)
    comm_by_stage: list[dict[tuple[str, str], float]]   # the same for each pipeline rank
    warmup_by_stage: list[dict[tuple[str, str], float]]  # once per run, on top of the first step
    step_s: float
    compute_s: float
    exposed_comm_s: float
    mfu: float
    fits: bool
    reason: str = ""


def _sharded(n: int, dim0: int, shards: int) -> int:
    """Elements of rank 0's FSDP shard of a tensor with ``n`` elements and first dim ``dim0``."""
    if shards == 1 or n == 0:
        return n
    return math.ceil(dim0 / shards) * (n // dim0)


def _param_elements(module: nn.Module, tp: int, role: Any, fsdp: int, ep: int, efsdp: int) -> tuple[int, int, int]:
    """(elements after all sharding on rank 0, after TP/EP only, expert elements after TP/EP)."""
    experts = {id(p) for m in _expert_modules(module) for p in m.parameters()}
    local = gathered = expert = 0
    roles = {"": role}
    for mname, m in module.named_modules():
        r = roles.get(mname)
        roles_of = getattr(type(m), "tp_roles", None)
        child_roles = roles_of(m) if roles_of is not None else {}
        for cname in dict(m.named_children()):
            roles[f"{mname}.{cname}" if mname else cname] = \
                "replicated" if r == "replicated" else child_roles.get(cname)
        w_split, b_split = _role_shards(r, tp) if tp > 1 and r != "replicated" else (False, False)
        for pname, p in m.named_parameters(recurse=False):
            n, dim0 = p.numel(), p.shape[0] if p.dim() else 1
            if (b_split if pname == "bias" else w_split):
                n, dim0 = n // tp, (dim0 // tp if p.dim() and (r in ("colwise", "vocab_rowwise", "vocab_colwise")
                                                              or isinstance(r, tuple) or pname == "bias") else dim0)
            if id(p) in experts:
                n, dim0 = n // ep, dim0 // ep if p.dim() and dim0 % ep == 0 else dim0
                expert += n
                local += _sharded(n, dim0, efsdp)
            else:
                local += _sharded(n, dim0, fsdp)
            gathered += n
    return local, gathered, expert


def _unit_role(kind: str) -> Any:
    return {"embedding": "vocab_rowwise", "head": "vocab_colwise"}.get(kind)


# ---------------------------------------------------------------- the plan

def _stage_split(model: Transformer, dims: ParallelDims, split: list[int]) -> list[list[str]]:
    """Unit names of each pipeline rank (its virtual stages together)."""
    from polytron.model.spec import layer_units
    from polytron.parallel.pipeline import split_layers, stage_units
    units = model.units
    layers = split_layers(len(layer_units(units)), dims.num_stages, split or None)
    per_stage = stage_units(units, layers)
    return [[u.name for s in range(r, dims.num_stages, dims.pp) for u in per_stage[s]]
            for r in range(dims.pp)]


def in_flight(schedule: str, pp: int, v: int, m: int, rank: int) -> float:
    """Micro-batches whose activations rank ``rank`` holds at its peak (in units of one
    micro-batch of all its stages): GPipe all ``m``; 1F1B ``pp - rank``; interleaved 1F1B
    ``(pp - rank) + (pp - 1) / v`` chunk-weighted (Narayanan et al. 2021, section 2.2)."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if v > 1:
        return min(float(m), (pp - rank) + (pp - 1) / v)
    return float(min(m, pp - rank))


def plan(cfg, world: int, hw: Hardware, assume: Assumptions = Assumptions()) -> Plan:
    """Plan run config ``cfg`` (a RunConfig) on ``world`` ranks; raises LayoutError."""
    from polytron.model.accounting import flops_per_token
    p, mc, tr = cfg.parallel, cfg.model, cfg.training
    seq = cfg.data.seq_len
    dims = ParallelDims.resolve(p, mc, world, seq)
    if tr.global_batch_size and tr.global_batch_size % (tr.micro_batch_size * dims.dp):
        raise LayoutError(f"training.global_batch_size={tr.global_batch_size} is not a multiple of "
                          f"micro_batch_size={tr.micro_batch_size} x data-parallel size {dims.dp}")
    m = max(1, (tr.global_batch_size or tr.micro_batch_size * dims.dp) // (tr.micro_batch_size * dims.dp))
    model = _meta_model(mc)
    tp, sp = dims.tp, p.sequence_parallel and dims.tp > 1
    width = 2 if _compute_dtype(cfg) == torch.bfloat16 else 4
    tokens = tr.micro_batch_size * seq // dims.cp           # tokens of one micro-batch on this rank
    fsdp = dims.dp_shard
    efsdp = dims.dp_shard // dims.ep_dp if dims.ep > 1 else fsdp
    stages = []
    for r, names in enumerate(_stage_split(model, dims, p.pipeline_split)):
        st = StagePlan(r, names)
        for unit, module in model.unit_modules():
            if unit.name not in names:
                continue
            local, gathered, expert = _param_elements(module, tp, _unit_role(unit.kind), fsdp, dims.ep, efsdp)
            st.params += local
            st.params_unsharded += gathered
            st.expert_params += expert
            act = (saved_elements(module, tp, sp) * tokens + saved_fixed(module, tp)) * width \
                + saved_fp32_elements(module, tp, sp) * tokens * (4 - width)
            if unit.kind == "embedding":
                act = tokens * 8.0                                  # the int64 token ids
            if unit.kind == "head":                                 # + fp32 logits the loss saves
                act += tokens * mc.vocab_size / tp * 4
            st.act_bytes_per_mb += act
            st.vocab_units += unit.kind in ("embedding", "head")
            st.embedding = st.embedding or unit.kind == "embedding"
            st.head = st.head or unit.kind == "head"
            if unit.kind == "block":
                st.blocks += 1
                st.block_act_bytes.append(act)
                st.moe_layers += bool(_expert_modules(module))
                st.last_block_dense = gathered - expert
            st.attn_layers += sum(1 for x in module.modules() if hasattr(x, "attention_flops"))
        stages.append(st)
    # activation checkpointing: a checkpointed block keeps its input (tokens x d) only
    policy = p.activation_checkpoint
    resid = tokens * mc.hidden_size * width / (tp if sp else 1)
    flights = [in_flight(p.pipeline_schedule, dims.pp, dims.virtual_stages, m, st.rank) for st in stages]
    acts = []
    for st, fl in zip(stages, flights):
        per_mb = st.act_bytes_per_mb
        peak_block = max(st.block_act_bytes, default=0.0)
        if policy != "none":
            ck = [i for i in range(len(st.block_act_bytes)) if policy == "full" or i % 2 == 0]
            per_mb -= sum(st.block_act_bytes[i] - resid for i in ck)
        extra = peak_block if policy != "none" else 0.0     # one block recomputed at a time
        acts.append(per_mb * fl + extra)
    # pick the rank with the largest total
    opt_fp8 = _fp8_extra(cfg, stages)
    totals = []
    for st, act in zip(stages, acts):
        weights = st.params * 4.0
        totals.append((weights * 4 + act + opt_fp8, st))      # fp32 weights, grads, Adam m and v
    total, worst = max(totals, key=lambda t: t[0])
    wi = stages.index(worst)
    weights = worst.params * 4.0
    by_stage = [communication(cfg, dims, st, m, tokens, width, assume) for st in stages]
    warmup = [pipeline_warmup(cfg, dims, st, tokens, width, assume) for st in stages]
    comm = by_stage[wi]
    with _NoFills():                 # model/accounting.py builds its own meta model once
        fpt = flops_per_token(mc, seq)
    compute_s, exposed, step_s, mfu = step_time(cfg, dims, hw, assume, m, comm, fpt)
    fits = total <= hw.memory_gb * 1e9
    reason = "" if fits else f"needs {total / 1e9:.1f} GB on pipeline rank {wi} > {hw.memory_gb:.0f} GB"
    return Plan(layout_name(dims, p), dims, stages, m, flights, weights, weights, 2 * weights, opt_fp8,
                acts[wi], total, comm, by_stage, warmup, step_s, compute_s, exposed, mfu, fits, reason)


_MODELS: dict[str, Transformer] = {}


def _meta_model(mc) -> Transformer:
    """The model of config ``mc`` on the meta device (built once per configuration)."""
    import dataclasses
    import json

    key = json.dumps(dataclasses.asdict(mc), sort_keys=True, default=str)
    if key not in _MODELS:
        with torch.device("meta"), _NoFills():
            _MODELS[key] = Transformer(mc)
    return _MODELS[key]


#: in-place random fills of parameter initialization (``nn.init``)
_FILLS = frozenset({"normal_", "uniform_", "trunc_normal_", "erfinv_", "bernoulli_", "exponential_"})
#: factories and element-wise math of buffer tables (RoPE) whose meta kernels are Python references
_RANGES = frozenset({"arange", "linspace", "logspace"})
_MATH = frozenset({"__truediv__", "__rtruediv__", "__rdiv__", "div", "true_divide", "__pow__", "__rpow__", "pow",
                   "__mul__", "__rmul__", "mul", "outer", "cos", "sin", "exp", "log", "reciprocal", "where",
                   "__add__", "__radd__", "add", "__sub__", "__rsub__", "sub", "cat", "stack"})
#: largest table (elements) computed on the CPU in place of the meta device
_CPU_TABLE = 1 << 24


class _NoFills(TorchFunctionMode):
    """Skips initialization's random fills of meta tensors (they have no values) and computes
    ranges and the element-wise math of buffer tables on the CPU from zeros: the meta kernels of
    these are Python references that import torch._dynamo, more than a second of a fresh
    planner process. Parameters are never touched; large tables stay on the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _FILLS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))    # nn.init passes tensor=
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        if name in _RANGES and kwargs.get("device") in (None, "meta", torch.device("meta")):
            return func(*args, **{**kwargs, "device": "cpu"}).to("meta")
        if name in _MATH and not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else [x])]
            metas = [a for a in flat if isinstance(a, torch.Tensor) and a.is_meta]
            if metas and not any(isinstance(a, nn.Parameter) for a in flat) \
                    and sum(a.numel() for a in metas) <= _CPU_TABLE:
                def cpu(x):
                    if isinstance(x, (list, tuple)):
                        return type(x)(cpu(a) for a in x)
                    return torch.zeros(x.shape, dtype=x.dtype, device="cpu") if isinstance(x, torch.Tensor) else x
                return func(*(cpu(a) for a in args), **kwargs).to("meta")
        return func(*args, **kwargs)


def _compute_dtype(cfg) -> torch.dtype:
    d = cfg.precision.dtype
    if d == "auto":
        return torch.float32 if cfg.training.device == "cpu" else torch.bfloat16
    return torch.bfloat16 if d == "bf16" else torch.float32


def _fp8_extra(cfg, stages: list[StagePlan]) -> float:
    """FP8 extras: Transformer Engine keeps amax histories (small); torchao tensorwise keeps
    nothing persistent. Both hold an FP8 copy of each weight during its matmul (transient)."""
    return 0.0


def layout_name(dims: ParallelDims, p) -> str:
    parts = [f"{k}{v}" for k, v in (("tp", dims.tp), ("cp", dims.cp), ("pp", dims.pp), ("ep", dims.ep),
                                    ("hsdp", dims.dp_replicate), ("fsdp", dims.dp_shard)) if v > 1]
    if dims.virtual_stages > 1:
        parts.append(f"v{dims.virtual_stages}")
    if p.activation_checkpoint != "none":
        parts.append(f"ac-{p.activation_checkpoint}")
    return "_".join(parts) or "single"


# ---------------------------------------------------------------- communication

def communication(cfg, dims: ParallelDims, st: StagePlan, m: int, tokens: int, width: int,
                  assume: Assumptions = Assumptions()) -> dict[tuple[str, str], float]:
    """Payload bytes per step on rank ``st`` (the full tensor each collective produces or
    consumes: an all-gather's output, a reduce-scatter's input, an all-to-all's input, a
    send's tensor), by (kind, mesh dimension)."""
    p, mc = cfg.parallel, cfg.model
    h = mc.hidden_size
    out: dict[tuple[str, str], float] = {}

    def add(kind: str, dim: str, n: float) -> None:
        if n:
            out[(kind, dim)] = out.get((kind, dim), 0.0) + n

    act = tokens * h * width                                    # one (b, s/cp, d) hidden state
    sp = p.sequence_parallel
    if dims.tp > 1:
        # per block: attention and MLP inputs gathered and outputs reduce-scattered forward, the
        # mirror backward; the embedding's output and the head's input once each way (a pipeline
        # border sends the sequence shard as it is: no TP collective)
        n = (4 * st.blocks + st.vocab_units) * m * act
        if sp:
            add("all_gather", "tp", n)
            add("reduce_scatter", "tp", n)
        else:
            add("all_reduce", "tp", n)
    if dims.pp > 1:      # hidden state (sequence-sharded under SP) forward, its gradient backward
        carry = act / (dims.tp if sp and dims.tp > 1 else 1)
        sends = (2 * dims.virtual_stages - (st.rank == 0) - (st.rank == dims.pp - 1)) * m
        add("send", "pp", sends * carry)
    if dims.dp_shard > 1:
        reshard = {"auto": dims.pp == 1, "always": True, "never": False}[p.fsdp_reshard_after_forward]
        dense = st.params_unsharded - st.expert_params
        gathers = m * (2 if reshard else 1)
        # resharded after forward, every unit is gathered again for backward except the last
        # block, which FSDP keeps (parallel/fsdp.py)
        add("all_gather", "dp_shard", m * (dense + (dense - st.last_block_dense if reshard else 0)) * width)
        rd = 4 if p.fsdp_reduce_dtype == "fp32" else width
        add("reduce_scatter", "dp_shard", dense * rd)
        efsdp = dims.dp_shard // dims.ep_dp if dims.ep > 1 else dims.dp_shard
        if st.expert_params and efsdp > 1:
            add("all_gather", "efsdp", gathers * st.expert_params * width)
            add("reduce_scatter", "efsdp", st.expert_params * rd)
    if dims.dp_replicate > 1:
        add("all_reduce", "dp_replicate", st.params * 4.0)
    if dims.ep > 1 and st.moe_layers:
        counts, rows = _expert_exchange(mc, tokens, width, assume)
        add("all_to_all", "ep", st.moe_layers * m * (counts + 2 * rows))
    if dims.cp > 1:
        kv = 2 * mc.num_kv_heads * mc.head_dim * tokens * width
        if p.context_kind == "ring":     # cp-1 K/V passes forward; K/V and dK/dV passes backward
            add("send", "cp", 3 * (dims.cp - 1) * st.attn_layers * m * kv)
        else:
            add("all_gather", "cp", st.attn_layers * m * kv * dims.cp)
            add("reduce_scatter", "cp", st.attn_layers * m * kv * dims.cp)
    return out


def _expert_exchange(mc, tokens: int, width: int, a: Assumptions) -> tuple[float, float]:
    """All-to-all payloads of one MoE layer's forward on one micro-batch (parallel/expert_parallel.py):
    (the int64 per-expert counts, the rows: the kept rows sent to the experts' ranks, ``kept k s b h``,
    plus the outputs of the rows this rank's experts received, ``load k s b h``, sent back).
    Backward exchanges the rows' gradients the same way reversed (no counts)."""
    moe = getattr(mc, "moe", None)
    k, experts = getattr(moe, "top_k", 1), getattr(moe, "num_experts", 0)
    return experts * 8.0, (a.expert_kept + a.expert_load) * k * tokens * mc.hidden_size * width


def pipeline_warmup(cfg, dims: ParallelDims, st: StagePlan, tokens: int, width: int,
                    assume: Assumptions = Assumptions()) -> dict[tuple[str, str], float]:
    """Bytes a pipeline run moves once, in its first step: the schedule learns the shapes each
    stage sends by running every stage forward once on a real micro-batch, and the last stage
    backward once (torch.distributed.pipelining's metadata inference); their TP and EP
    collectives are real. (FSDP's gathers in it are not modelled.)"""
    if dims.pp == 1:
        return {}
    out: dict[tuple[str, str], float] = {}

    def add(kind: str, dim: str, n: float) -> None:
        if n:
            out[(kind, dim)] = out.get((kind, dim), 0.0) + n
    last = st.rank == dims.pp - 1
    back_blocks = st.blocks / dims.virtual_stages if last else 0     # the last stage's blocks
    if dims.tp > 1:
        act = tokens * cfg.model.hidden_size * width
        b = 2 * st.blocks                       # forward: attention and MLP, one of each kind
        bb = 2 * back_blocks
        if cfg.parallel.sequence_parallel:
            add("all_gather", "tp", (b + st.head + bb + (st.embedding and last)) * act)
            add("reduce_scatter", "tp", (b + st.embedding + bb + (st.head and last)) * act)
        else:
            add("all_reduce", "tp", (b + st.embedding + bb + (st.head and last)) * act)
    if dims.ep > 1 and st.moe_layers:
        counts, rows = _expert_exchange(cfg.model, tokens, width, assume)
        back_moe = st.moe_layers / dims.virtual_stages if last else 0
        add("all_to_all", "ep", st.moe_layers * (counts + rows) + back_moe * rows)
    return out


#: mesh dims in rank order, innermost last (parallel/mesh.py)
_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def _bandwidth(dims: ParallelDims, dim: str, hw: Hardware) -> float:
    """Bytes/s of a collective over ``dim``: NVLink when its group stays inside a node."""
    sizes = {"pp": dims.pp, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard,
             "cp": dims.cp, "tp": dims.tp}
    base = {"efsdp": "dp_shard", "ep": "dp_shard"}.get(dim, dim)
    span = 1
    for d in reversed(_ORDER):
        span *= sizes[d]
        if d == base:
            break
    rate = hw.nvlink_gbs if span <= hw.gpus_per_node else hw.ib_gbs
    return rate * 1e9


def _group(dims: ParallelDims, dim: str) -> int:
    return {"tp": dims.tp, "pp": 2, "cp": dims.cp, "dp_shard": dims.dp_shard, "ep": dims.ep,
            "efsdp": max(1, dims.dp_shard // max(1, dims.ep_dp)), "dp_replicate": dims.dp_replicate}[dim]


def step_time(cfg, dims: ParallelDims, hw: Hardware, a: Assumptions, m: int,
              comm: dict[tuple[str, str], float], fpt: float) -> tuple[float, float, float, float]:
    """(compute s, exposed communication s, step s, MFU). Wire bytes per rank: an all-gather
    or reduce-scatter sends (n-1)/n of its payload, an all-reduce twice that, a send all of it."""
    p, tr = cfg.parallel, cfg.training
    tokens_step = (tr.global_batch_size or tr.micro_batch_size * dims.dp) * cfg.data.seq_len
    flops_rank = fpt * tokens_step / dims.world_size
    fp8 = cfg.precision.fp8.enabled
    peak = (hw.fp8_tflops if fp8 else hw.bf16_tflops) * 1e12
    recompute = {"none": 0.0, "selective": 1 / 6, "full": 1 / 3}[p.activation_checkpoint]
    compute = flops_rank * (1 + recompute) / (peak * a.matmul_efficiency)
    bubble = (dims.pp - 1) / (m * dims.virtual_stages)          # the same for GPipe and 1F1B
    from polytron.model.accounting import counts
    # the attention score work a ring pass can hide behind (the rest of a step cannot: the
    # next block needs the attention output)
    attention_s = counts(cfg.model).attention_flops_per_pos * cfg.data.seq_len * tokens_step \
        / dims.world_size / (peak * a.matmul_efficiency)
    exposed = hidden = 0.0
    for (kind, dim), payload in comm.items():
        n = _group(dims, dim)
        wire = payload * (1.0 if kind == "send" else (n - 1) / n * (2 if kind == "all_reduce" else 1))
        t = wire / _bandwidth(dims, dim, hw)
        if dim in ("dp_shard", "efsdp", "dp_replicate") and a.overlap_fsdp:
            hidden += t
        elif dim == "cp" and kind == "send" and a.overlap_ring:
            exposed += max(0.0, t - attention_s)
        else:
            exposed += t
    step = (compute + exposed) * (1 + bubble)
    step = max(step, hidden)
    mfu = fpt * tokens_step / dims.world_size / step / peak
    return compute, exposed, step, mfu


# ---------------------------------------------------------------- search

def candidates(world: int, cfg) -> list[dict[str, int]]:
    """Degree combinations (tp, cp, pp, ep, virtual stages) whose product divides ``world``."""
    divs = [d for d in range(1, world + 1) if world % d == 0]
    experts = getattr(getattr(cfg.model, "moe", None), "num_experts", 0) if cfg.model.arch == "moe" else 0
    out = []
    for tp in (d for d in divs if d <= 8):
        for cp in divs:
            for pp in divs:
                if world % (tp * cp * pp):
                    continue
                shard = world // (tp * cp * pp)
                for ep in ([d for d in divs if experts and d <= experts] or [1]):
                    out.append(dict(tensor=tp, context=cp, pipeline=pp, expert=ep,
                                    data_parallel_shard=shard, data_parallel_replicate=1))
    return out


def search(cfg, world: int, hw: Hardware, assume: Assumptions = Assumptions()) -> list[tuple[Optional[Plan], str, str]]:
    """Every candidate layout: (plan or None, layout text, refusal reason)."""
    rows: list[tuple[Optional[Plan], str, str]] = []
    for degrees in candidates(world, cfg):
        c = copy.deepcopy(cfg)
        for k, v in degrees.items():
            setattr(c.parallel, k, v)
        c.parallel.virtual_stages = 1
        c.parallel.pipeline_split = []
        text = " ".join(f"{k}={v}" for k, v in degrees.items())
        try:
            rows.append((plan(c, world, hw, assume), text, ""))
        except LayoutError as e:
            rows.append((None, text, str(e)))
    return rows
