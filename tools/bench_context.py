#!/usr/bin/env python
"""Long-context benchmark of context parallelism (docs/benchmarks.md, "Long context").

    python tools/bench_context.py [--models dense,yoco_swa,yoco_retention] [--cps 1,2,4]
        [--lengths 512,1024,2048,4096] [--budget-mib 128] [--repeats 2] [--json out.json]
        [section.key=value ...]

For every cp degree (cp = 1 in this process, cp > 1 as one ``torchrun`` job of this
script with ``cp`` gloo/NCCL ranks) and every model (``launch/configs/tiny.yaml``,
``yoco-tiny.yaml``, ``yoco-retention-tiny.yaml``, fp32, ``parallel.context=cp``) the
trainer's own step (``build_engine`` + ``TrainStep``, AdamW) runs one micro-batch of
one random sequence per length, and measures on every rank:

* ``act_bytes``: activation memory of the micro-batch: the bytes of the distinct storages
  autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks`` around
  the step; parameters excluded). All are alive at the end of the forward, so this is
  the peak of saved activations. The table reports the largest rank's;
* ``step_s``: median wall time of ``--repeats`` further steps (barrier before and after);
* ``kv_gathers``: all-gathers of YOCO's shared key/value during one step
  (:data:`model.yoco.context_parallel.KV_GATHERS`; 0 at cp = 1, where none is needed).

The longest sequence each (model, cp) trains within ``--budget-mib`` per rank is the
longest measured length whose ``act_bytes`` fits (a grid value, not extrapolated). A
length the layout cannot serve (e.g. a sliding window longer than a chunk) is reported
with its one-line reason. Trailing ``section.key=value`` overrides apply to every model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

from polytron.model.errors import BadInput
from polytron.tools.cli import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Model name -> run config under launch/configs/.
MODELS = {"dense": "tiny.yaml", "yoco_swa": "yoco-tiny.yaml", "yoco_retention": "yoco-retention-tiny.yaml"}
COMMON = ["training.device=cpu", "precision.dtype=fp32", "logging.wandb=false", "parallel.compile=false",
          "training.micro_batch_size=1", "training.global_batch_size=1"]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def int_list(text: str, flag: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (positive integers), or BadInput naming ``flag``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise BadInput(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise BadInput(f"{flag}: values must be positive, got {text!r}")
    return values


# ---------------------------------------------------------------- measuring (one rank)

class SavedBytes:
    """Bytes of the distinct storages autograd saves while active (parameters excluded)."""

    def __init__(self, params: list) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.skip:
            self.seen[ptr] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _batch(vocab: int, T: int, seed: int) -> dict:
    import torch
    seq = torch.randint(0, vocab, (1, T + 1), generator=torch.Generator().manual_seed(seed))
    return {"tokens": seq[:, :-1], "labels": seq[:, 1:]}


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _rank_max(value: float, world: int) -> float:
    """The largest rank's value (all ranks get it)."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def measure_model(name: str, lengths: list[int], repeats: int, overrides: list[str], world: int) -> list[dict]:
    """Every length of one model on this rank (cp = world); rows of the largest rank's figures."""
    import torch

    import polytron.model.yoco.context_parallel as ycp
    from polytron.parallel.context import check_context_parallel
    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    from polytron.pretrain.config import load_config
    from polytron.pretrain.optim import build_optimizer
    from polytron.pretrain.step import TrainStep

    longest = max(lengths)
    cfg = load_config(os.path.join(ROOT, "launch", "configs", MODELS[name]),
                      COMMON + [f"parallel.context={world}", f"data.seq_len={longest}",
                                f"model.max_seq_len={longest}", *overrides])
    dims = ParallelDims.resolve(cfg.parallel, cfg.model, world)
    mesh = dims.build_mesh("cpu") if world > 1 else None
    engine = build_engine(cfg.model, cfg.parallel, dims, mesh, torch.device("cpu"), torch.float32,
                          cfg.training.seed)
    step = TrainStep(engine, build_optimizer(engine.model_parts, cfg.optimizer), cfg.optimizer,
                     cfg.schedule, cfg.training.iterations)
    params = [p for m in engine.model_parts for p in m.parameters()]
    rows, it = [], 0
    for T in lengths:
        row: dict[str, Any] = {"model": name, "cp": world, "seq_len": T}
        err = check_context_parallel(cfg.model, world, T) if world > 1 else None
        if err:
            rows.append({**row, "error": err})
            continue
        meter, gathers = SavedBytes(params), ycp.KV_GATHERS
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            step([_batch(cfg.model.vocab_size, T, it)], it)
        row["kv_gathers"] = ycp.KV_GATHERS - gathers
        it += 1
        times = []
        for _ in range(repeats):
            _barrier(world)
            t0 = time.perf_counter()
            step([_batch(cfg.model.vocab_size, T, it)], it)
            _barrier(world)
            times.append(time.perf_counter() - t0)
            it += 1
        row["act_bytes"] = int(_rank_max(meter.total, world))
        row["step_s"] = _rank_max(statistics.median(times), world) if times else None
        rows.append(row)
    return rows


def measure(models: list[str], lengths: list[int], repeats: int, overrides: list[str]) -> list[dict]:
    """This process's ranks (cp = WORLD_SIZE): every model at every length."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        return [row for name in models for row in measure_model(name, lengths, repeats, overrides, world)]
    finally:
        if world > 1:
            dist.destroy_process_group()


# ---------------------------------------------------------------- driving

def run_cp(cp: int, args: argparse.Namespace) -> list[dict]:
    """One cp degree: in this process for cp = 1, else one torchrun job of ``--worker``."""
    if cp == 1:
        return measure(args.model_list, args.length_list, args.repeats, args.overrides)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}",
           os.path.abspath(__file__), "--worker", "--models", args.models, "--lengths", args.lengths,
           "--repeats", str(args.repeats), *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    errs = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    tail = errs[-1] if errs else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [{"model": m, "cp": cp, "error": f"exit {proc.returncode}: {tail}"} for m in args.model_list]


def longest_within(rows: list[dict], budget: int) -> dict[str, dict[int, Optional[int]]]:
    """model -> cp -> the longest measured length whose activation bytes fit ``budget``."""
    out: dict[str, dict[int, Optional[int]]] = {}
    for r in rows:
        best = out.setdefault(r["model"], {}).setdefault(r["cp"], None)
        if r.get("act_bytes") is not None and r["act_bytes"] <= budget and (best is None or r["seq_len"] > best):
            out[r["model"]][r["cp"]] = r["seq_len"]
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Each row's activation bytes as a fraction of cp = 1's at the same model and length."""
    base = {(r["model"], r["seq_len"]): r["act_bytes"] for r in rows if r["cp"] == 1 and "act_bytes" in r}
    for r in rows:
        b = base.get((r["model"], r.get("seq_len")))
        if b and "act_bytes" in r:
            r["vs_cp1"] = r["act_bytes"] / b
    return rows


def table(rows: list[dict], fits: dict, budget: int) -> str:
    """A markdown table of the rows and the longest length within the budget."""
    mib = 2 ** 20
    out = ["| model | cp | seq_len | act MiB / rank | x cp=1 | step s | K/V gathers / step |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['cp']} | {r.get('seq_len', '')} | {r['error']} | | | |")
            continue
        ratio = f"{r['vs_cp1']:.3f}" if "vs_cp1" in r else ""
        step = f"{r['step_s']:.2f}" if r.get("step_s") is not None else ""
        out.append(f"| {r['model']} | {r['cp']} | {r['seq_len']} | {r['act_bytes'] / mib:.1f} | {ratio} | "
                   f"{step} | {r['kv_gathers']} |")
    out += ["", f"Longest measured sequence within {budget / mib:.0f} MiB of activations per rank:", "",
            "| model | " + " | ".join(f"cp={cp}" for cp in sorted({c for f in fits.values() for c in f})) + " |"]
    cps = sorted({c for f in fits.values() for c in f})
    out.append("|---|" + "---:|" * len(cps))
    for model, by_cp in fits.items():
        out.append(f"| {model} | " + " | ".join(str(by_cp.get(cp) or "none") for cp in cps) + " |")
    return "\n".join(out)


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dense,yoco_swa,yoco_retention")
    p.add_argument("--cps", default="1,2,4", help="context-parallel degrees")
    p.add_argument("--lengths", default="512,1024,2048,4096", help="sequence lengths (divisible by 2 x max cp)")
    p.add_argument("--budget-mib", type=float, default=128.0, help="per-rank activation budget (MiB)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per length (after the measured one)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per torchrun job")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every model")
    args = p.parse_args(argv)
    args.model_list = args.models.split(",")
    unknown = [m for m in args.model_list if m not in MODELS]
    if unknown:
        raise BadInput(f"--models: unknown model {unknown[0]!r} (known: {', '.join(MODELS)})")
    args.cp_list = int_list(args.cps, "--cps")
    args.length_list = int_list(args.lengths, "--lengths")
    step = 2 * max(args.cp_list)
    odd = [T for T in args.length_list if T % step]
    if odd:
        raise BadInput(f"--lengths: {odd[0]} is not divisible by 2 x max(--cps) = {step}")
    if args.repeats < 0 or args.budget_mib <= 0:
        raise BadInput("--repeats must be >= 0 and --budget-mib > 0")
    return args


@command
def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    if args.worker:
        rows = measure(args.model_list, args.length_list, args.repeats, args.overrides)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(rows), flush=True)
        return 0
    before, t0 = load(), time.time()
    rows = ratios([r for cp in args.cp_list for r in run_cp(cp, args)])
    budget = int(args.budget_mib * 2 ** 20)
    fits = longest_within(rows, budget)
    print(table(rows, fits, budget))
    result = {"rows": rows, "longest_within_budget": fits, "budget_bytes": budget, "load_before": before,
              "load_after": load(), "wall_s": time.time() - t0, "cpus": os.cpu_count()}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
