"""The planner (parallel/plan.py, tools/plan.py) against measurement.

Activations: saved tensors of one micro-batch's forward and loss (saved_tensors_hooks, each
storage once, parameters and buffers excluded) within 5% of the plan, in fp32 and with the
model in bf16 (FSDP's mixed precision: 16-bit parameters, no autocast). Parameters and
optimizer state: the local tensor sizes of each rank under TP2, PP2, FSDP2 and EP2, exact.
Collectives: FSDP's all-gathers and reduce-scatters of one training step counted by wrapping
the torch.distributed functions FSDP2 calls, exact.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from polytron.model.transformer import build_model, cross_entropy
from polytron.parallel.plan import PROFILES, Assumptions, plan
from polytron.pretrain.config import RunConfig
from tests.distributed.equivalence import GLOBAL_BATCH, MICRO, SEQ, model_config
from tests.distributed.harness import Call, run_batch
from tests.distributed.layouts_moe import MOE
from tests.distributed.layouts_yoco import SWA

ARCHS = {"dense": {}, "dha": {"arch": "dha"}, "moe": MOE, "yoco": SWA, "bitnet": {"arch": "bitnet"}}


def run_config(model: dict, parallel: dict) -> RunConfig:
    rc = RunConfig()
    rc.model = model_config(**model)
    for k, v in parallel.items():
        setattr(rc.parallel, k, v)
    rc.data.seq_len, rc.training.device = SEQ, "cpu"
    rc.training.micro_batch_size, rc.training.global_batch_size = MICRO, GLOBAL_BATCH
    return rc


_MODELS: dict[str, torch.nn.Module] = {}


def measured_activation_bytes(model_overrides: dict, dtype: torch.dtype = torch.float32) -> int:
    key = repr(model_overrides)
    if key not in _MODELS:          # one build per architecture, shared by both dtypes
        _MODELS[key] = build_model(model_config(**model_overrides))
    model = _MODELS[key] if dtype == torch.float32 else copy.deepcopy(_MODELS[key]).to(dtype)
    keep = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in keep:
            saved[s.data_ptr()] = s.nbytes()
        return t
    tokens = torch.randint(0, 128, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    return sum(saved.values())


#: BitNet's other blocks: the paper's BitLinear with its inner norm, the FAQ block without
#: pre-norms, the 2B4T sub-norm slots, a quantized head, only some roles quantized
BITNET_VARIANTS = {
    "bitnet_linear_norm": {"arch": "bitnet", "bitnet": {"linear_norm": True}},
    "bitnet_faq_block": {"arch": "bitnet", "bitnet": {"linear_norm": True, "block_prenorm": False}},
    "bitnet_2b4t": {"arch": "bitnet", "attention": "gqa_subnorm", "mlp": "relu2_subnorm"},
    "bitnet_head": {"arch": "bitnet", "bitnet": {"quantize": ["q", "k", "v", "o", "gate", "up", "down", "head"]}},
    "bitnet_partial": {"arch": "bitnet", "bitnet": {"quantize": ["q", "o", "up"]}},
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", [*ARCHS, *BITNET_VARIANTS])
def test_activations_within_5_percent(arch, dtype):
    """In bf16 the norms, the router and BitLinear's scales keep fp32 tensors (saved_fp32_elements)."""
    model = {**ARCHS, **BITNET_VARIANTS}[arch]
    rc = run_config(model, {})
    rc.precision.dtype = dtype
    planned = plan(rc, 1, PROFILES["h100-80gb"]).act_bytes
    measured = measured_activation_bytes(model, torch.bfloat16 if dtype == "bf16" else torch.float32)
    assert abs(planned / measured - 1) < 0.05, (arch, dtype, planned, measured)


COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")


class FunctionalCollectives(TorchDispatchMode):
    """Payload bytes of the functional collectives DTensor issues (tensor parallelism):
    an all-gather's output, a reduce-scatter's and an all-reduce's input."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in COLLECTIVES:
            t = out if name.startswith("all_gather") else args[0]
            kind = name.replace("_into_tensor", "").replace("_tensor", "").replace("_coalesced", "")
            self.bytes[kind] = self.bytes.get(kind, 0) + t.numel() * t.element_size()
        return out


def _measure_rank(model: dict, parallel: dict) -> dict:
    """Worker: build the engine of this layout, count FSDP collectives over one training step,
    return local parameter, optimizer-state and collective bytes."""
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
    from polytron.pretrain.optim import build_optimizer
    from polytron.pretrain.step import TrainStep
    from tests.distributed.equivalence import global_batch, microbatches
    mcfg, pcfg = model_config(**model), ParallelConfig(**parallel)
    world = dist.get_world_size()
    dims = ParallelDims.resolve(pcfg, mcfg, world)
    mesh = dims.build_mesh("cpu")
    engine = build_engine(mcfg, pcfg, dims, mesh, torch.device("cpu"), torch.float32, 0)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    seen: set[int] = set()
    params = 0
    for part in engine.model_parts:
        for p in part.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += local(p).numel()
    opt_cfg = OptimizerConfig()
    optim = build_optimizer(engine.model_parts, opt_cfg)
    step = TrainStep(engine, optim, opt_cfg, ScheduleConfig(kind="constant", warmup_iters=0), 1)
    steps: list[dict[str, int]] = []       # per training step: bytes (or rows) by key

    def add(key: str, n: int) -> None:
        steps[-1][key] = steps[-1].get(key, 0) + n
    originals = {n: getattr(dist, n) for n in ("all_gather_single", "reduce_scatter_single", "all_to_all_single")}

    def ag(output, input, *a, **k):
        add("all_gather", output.numel() * output.element_size())
        return originals["all_gather_single"](output, input, *a, **k)

    def rs(output, input, *a, **k):
        add("reduce_scatter", input.numel() * input.element_size())
        return originals["reduce_scatter_single"](output, input, *a, **k)

    def a2a(output, input, *a, **k):
        """Expert parallelism: its bytes, and the rows sent and received read off the counts."""
        work = originals["all_to_all_single"](output, input, *a, **k)
        add("all_to_all", input.numel() * input.element_size())
        if input.dtype == torch.int64:           # the per-expert counts exchange
            add("rows_sent", int(input.sum()))
            add("rows_received", int(output.sum()))
        return work
    import torch.distributed.pipelining.schedules as schedules
    batch_p2p = schedules._batch_p2p

    def sends(ops, *a, **k):
        add("send", sum(o.tensor.numel() * o.tensor.element_size() for o in ops if o.op is dist.isend))
        return batch_p2p(ops, *a, **k)
    patches = [(dist, "all_gather_single", ag), (dist, "reduce_scatter_single", rs),
               (dist, "all_to_all_single", a2a), (schedules, "_batch_p2p", sends)]
    saved = [(mod, n, getattr(mod, n)) for mod, n, _ in patches]
    for mod, n, fn in patches:
        setattr(mod, n, fn)
    try:
        dp_rank = mesh["dp"].get_local_rank()
        for i in range(2):       # the first step (a pipeline's warm-up on top) and a steady one
            steps.append({})
            with FunctionalCollectives() as tp_counts:
                step(microbatches(global_batch(i, "plain", mcfg.vocab_size), dp_rank, dims.dp), i)
            steps[-1].update({f"tp_{k}": v for k, v in tp_counts.bytes.items()})
    finally:
        for mod, n, fn in saved:
            setattr(mod, n, fn)
    optim_bytes = sum(local(v).numel() * local(v).element_size()
                      for o in getattr(optim, "optimizers", [optim]) for s in o.state.values()
                      for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    pp_rank = mesh["pp"].get_local_rank()
    return {"params": params, "optim": optim_bytes, "pp_rank": pp_rank, "steps": steps}


LAYOUTS: dict[str, tuple[dict, dict]] = {
    "dense_tp2": ({}, {"tensor": 2}),
    "dense_pp2": ({}, {"pipeline": 2}),
    "dense_fsdp2": ({}, {}),
    "moe_ep2": (MOE, {"expert": 2}),
    "dha_tp2": (ARCHS["dha"], {"tensor": 2}),
    "yoco_fsdp2": (SWA, {}),
    "bitnet_pp2": (ARCHS["bitnet"], {"pipeline": 2}),
}
#: composed layouts on 4 ranks
COMPOSED: dict[str, tuple[dict, dict]] = {
    "dense_tp2_pp2": ({}, {"tensor": 2, "pipeline": 2}),
}


@pytest.fixture(scope="module")
def measured():
    """Per-rank measurements of every layout: one spawn per world size."""
    results = {}
    for world, layouts in ((2, LAYOUTS), (4, COMPOSED)):
        batch = run_batch([Call(n, _measure_rank, layout, budget_s=60) for n, layout in layouts.items()], world)
        results.update({n: (world, batch) for n in layouts})
    return results


def measured_routing(got: dict, pl, moe: dict) -> Assumptions:
    """The routing balance a rank saw (rows sent and received, read off the per-expert counts it
    exchanged), as the planner's expert_kept / expert_load: shares of the uniform ``k s b``."""
    calls = pl.stages[got["pp_rank"]].moe_layers * pl.micro_batches * 2     # both steps
    uniform = calls * moe["top_k"] * MICRO * SEQ
    sent = sum(s.get("rows_sent", 0) for s in got["steps"])
    received = sum(s.get("rows_received", 0) for s in got["steps"])
    return Assumptions(expert_kept=sent / uniform, expert_load=received / uniform)


@pytest.mark.parametrize("name", [*LAYOUTS, *COMPOSED])
def test_parameters_optimizer_and_collectives_exact(measured, name):
    """Each rank's bytes per collective kind, both of the first step (plus a pipeline's warm-up)
    and of a steady step, equal the plan; EP all-to-all at the rank's measured routing balance."""
    model, parallel = {**LAYOUTS, **COMPOSED}[name]
    world, batch = measured[name]
    rc = run_config(model, parallel)
    pl = plan(rc, world, PROFILES["h100-80gb"])
    for rank, got in enumerate(batch.get(name)):
        r = got["pp_rank"]
        stage = pl.stages[r]
        if rank == 0:      # FSDP pads the first dimension: rank 0 holds the larger shard
            assert got["params"] == stage.params, (name, rank, got, stage.params)
            assert got["optim"] == 2 * 4 * stage.params, (name, rank, got)
        if pl.dims.ep > 1:
            routed = plan(rc, world, PROFILES["h100-80gb"], measured_routing(got, pl, model["moe"]))
            for step in got["steps"]:         # equal in both steps: the routing differs a little
                assert step["rows_sent"] + step["rows_received"] > 0, (name, rank, step)
            both = sum(s["all_to_all"] for s in got["steps"])
            assert both == pytest.approx(2 * routed.comm_by_stage[r][("all_to_all", "ep")], rel=1e-12), \
                (name, rank, got["steps"], routed.comm_by_stage[r])
        for i, step in enumerate(got["steps"]):
            for kind, dim in [("all_gather", "dp_shard"), ("reduce_scatter", "dp_shard"), ("send", "pp"),
                              ("all_gather", "tp"), ("reduce_scatter", "tp"), ("all_reduce", "tp")]:
                key = kind if dim != "tp" else f"tp_{kind}"
                if dim == "dp_shard" and pl.dims.ep > 1 and pl.dims.dp_shard // pl.dims.ep_dp > 1:
                    continue     # expert FSDP (efsdp) gathers are counted under their own key
                want = pl.comm_by_stage[r].get((kind, dim), 0)
                if i == 0:
                    want += pl.warmup_by_stage[r].get((kind, dim), 0)
                assert step.get(key, 0) == want, (name, rank, i, kind, dim, step.get(key), pl.comm_by_stage[r])


def test_cli_every_launch_config_under_2_seconds(capsys):
    """The issue's command on every launch config as it is (its global batch fitted to 8 ranks
    when needed), in process: the plan's own CPU time under 2 s (a fresh process adds the
    torch import, docs/scaling.md)."""
    import glob
    import time

    from polytron.tools.plan import run
    paths = sorted(glob.glob("launch/configs/*.yaml"))
    assert len(paths) >= 15, paths
    for path in paths:          # a data-mixture config (tools/build_mixture.py) plans its run_config
        start = time.process_time()
        status = run([path, "--world", "8"])
        elapsed = time.process_time() - start
        out = capsys.readouterr().out
        assert status == 0 and "total per rank" in out and "MFU" in out, (path, out)
        assert elapsed < 2.0, (path, elapsed)
    assert run(["launch/configs/moe-tiny.yaml", "--world", "8", "--search", "training.global_batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "ep2" in out and "does not fit / refused" in out and "stages but model.num_layers=4" in out, out


def test_cli_bad_input_one_line():
    def fails(*argv: str) -> str:
        out = subprocess.run([sys.executable, "tools/plan.py", "launch/configs/tiny.yaml", *argv],
                             capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1, out
        return out.stderr
    assert "unknown hardware profile" in fails("--world", "8", "--gpu", "a100")
    assert "no layout" in fails("--world", "7", "--search")
    assert "does not divide the world size 7" in fails("--world", "7", "parallel.tensor=2")
    assert "--efficiency nan: must be a finite number in (0, 1]" in fails("--world", "8", "--efficiency", "nan")
    assert "--world 0 / --top 10: need positive numbers" in fails("--world", "0")
