#!/usr/bin/env python
"""Mixture-of-experts benchmarks (docs/benchmarks.md, "MoE / MH-MoE"), in one run:

1. **Layer throughput** (one process): forward + backward tokens/s of one MoE layer
   (model/moe) against a dense SwiGLU of the same *activated* parameters (inner width
   ``top_k x expert_ffn``), for each expert-matmul backend: ``grouped`` (torch
   ``grouped_mm``), ``batched`` (padded ``bmm``) and ``looped`` (one matmul per expert);
   and of the MH-MoE layer (``--heads``) with the grouped backend. Measurements
   alternate between the variants ``--repeats`` times; each reports its median.
2. **All-to-all share under EP2** (two gloo processes): the time spent in the expert
   exchange (count exchange, host read of the splits, row all-to-alls in forward and
   backward) as a share of the training step's wall time, for a small MoE decoder
   (the trainer's engine and step: ``build_engine`` + ``TrainStep``), and the step time
   of the same model under plain FSDP2 for reference.

Usage::

    python tools/bench_moe.py [--tokens 4096] [--hidden 512] [--experts 8] [--top-k 2]
                              [--expert-ffn 512] [--heads 4] [--repeats 5] [--steps 4]
                              [--skip-ep] [--json out.json]

Threads: the layer benchmark uses ``torch.get_num_threads()`` (set OMP_NUM_THREADS); each
EP2 process uses one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import torch

from polytron.tools.cli import command

#: An expert GEMM kind (``MoEConfig.gemm``).
Gemm = Literal["auto", "grouped", "batched", "looped"]
#: The expert GEMMs timed against each other.
GEMMS: tuple[Gemm, ...] = ("grouped", "batched", "looped")


def layer_config(args, mlp: str = "moe", heads: int = 1, gemm: Gemm = "grouped"):
    """One-layer model whose MLP is ``mlp``; the dense SwiGLU has top_k x expert_ffn inner width."""
    from polytron.model.config import ModelConfig
    from polytron.model.moe.config import MoEConfig
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_ffn_hidden_size=args.expert_ffn,
                    heads=heads, gemm=gemm, aux_loss_coeff=0.01, log_expert_load=False)
    cfg = ModelConfig(arch="moe" if mlp != "swiglu" else "llama", mlp=mlp, moe=moe, vocab_size=128,
                      hidden_size=args.hidden, num_layers=1, num_heads=8,
                      ffn_hidden_size=args.top_k * args.expert_ffn)
    cfg.validate()
    return cfg


def build_layer(cfg) -> torch.nn.Module:
    """The MLP of a one-layer model built and initialized like any model (model.transformer)."""
    from polytron.model.transformer import build_model
    model = build_model(cfg, seed=0)
    assert model.layers is not None                       # an unsplit model holds every layer
    mlp = model.layers["0"].mlp
    assert isinstance(mlp, torch.nn.Module)
    return mlp


def timed(fn: Callable[[], None], iters: int) -> float:
    fn()                                                   # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def layer_bench(args) -> dict[str, dict[str, float]]:
    from polytron.model.hooks import StatsCollector, step_scope
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(0))
    variants: dict[str, torch.nn.Module] = {
        "dense SwiGLU (same activated params)": build_layer(layer_config(args, "swiglu"))}
    for gemm in GEMMS:
        variants[f"MoE, {gemm} experts"] = build_layer(layer_config(args, gemm=gemm))
    if args.heads > 1:
        variants[f"MH-MoE h={args.heads}, grouped"] = build_layer(layer_config(args, "mh_moe", args.heads))

    def step(layer):
        def run():
            with step_scope(aux_scale=1.0, stats=StatsCollector()):
                layer(x.view(1, args.tokens, args.hidden)).float().square().mean().backward()
        return run
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):                          # alternate, so machine drift hits all alike
        for name, layer in variants.items():
            times[name].append(timed(step(layer), args.iters))
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"ms": 1000 * med, "tokens_per_s": args.tokens / med}
    return out


# ---------------------------------------------------------------- EP2

def _ep_worker(rank: int, port: int, args, queue) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue.put((rank, {name: _ep_run(args, ep) for name, ep in (("fsdp2", 1), ("ep2", 2))}))
    finally:
        dist.destroy_process_group()


def _ep_run(args, ep: int) -> dict:
    import polytron.parallel.expert_parallel as xp
    from polytron.model.config import ModelConfig
    from polytron.model.moe.config import MoEConfig
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
    from polytron.pretrain.optim import build_optimizer
    from polytron.pretrain.step import TrainStep
    cfg = ModelConfig(arch="moe", mlp="moe", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8,
                      num_kv_heads=4, ffn_hidden_size=704, max_seq_len=256,
                      moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=176, shared_experts=1,
                                    log_expert_load=False))
    cfg.validate()
    pcfg = ParallelConfig(expert=ep)
    dims = ParallelDims.resolve(pcfg, cfg, 2)
    mesh = dims.build_mesh("cpu")
    engine = build_engine(cfg, pcfg, dims, mesh, torch.device("cpu"), torch.float32, 0)
    opt_cfg = OptimizerConfig()
    step = TrainStep(engine, build_optimizer(engine.model_parts, opt_cfg), opt_cfg,
                     ScheduleConfig(kind="constant", warmup_iters=0), 100)
    spent = [0.0]
    exchange, splits = xp._exchange, xp.ExpertDispatch.splits

    def timed_exchange(*a, **k):
        t = time.perf_counter()
        try:
            return exchange(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    def timed_splits(self, counts):
        t = time.perf_counter()
        try:
            return splits(self, counts)
        finally:
            spent[0] += time.perf_counter() - t
    gen = torch.Generator().manual_seed(1 + dist_rank())
    batches = [[{"tokens": (s := torch.randint(0, 4096, (4, 257), generator=gen))[:, :-1], "labels": s[:, 1:]}]
               for _ in range(args.steps + 1)]
    with replaced(xp, "_exchange", timed_exchange), replaced(xp.ExpertDispatch, "splits", timed_splits):
        step(batches[0], 0)                              # warm-up
        spent[0] = 0.0
        start = time.perf_counter()
        for i, mb in enumerate(batches[1:]):
            step(mb, i + 1)
        total = time.perf_counter() - start
    return {"step_ms": 1000 * total / args.steps, "exchange_ms": 1000 * spent[0] / args.steps,
            "exchange_share": spent[0] / total}


@contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.<name>`` is ``value`` inside the block (the timing wrappers), restored after."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def dist_rank() -> int:
    import torch.distributed as dist
    return dist.get_rank()


def ep_bench(args) -> dict[str, dict[str, float]]:
    import torch.multiprocessing as mp

    from polytron.launch.env import free_port
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ep_worker, args=(r, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join(60)
    return results[0]


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--iters", type=int, default=3, help="timed forward+backward passes per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed training steps under EP2 / FSDP2")
    p.add_argument("--skip-ep", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    layer = layer_bench(args)
    result: dict[str, object] = {"threads": torch.get_num_threads(), "args": vars(args), "layer": layer}
    print(f"MoE layer, {args.tokens} tokens x d={args.hidden}, {args.experts} experts top-{args.top_k} of "
          f"ffn {args.expert_ffn} ({result['threads']} threads), forward + backward:")
    dense = layer["dense SwiGLU (same activated params)"]["tokens_per_s"]
    for name, r in layer.items():
        print(f"  {name:<40} {r['ms']:8.1f} ms  {r['tokens_per_s']:9.0f} tokens/s  "
              f"{r['tokens_per_s'] / dense:5.2f}x dense")
    if not args.skip_ep:
        result["ep"] = ep = ep_bench(args)
        for name, r in ep.items():
            print(f"{name}: step {r['step_ms']:.0f} ms, expert exchange {r['exchange_ms']:.0f} ms "
                  f"({100 * r['exchange_share']:.1f}% of the step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
