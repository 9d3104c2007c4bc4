#!/usr/bin/env python
"""Training throughput of one parallel layout (run under torchrun, one process per rank).

    torchrun --nproc_per_node=4 tools/bench_layout.py --config launch/configs/tiny.yaml \
        --layout tp2-pp2 [--steps 5] [--warmup 2] [section.key=value ...]

Builds the engine and optimizer exactly as the trainer does (``build_engine`` +
``build_optimizer``) and times full optimizer steps of the trainer's own
:class:`pretrain.step.TrainStep` (forward/backward over the step's micro-batches,
gradient clipping, AdamW) on random tokens of the config's
``data.seq_len``; no data files are read. Every layout processes the same global
batch per step (``training.global_batch_size``, default ``micro_batch_size``), so
tokens/s compare across layouts. Rank 0 prints one JSON line prefixed ``RESULT``.

Layout names join ``-``-separated parts: ``tp<N>`` tensor, ``pp<N>`` pipeline,
``vs<N>`` virtual stages per pipeline rank, ``fsdp<N>`` fully sharded data
parallel, ``hsdp<R>x<S>`` replicate x shard, ``single`` one process; e.g. ``tp2``,
``pp2-vs2``, ``tp2-pp2``, ``hsdp2x2``. :func:`layout_overrides` maps a name to
``parallel.*`` overrides and its world size.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from polytron.model.configlib import ConfigError
from polytron.tools.cli import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PART = re.compile(r"^(tp|pp|vs|fsdp|hsdp)(\d+)(?:x(\d+))?$")


def layout_overrides(name: str) -> tuple[list[str], int]:
    """``parallel.*`` overrides for a layout name, and the world size it needs."""
    if name in ("single", "1"):
        return ["parallel.data_parallel_shard=1"], 1
    values = {"tp": 1, "pp": 1, "vs": 1, "fsdp": 1, "rep": 1}
    for part in name.split("-"):
        m = _PART.match(part)
        if not m or (m.group(3) and m.group(1) != "hsdp"):
            raise ConfigError(f"layout {name!r}: cannot parse {part!r} (use tp2, pp2, vs2, fsdp2, hsdp2x2)")
        kind, a = m.group(1), int(m.group(2))
        if kind == "hsdp":
            values["rep"], values["fsdp"] = a, int(m.group(3) or 1)
        else:
            values[kind] = a
    world = values["tp"] * values["pp"] * values["fsdp"] * values["rep"]
    over = [f"parallel.tensor={values['tp']}", f"parallel.pipeline={values['pp']}",
            f"parallel.virtual_stages={values['vs']}", f"parallel.data_parallel_shard={values['fsdp']}",
            f"parallel.data_parallel_replicate={values['rep']}"]
    return over, world


def _batches(cfg, dp_rank: int, dp: int, step: int, device) -> list[dict]:
    """This rank's micro-batches of a random global batch (same on every layout)."""
    import torch
    t = cfg.training
    gb = t.global_batch_size or t.micro_batch_size * dp
    gen = torch.Generator().manual_seed(cfg.training.seed + step)
    seq = torch.randint(0, cfg.model.vocab_size, (gb, cfg.data.seq_len + 1), generator=gen)
    rows = seq[dp_rank * gb // dp:(dp_rank + 1) * gb // dp]
    return [{"tokens": rows[i:i + t.micro_batch_size, :-1].to(device),
             "labels": rows[i:i + t.micro_batch_size, 1:].to(device)}
            for i in range(0, rows.shape[0], t.micro_batch_size)]


def run(args: argparse.Namespace) -> dict:
    """Build, warm up and time one layout on this rank; returns the measurement."""
    import torch
    import torch.distributed as dist

    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    from polytron.parallel.runtime import pick_device, pick_dtype
    from polytron.pretrain.config import load_config
    from polytron.pretrain.host import setup_host
    from polytron.pretrain.optim import build_optimizer
    from polytron.pretrain.step import TrainStep

    over, _ = layout_overrides(args.layout)
    cfg = load_config(args.config, list(args.overrides) + over)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.resolve(cfg.parallel, cfg.model, world)
    device = pick_device(cfg.training.device, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    setup_host(device, cfg.training)           # as the trainer does
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    mesh = dims.build_mesh(device.type) if world > 1 else None
    dtype = pick_dtype(cfg.precision.dtype, device)[0]
    engine = build_engine(cfg.model, cfg.parallel, dims, mesh, device, dtype, cfg.training.seed)
    train_step = TrainStep(engine, build_optimizer(engine.model_parts, cfg.optimizer), cfg.optimizer,
                           cfg.schedule, cfg.training.iterations)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0

    def step(i: int) -> None:
        train_step(_batches(cfg, dp_rank, dims.dp, i, device), i)

    for i in range(args.warmup):
        step(i)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if cuda:
        torch.cuda.synchronize()
    if world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - start
    gb = cfg.training.global_batch_size or cfg.training.micro_batch_size * dims.dp
    tokens = gb * cfg.data.seq_len * args.steps
    result = {"layout": args.layout, "world_size": world, "describe": dims.describe(),
              "tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps,
              "global_batch": gb, "seq_len": cfg.data.seq_len, "steps": args.steps,
              "threads_per_rank": torch.get_num_threads(), "device": str(device.type)}
    if world > 1:
        dist.destroy_process_group()
    return result


def measure_layouts(config: str, layouts: list[str], steps: int = 5, warmup: int = 2,
                    overrides: list[str] | None = None, timeout_s: float = 900.0) -> list[dict]:
    """Run each layout as its own ``torchrun`` job; returns rank 0's measurement per layout.

    A layout that fails (bad shape for this model, a crash) gives ``{"layout", "error"}``
    instead of a measurement, so the other layouts still report.
    """
    import subprocess
    script = os.path.abspath(__file__)
    out = []
    for layout in layouts:
        try:
            _, world = layout_overrides(layout)
        except ValueError as e:
            out.append({"layout": layout, "error": str(e)})
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               script, "--config", config, "--layout", layout, "--steps", str(steps),
               "--warmup", str(warmup), *(overrides or [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PYTHONPATH": ROOT})
        except subprocess.TimeoutExpired:
            out.append({"layout": layout, "error": f"timed out after {timeout_s:.0f}s"})
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            out.append(json.loads(lines[-1][len("RESULT "):]))
        else:
            errs = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            tail = errs[-1] if errs else (proc.stderr.strip().splitlines() or ["no output"])[-1]
            out.append({"layout": layout, "error": f"exit {proc.returncode}: {tail}"})
    return out


def format_layouts(results: list[dict]) -> str:
    """A plain-text table: layout, ranks, tokens/s, tokens/s per rank, step time."""
    rows = [f"{'layout':<12} {'ranks':>5} {'tokens/s':>10} {'tok/s/rank':>10} {'step s':>8}"]
    for r in results:
        if "error" in r:
            rows.append(f"{r['layout']:<12} error: {r['error']}")
        else:
            rows.append(f"{r['layout']:<12} {r['world_size']:>5} {r['tokens_per_s']:>10.0f} "
                        f"{r['tokens_per_s'] / r['world_size']:>10.0f} {r['step_s']:>8.2f}")
    return "\n".join(rows)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Throughput of one parallel layout (run under torchrun).")
    p.add_argument("--config", required=True, help="Run config YAML.")
    p.add_argument("--layout", required=True, help="Layout name, e.g. tp2, pp2-vs2, hsdp2x2.")
    p.add_argument("--steps", type=int, default=5, help="Timed optimizer steps.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides.")
    res = run(p.parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
