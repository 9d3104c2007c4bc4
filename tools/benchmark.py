#!/usr/bin/env python
"""Training-throughput benchmark: tokens/s, MFU and peak memory of a run config.

Runs the trainer's own step in one process (``build_engine`` + ``build_optimizer``,
so ``parallel.compile`` and ``parallel.activation_checkpoint`` apply; forward,
loss, backward, gradient clipping, AdamW, ``zero_grad(set_to_none=True)``) on
random token batches of the config's ``data.seq_len`` x
``training.micro_batch_size``; no data files are read.

With ``--compare-hf`` the same shape is trained with Hugging Face
``LlamaForCausalLM`` (built offline from a ``LlamaConfig``, sdpa attention, no
dropout, the same AdamW groups and fused/foreach choice) in the same process.
Runs alternate (ours, HF, ours, HF, ...) ``--repeats`` times so that drift of the
machine (thermal, other load) hits both sides alike; each side reports its median.
``--hf-compile`` wraps the Hugging Face model (loss included) in ``torch.compile``.

MFU = tokens/s * ``cfg.model.flops_per_token(seq_len)`` / peak FLOP/s. The peak
is ``logging.peak_tflops`` when set, otherwise measured here: the best of several
large square matmuls (``torch.mm``, 2048^3) in the compute dtype on the same
threads. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is
the growth of the process's resident-set high-water mark (``ru_maxrss``) from
just before the model is built to the end of its first timed run: parameters,
gradients, optimizer state, activations and allocator slack, as the OS sees it.

Usage::

    python tools/benchmark.py --config launch/configs/bench-cpu.yaml --compare-hf \
        --json bench.json [--hf-compile] [--steps 5] [--warmup 1] [--repeats 3] \
        [section.key=value ...]

With ``--layouts tp2,pp2,pp2-vs2,fsdp2,tp2-pp2,hsdp2x2`` each parallel layout runs as
its own ``torchrun`` job of ``tools/bench_layout.py`` on the same config and global
batch, and tokens/s per layout are reported (see docs/parallelism.md for the names).

Bad config paths or keys print ``error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from polytron.parallel.engine import build_engine
from polytron.parallel.mesh import ParallelDims
from polytron.parallel.runtime import autocast_context, pick_device, pick_dtype
from polytron.pretrain.config import RunConfig, load_config
from polytron.pretrain.host import setup_host
from polytron.pretrain.optim import build_optimizer
from polytron.pretrain.step import TrainStep
from polytron.tools.cli import command

Step = Callable[[], None]


# ---------------------------------------------------------------- environment

def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """Compute dtype of the forward/backward (``precision.dtype``), as the trainer picks it."""
    return pick_dtype(cfg.precision.dtype, device)[0]


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_bytes() -> int:
    """Resident-set high-water mark of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048,
                       trials: int = 5) -> float:
    """Best FLOP/s of an n x n x n ``torch.mm`` over ``trials`` timed calls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)                                           # warm the kernel
    best = float("inf")
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# ---------------------------------------------------------------- training steps

def random_batch(cfg: RunConfig, device: torch.device,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (tokens, labels), each (B, T) int64 in [0, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    B, T = cfg.training.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def make_step(model: nn.Module, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              cfg: RunConfig, device: torch.device) -> Step:
    """One optimizer step of ``model``: forward + loss, backward, clip, AdamW, zero_grad."""
    optimizer = build_optimizer([model], cfg.optimizer)
    tokens, labels = random_batch(cfg, device, cfg.training.seed)
    dtype = compute_dtype(cfg, device)
    clip = cfg.optimizer.grad_clip

    def step() -> None:
        with autocast_context(device, dtype):
            loss = loss_of(tokens, labels)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def polytron_step(cfg: RunConfig, device: torch.device) -> Step:
    """The trainer's own step, single process: ``build_engine`` (so ``parallel.compile`` and
    ``parallel.activation_checkpoint`` apply) and :class:`pretrain.step.TrainStep` (forward,
    loss, backward, clipping, AdamW, hooks, ``zero_grad(set_to_none=True)``)."""
    dims = ParallelDims.resolve(cfg.parallel, cfg.model, 1)
    engine = build_engine(cfg.model, cfg.parallel, dims, None, device, compute_dtype(cfg, device),
                          cfg.training.seed, fp8_cfg=cfg.precision.fp8)
    train_step = TrainStep(engine, build_optimizer(engine.model_parts, cfg.optimizer), cfg.optimizer,
                           cfg.schedule, cfg.training.iterations)
    tokens, labels = random_batch(cfg, device, cfg.training.seed)
    batch = [{"tokens": tokens, "labels": labels}]
    calls = [0]

    def step() -> None:
        train_step(batch, calls[0])
        calls[0] += 1

    return step


def hf_llama(cfg: RunConfig, device: torch.device) -> nn.Module:
    """Hugging Face ``LlamaForCausalLM`` of the same shape, built offline, fp32, sdpa."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from polytron.model.llama.hf import LlamaAdapter
    hf_cfg = LlamaConfig(**LlamaAdapter().to_hf_config(cfg.model, None, None, "float32"))
    hf_cfg.use_cache = False
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.training.seed)
    model = LlamaForCausalLM(hf_cfg)
    # transformers wraps ``to`` with functools.wraps; mypy then reads it as unbound (self missing)
    return model.to(device=device, dtype=torch.float32).train()  # type: ignore[call-arg]


def hf_step(cfg: RunConfig, device: torch.device, compile_model: bool = False) -> Step:
    """The same training step on Hugging Face ``LlamaForCausalLM`` with its own loss.

    ``shift_labels`` hands HF our already-shifted labels, so both sides predict the
    same B x T targets through HF's standard ``ForCausalLMLoss``. ``compile_model``
    wraps the whole model, loss included, in ``torch.compile`` (``--hf-compile``).
    """
    model = hf_llama(cfg, device)
    forward = torch.compile(model) if compile_model else model

    def loss_of(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return forward(input_ids=tokens, labels=labels, shift_labels=labels, use_cache=False).loss

    return make_step(model, loss_of, cfg, device)


def time_steps(step: Step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step: mean of ``steps`` timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


# ---------------------------------------------------------------- measurements

#: ``peak_source`` of a peak measured in the run (re-measured between repeats, best kept).
MEASURED = "measured torch.mm 2048^3, best over the run"


def resolve_peak(cfg: RunConfig, device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where it came from (config or measured)."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops * 1e12, "logging.peak_tflops"
    return measure_peak_flops(device, compute_dtype(cfg, device)), MEASURED


def best_peak(cfg: RunConfig, device: torch.device, peak_flops: float, source: str) -> float:
    """A measured peak, measured again with the best kept; a configured one as it is.

    A matmul timed while other work shared the cores reads low and would inflate MFU
    (past 100% on a busy host), so the benchmark re-measures between repeats.
    """
    if source != MEASURED:
        return peak_flops
    return max(peak_flops, measure_peak_flops(device, compute_dtype(cfg, device)))


class Runner:
    """A built training step plus the timings and peak memory it has produced."""

    def __init__(self, name: str, build: Callable[[RunConfig, torch.device], Step],
                 cfg: RunConfig, device: torch.device):
        self.name, self.device = name, device
        self.times: list[float] = []
        self.tokens_per_step = cfg.training.micro_batch_size * cfg.data.seq_len
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.rss_before = max_rss_bytes()
        self.step = build(cfg, device)
        self.peak_memory_bytes: Optional[int] = None

    def run(self, steps: int, warmup: int) -> float:
        """Time one repeat; the first repeat also records peak memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sec = time_steps(self.step, steps, warmup, self.device)
        self.times.append(sec)
        if self.peak_memory_bytes is None:
            self.peak_memory_bytes = (torch.cuda.max_memory_allocated(self.device)
                                      if self.device.type == "cuda"
                                      else max_rss_bytes() - self.rss_before)
        return self.tokens_per_step / sec

    def tokens_per_s(self) -> float:
        """Median tokens/s over the repeats run so far."""
        return self.tokens_per_step / statistics.median(self.times)


def summarize(runner: Runner, cfg: RunConfig, peak_flops: float) -> dict:
    """tokens/s (median), MFU and peak memory of a runner."""
    tps = runner.tokens_per_s()
    flops = cfg.model.flops_per_token(cfg.data.seq_len)
    return {"tokens_per_s": tps, "mfu": tps * flops / peak_flops,
            "peak_memory_bytes": runner.peak_memory_bytes,
            "runs_tokens_per_s": [runner.tokens_per_step / t for t in runner.times]}


def measure(cfg: RunConfig, steps: int, warmup: int, repeats: int = 1,
            peak: Optional[tuple[float, str]] = None) -> dict:
    """Our training step alone: ``tokens_per_s``, ``mfu``, ``peak_memory_bytes``, peak used.

    This is the unit a per-layout benchmark calls once per parallel layout.
    """
    device = pick_device(cfg.training.device)
    kept = setup_host(device, cfg.training)
    peak_flops, source = peak or resolve_peak(cfg, device)
    ours = Runner("polytron", polytron_step, cfg, device)
    for _ in range(repeats):
        ours.run(steps, warmup)
        if peak is None:
            peak_flops = best_peak(cfg, device, peak_flops, source)
    return {**summarize(ours, cfg, peak_flops), **environment(cfg, device, peak_flops, source, kept)}


def compare_hf(cfg: RunConfig, steps: int, warmup: int, repeats: int,
               hf_compile: bool = False) -> dict:
    """Ours and Hugging Face alternating ``repeats`` times; medians and their ratio."""
    device = pick_device(cfg.training.device)
    kept = setup_host(device, cfg.training)  # process-wide: the HF side runs under it too
    peak_flops, source = resolve_peak(cfg, device)
    ours = Runner("polytron", polytron_step, cfg, device)
    ours.run(steps, warmup)              # ours' peak memory is recorded before HF exists
    hf = Runner("hf", lambda c, d: hf_step(c, d, hf_compile), cfg, device)
    hf.run(steps, warmup)
    peak_flops = best_peak(cfg, device, peak_flops, source)
    for _ in range(repeats - 1):
        ours.run(steps, warmup)
        hf.run(steps, warmup)
        peak_flops = best_peak(cfg, device, peak_flops, source)
    result = summarize(ours, cfg, peak_flops)
    hf_sum = summarize(hf, cfg, peak_flops)
    result.update({"hf_tokens_per_s": hf_sum["tokens_per_s"], "hf_mfu": hf_sum["mfu"],
                   "hf_runs_tokens_per_s": hf_sum["runs_tokens_per_s"],
                   "hf_peak_memory_bytes": hf_sum["peak_memory_bytes"] if device.type == "cuda" else None,
                   "hf_compiled": hf_compile,
                   "ratio": result["tokens_per_s"] / hf_sum["tokens_per_s"]})
    result.update(environment(cfg, device, peak_flops, source, kept))
    return result


def environment(cfg: RunConfig, device: torch.device, peak_flops: float, source: str,
                keep_freed_memory: bool) -> dict:
    """What the numbers were measured on."""
    return {"peak_tflops": peak_flops / 1e12, "peak_source": source,
            "flops_per_token": cfg.model.flops_per_token(cfg.data.seq_len),
            "device": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": str(compute_dtype(cfg, device)).replace("torch.", ""),
            "seq_len": cfg.data.seq_len, "micro_batch_size": cfg.training.micro_batch_size,
            "compiled": cfg.parallel.compile,
            "keep_freed_memory": keep_freed_memory,   # whether the malloc setting took effect
            "loadavg_1m": os.getloadavg()[0],   # > 0.5 or so on 2 cores: other work competed
            "memory_measure": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                               else "ru_maxrss growth (KiB * 1024) over the model's first run")}


# ---------------------------------------------------------------- CLI

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="Run config YAML.")
    p.add_argument("--compare-hf", action="store_true",
                   help="Also train Hugging Face LlamaForCausalLM of the same shape, alternating.")
    p.add_argument("--hf-compile", action="store_true",
                   help="With --compare-hf: torch.compile the Hugging Face model (loss included).")
    p.add_argument("--json", help="Write the results to this JSON file.")
    p.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per repeat.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps before each repeat.")
    p.add_argument("--repeats", type=int, default=3, help="Repeats per side; medians are reported.")
    p.add_argument("--layouts", help="Comma-separated parallel layouts (e.g. tp2,pp2,fsdp2,tp2-pp2): "
                   "run each under torchrun and report tokens/s per layout.")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides.")
    args = p.parse_args(argv)
    for k in ("steps", "repeats"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def report(res: dict) -> str:
    """Human-readable summary lines."""
    lines = [f"device {res['device']} ({res['threads']} threads), torch {res['torch']}, "
             f"{res['dtype']}, batch {res['micro_batch_size']} x seq {res['seq_len']}, "
             f"load average {res['loadavg_1m']:.2f}",
             f"peak {res['peak_tflops'] * 1e3:.1f} GFLOP/s ({res['peak_source']})",
             f"polytron ({'compiled' if res['compiled'] else 'eager'}): "
             f"{res['tokens_per_s']:.1f} tokens/s, MFU {100 * res['mfu']:.1f}%, "
             f"peak memory {res['peak_memory_bytes'] / 2**20:.0f} MiB"]
    if "ratio" in res:
        kind = "compiled" if res["hf_compiled"] else "eager"
        lines.append(f"hf llama ({kind}): {res['hf_tokens_per_s']:.1f} tokens/s, "
                     f"MFU {100 * res['hf_mfu']:.1f}%")
        lines.append(f"ratio polytron / hf: {res['ratio']:.3f}")
    return "\n".join(lines)


@command
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.layouts:
        from polytron.tools.bench_layout import format_layouts, measure_layouts
        rows = measure_layouts(args.config, args.layouts.split(","), args.steps, args.warmup, args.overrides)
        print(format_layouts(rows))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"config": os.path.abspath(args.config), "layouts": rows}, f, indent=2)
        return 0 if all("error" not in r for r in rows) else 1
    if args.compare_hf:
        res = compare_hf(cfg, args.steps, args.warmup, args.repeats, args.hf_compile)
    else:
        res = measure(cfg, args.steps, args.warmup, args.repeats)
    res["config"] = os.path.abspath(args.config)
    print(report(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
