#!/usr/bin/env python
"""FP8 against high precision: the same steps both ways from the same initialization.

Builds the config's model twice in one process, from the same seed: once with
``precision.fp8`` off (the compute dtype of ``precision.dtype``: bf16 on GPU, fp32 on
CPU) and once with it on (the config's ``precision.fp8`` section, ``enabled`` forced),
and trains each for ``--steps`` optimizer steps of the trainer's own step
(:class:`pretrain.step.TrainStep`, the engine of ``build_engine``) on the *same*
batches: the config's training data (``data.*``; the first ``--steps`` global batches
of the run), or random tokens with ``--random-data``. It reports each side's per-step
losses, the relative loss difference (at the last step, and of the mean over the last
``--window`` steps, which smooths step-to-step noise), tokens/s and MFU over the steps
after ``--warmup``, and the FP8 speedup. The first side is freed before the second is
built, so both fit where one does.

MFU divides by ``logging.peak_tflops`` when set, else by the measured peak of the
high-precision matmul (``tools/benchmark.py``): FP8 MFU is quoted against the bf16
peak, as torchtitan and Megatron report it.

Usage::

    python tools/fp8_compare.py --config launch/configs/fp8-1b.yaml --steps 200 \\
        --json fp8.json [--warmup 5] [--window 20] [--random-data] [section.key=value ...]

Exit status 0; 2 with one ``error:`` line on bad input.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from typing import Optional

import torch

from polytron.parallel.engine import build_engine
from polytron.parallel.mesh import ParallelDims
from polytron.parallel.runtime import pick_device, pick_dtype
from polytron.pretrain.config import RunConfig, load_config
from polytron.pretrain.host import setup_host
from polytron.pretrain.optim import build_optimizer
from polytron.pretrain.step import TrainStep
from polytron.tools.cli import command


def batches(cfg: RunConfig, steps: int, random_data: bool) -> list[list[dict]]:
    """The micro-batches of the first ``steps`` global batches (one process: dp = 1)."""
    mb, gb = cfg.training.micro_batch_size, cfg.training.global_batch_size or cfg.training.micro_batch_size
    if random_data:
        gen = torch.Generator().manual_seed(cfg.training.seed)
        out = []
        for _ in range(steps):
            ids = torch.randint(0, cfg.model.vocab_size, (gb, cfg.data.seq_len + 1), generator=gen)
            out.append([{"tokens": ids[i:i + mb, :-1], "labels": ids[i:i + mb, 1:]} for i in range(0, gb, mb)])
        return out
    from polytron.data import build_data
    data = build_data(cfg.data, model_vocab_size=cfg.model.vocab_size, seed=cfg.training.seed,
                      global_batch_size=gb, micro_batch_size=mb, dp_rank=0, dp_size=1,
                      train_iterations=cfg.training.iterations, eval_iterations=0, eval_interval=0)
    return [data.train.next_step() for _ in range(steps)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_side(cfg: RunConfig, steps: list[list[dict]], device: torch.device, warmup: int) -> dict:
    """Train one side over ``steps``; per-step losses, seconds per timed step, FP8 summary."""
    dims = ParallelDims.resolve(cfg.parallel, cfg.model, 1)
    dtype = pick_dtype(cfg.precision.dtype, device)[0]
    engine = build_engine(cfg.model, cfg.parallel, dims, None, device, dtype, cfg.training.seed,
                          fp8_cfg=cfg.precision.fp8)
    step = TrainStep(engine, build_optimizer(engine.model_parts, cfg.optimizer), cfg.optimizer,
                     cfg.schedule, cfg.training.iterations, cfg.training.nonfinite)
    losses, t0 = [], None
    for i, microbatches in enumerate(steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        losses.append(step(microbatches, i).loss.detach())
    sync(device)
    timed = len(steps) - warmup
    seconds = (time.perf_counter() - t0) / timed if t0 is not None and timed > 0 else float("nan")
    summary = engine.fp8.describe() if engine.fp8 is not None else "fp8: off"
    del step, engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"losses": [float(loss) for loss in losses], "seconds_per_step": seconds, "fp8": summary}


def sides(cfg: RunConfig) -> tuple[RunConfig, RunConfig]:
    """(high precision, FP8) copies of ``cfg``."""
    high, low = copy.deepcopy(cfg), copy.deepcopy(cfg)
    high.precision.fp8.enabled = False
    low.precision.fp8.enabled = True
    low.validate()
    return high, low


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(cfg: RunConfig, n_steps: int, warmup: int, window: int, random_data: bool) -> dict:
    """Both sides over the same batches; the comparison as a dict (see the module docstring)."""
    from polytron.tools.benchmark import resolve_peak
    device = pick_device(cfg.training.device)
    setup_host(device, cfg.training)
    high_cfg, fp8_cfg = sides(cfg)
    steps = batches(cfg, n_steps, random_data)
    peak, source = resolve_peak(high_cfg, device)
    high = train_side(high_cfg, steps, device, warmup)
    low = train_side(fp8_cfg, steps, device, warmup)
    tokens = sum(int(mb["tokens"].numel()) for mb in steps[0])
    flops = cfg.model.flops_per_token(cfg.data.seq_len)
    w = max(1, min(window, n_steps))
    out = {"steps": n_steps, "warmup": warmup, "window": w, "device": device.type,
           "dtype": pick_dtype(cfg.precision.dtype, device)[1], "tokens_per_step": tokens,
           "peak_tflops": peak / 1e12, "peak_source": source, "fp8": low["fp8"],
           "losses_high": high["losses"], "losses_fp8": low["losses"],
           "final_rel_diff": relative(low["losses"][-1], high["losses"][-1]),
           "window_rel_diff": relative(sum(low["losses"][-w:]) / w, sum(high["losses"][-w:]) / w),
           "max_rel_diff": max(relative(a, b) for a, b in zip(low["losses"], high["losses"]))}
    for name, side in (("high", high), ("fp8", low)):
        tps = tokens / side["seconds_per_step"]
        out[f"tokens_per_s_{name}"] = tps
        out[f"mfu_{name}"] = tps * flops / peak
    out["speedup"] = out["tokens_per_s_fp8"] / out["tokens_per_s_high"]
    return out


def report(res: dict) -> str:
    return "\n".join([
        f"{res['fp8']}",
        f"{res['steps']} steps on {res['device']} ({res['dtype']} vs fp8), {res['tokens_per_step']} tokens/step; "
        f"peak {res['peak_tflops']:.1f} TFLOP/s ({res['peak_source']})",
        f"{res['dtype']}: loss {res['losses_high'][-1]:.4f}, {res['tokens_per_s_high']:.1f} tokens/s, "
        f"MFU {100 * res['mfu_high']:.1f}%",
        f"fp8:  loss {res['losses_fp8'][-1]:.4f}, {res['tokens_per_s_fp8']:.1f} tokens/s, "
        f"MFU {100 * res['mfu_fp8']:.1f}%",
        f"relative loss difference: last step {100 * res['final_rel_diff']:.3f}%, mean of the last "
        f"{res['window']} steps {100 * res['window_rel_diff']:.3f}%, largest {100 * res['max_rel_diff']:.3f}%",
        f"fp8 speedup: {res['speedup']:.3f}x"])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="Run config YAML.")
    p.add_argument("--steps", type=int, default=20, help="Optimizer steps per side.")
    p.add_argument("--warmup", type=int, default=2, help="Steps not timed (still compared).")
    p.add_argument("--window", type=int, default=10, help="Last steps whose mean loss is compared.")
    p.add_argument("--random-data", action="store_true", help="Random tokens instead of data.*.")
    p.add_argument("--json", help="Write the results to this JSON file.")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides.")
    args = p.parse_args(argv)
    if args.steps < 1 or args.window < 1 or not 0 <= args.warmup < args.steps:
        p.error("need --steps >= 1, --window >= 1 and 0 <= --warmup < --steps")
    return args


@command
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    res = compare(cfg, args.steps, args.warmup, args.window, args.random_data)
    res["config"] = os.path.abspath(args.config)
    print(report(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
