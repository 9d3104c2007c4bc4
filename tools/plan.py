#!/usr/bin/env python
"""Plan a cluster run: per-rank memory, communication per step and step time, before renting it.

    python tools/plan.py launch/configs/fp8-1b.yaml --world 8 --gpu h100-80gb
    python tools/plan.py launch/configs/tiny.yaml parallel.tensor=2 --world 8
    python tools/plan.py launch/configs/moe-tiny.yaml --world 16 --search

The config loads as launch/pretrain.py loads it (trailing ``section.key=value`` overrides);
a data-mixture config (tools/build_mixture.py) plans the run config it names (``run_config``).
One layout: its table. ``--search``: every layout of ``--world`` ranks (tensor x context x
pipeline x expert, the rest FSDP), fastest first, and the refused ones with their reason.
The model, formulas and assumptions: parallel/plan.py, docs/scaling.md. Bad input is one
``error:`` line (exit 2).
"""
from __future__ import annotations

import argparse
import sys

from polytron.tools.cli import command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="plan memory, communication and step time of a layout")
    p.add_argument("config", help="YAML run config (launch/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--world", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu", default="h100-80gb", help="hardware profile (h100-80gb, h200-141gb)")
    p.add_argument("--search", action="store_true", help="rank every valid layout of --world ranks")
    p.add_argument("--top", type=int, default=10, help="with --search: fitting layouts shown")
    p.add_argument("--efficiency", type=float, default=None, help="achieved/peak matmul rate (0.75)")
    p.add_argument("--expert-load", type=float, default=1.0,
                   help="rows the busiest rank's experts receive / the uniform share (1: uniform routing)")
    p.add_argument("--expert-kept", type=float, default=1.0,
                   help="share of routed rows kept after capacity (1 - the dropped share)")
    p.add_argument("--memory-gb", type=float, default=None, help="override the profile's memory")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    p.add_argument("--nvlink-gbs", type=float, default=None, help="override NVLink GB/s per GPU")
    p.add_argument("--ib-gbs", type=float, default=None, help="override InfiniBand GB/s per GPU")
    p.add_argument("--device", default="cuda", help="training.device assumed (bf16 on cuda)")
    return p.parse_intermixed_args(argv)


def _gb(x: float) -> str:
    return f"{x / 1e9:8.2f} GB"


def show(pl, hw) -> None:
    d = pl.dims
    print(f"layout {pl.layout}: {d.describe()}, {pl.micro_batches} micro-batches/step, {hw.name}")
    print(f"  weights (fp32 master)     {_gb(pl.weights_bytes)}")
    print(f"  gradients (fp32)          {_gb(pl.grads_bytes)}")
    print(f"  optimizer (Adam m, v)     {_gb(pl.optim_bytes)}")
    if pl.fp8_bytes:
        print(f"  fp8 extras                {_gb(pl.fp8_bytes)}")
    fl = max(pl.in_flight)
    print(f"  activations               {_gb(pl.act_bytes)}  ({fl:g} micro-batches in flight on pp rank 0)")
    print(f"  total per rank            {_gb(pl.total_bytes)}  of {hw.memory_gb:.0f} GB"
          + ("" if pl.fits else "  DOES NOT FIT"))
    for st in pl.stages if d.pp > 1 else []:
        print(f"    pp rank {st.rank}: {st.blocks} blocks, {st.params / 1e6:.1f}M parameters")
    print("  communication per step per rank (payload):")
    for (kind, dim), n in sorted(pl.comm.items()):
        print(f"    {kind:15s} over {dim:12s} {_gb(n)}")
    if not pl.comm:
        print("    none")
    rank = next(i for i, c in enumerate(pl.comm_by_stage) if c is pl.comm)       # the rank shown
    warmup = pl.warmup_by_stage[rank]
    if warmup:
        print("  once more in the first step (the pipeline schedule's shape inference):")
    for (kind, dim), n in sorted(warmup.items()):
        print(f"    {kind:15s} over {dim:12s} {_gb(n)}")
    print(f"  step {pl.step_s * 1e3:.1f} ms (compute {pl.compute_s * 1e3:.1f} ms, exposed comm "
          f"{pl.exposed_comm_s * 1e3:.1f} ms), MFU {pl.mfu * 100:.1f}%")


def fit_global_batch(cfg, world: int) -> None:
    """A config's global batch is set for its own world size: when ``micro_batch_size x dp``
    of this layout does not divide it, plan the nearest multiple above (said in one line)."""
    from polytron.parallel.mesh import ParallelDims
    tr = cfg.training
    dims = ParallelDims.resolve(cfg.parallel, cfg.model, world, cfg.data.seq_len)
    unit = tr.micro_batch_size * dims.dp
    if tr.global_batch_size and tr.global_batch_size % unit:
        fitted = -(-tr.global_batch_size // unit) * unit
        print(f"note: training.global_batch_size={tr.global_batch_size} is not a multiple of micro_batch_size="
              f"{tr.micro_batch_size} x data-parallel size {dims.dp}: planning {fitted} "
              "(set training.global_batch_size to choose)")
        tr.global_batch_size = fitted


#: The numeric options and the open/closed range each must lie in (finite, checked before planning).
RANGES = {"efficiency": (0.0, 1.0), "expert_load": (0.0, None), "expert_kept": (0.0, 1.0), "memory_gb": (0.0, None),
          "peak_tflops": (0.0, None), "nvlink_gbs": (0.0, None), "ib_gbs": (0.0, None)}


def check_numbers(args: argparse.Namespace) -> None:
    """One ConfigError line for the first numeric option that is not a finite number in its
    range (``low < x <= high``, :data:`RANGES`), before anything is built."""
    import math

    from polytron.model.configlib import ConfigError
    if args.world < 1 or args.top < 1:
        raise ConfigError(f"--world {args.world} / --top {args.top}: need positive numbers")
    for key, (low, high) in RANGES.items():
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and value > low and (high is None or value <= high)):
            span = f"in ({low:g}, {high:g}]" if high is not None else f"above {low:g}"
            raise ConfigError(f"--{key.replace('_', '-')} {value}: must be a finite number {span}")


@command()
def run(argv: list[str]) -> int:
    from polytron.model.configlib import ConfigError
    from polytron.parallel.plan import Assumptions, hardware, plan, search
    from polytron.pretrain.config import load_config
    args = parse_args(argv)
    check_numbers(args)
    hw = hardware(args.gpu, memory_gb=args.memory_gb, bf16_tflops=args.peak_tflops,
                  nvlink_gbs=args.nvlink_gbs, ib_gbs=args.ib_gbs)
    from polytron.model.configlib import load_yaml
    path = args.config
    raw = load_yaml(path)
    if "sources" in raw and raw.get("run_config"):          # a mixture config: plan its run config
        path = raw["run_config"]
        print(f"{args.config} is a data mixture: planning its run_config {path}")
        raw = load_yaml(path)
    data = raw.get("data") or {}
    # the plan reads no data: a config whose dataset paths come at launch time plans as is
    no_data = [] if data.get("paths") or data.get("builtin_corpus") else ["data.builtin_corpus=true"]
    cfg = load_config(path, [f"training.device={args.device}", *no_data, *args.overrides])
    assume = Assumptions(expert_load=args.expert_load, expert_kept=args.expert_kept,
                         **({} if args.efficiency is None else {"matmul_efficiency": args.efficiency}))
    if not args.search:
        fit_global_batch(cfg, args.world)
        show(plan(cfg, args.world, hw, assume), hw)
        return 0
    rows = search(cfg, args.world, hw, assume)
    fit = sorted((r for r in rows if r[0] is not None and r[0].fits), key=lambda r: r[0].step_s)  # type: ignore[union-attr]
    if not fit and all(r[0] is None for r in rows):
        raise ConfigError(f"--world {args.world}: no layout of this model divides {args.world} ranks "
                          f"({rows[0][2] if rows else 'no candidates'})")
    print(f"{'layout':32s} {'GB/rank':>8s} {'step ms':>9s} {'MFU':>6s}")
    for pl, _, _ in fit[:args.top]:
        assert pl is not None
        print(f"{pl.layout:32s} {pl.total_bytes / 1e9:8.1f} {pl.step_s * 1e3:9.1f} {pl.mfu * 100:5.1f}%")
    print("does not fit / refused:")
    for pl, text, reason in rows:
        if pl is None:
            print(f"  {text}: {reason}")
        elif not pl.fits:
            print(f"  {pl.layout}: {pl.reason}")
    if fit:
        print()
        show(fit[0][0], hw)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
