"""Metrics: console lines, a JSONL file, wandb (offline unless a key is set), tensorboard.

Only rank 0 writes. Every log interval produces one console line and one JSONL
object; evaluation adds ``eval_loss`` / ``eval_ppl`` objects to the same file.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Literal, Optional, cast

import torch

from polytron.pretrain.config import LoggingConfig, RunConfig

#: Default per-device peak TFLOP/s for MFU when logging.peak_tflops is 0: H100 SXM
#: dense bf16 / fp32 (non-tensor-core) figures.
DEFAULT_PEAK_TFLOPS = {("cuda", "bf16"): 989.0, ("cuda", "fp32"): 67.0}
#: CPU fp32 matmul peak per thread, measured on the 2-core CI machine (about 0.3
#: TFLOP/s on 2 threads, measured for the design notes); a process's peak scales with its threads.
CPU_PEAK_TFLOPS_PER_THREAD = 0.15
#: The modes ``wandb.init`` takes (``WANDB_MODE`` may name any of them).
WandbMode = Literal["online", "offline", "disabled", "shared"]


def peak_flops(cfg: LoggingConfig, device: torch.device, dtype_name: str) -> float:
    """Per-process peak FLOP/s used as the MFU denominator (``logging.peak_tflops`` wins)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cpu":
        return CPU_PEAK_TFLOPS_PER_THREAD * torch.get_num_threads() * 1e12
    return DEFAULT_PEAK_TFLOPS.get((device.type, dtype_name), 989.0) * 1e12


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated memory on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MetricsLogger:
    """Fan-out of metric records to the console, JSONL, wandb and tensorboard (rank 0 only)."""

    def __init__(self, cfg: RunConfig, run_dir: str, enabled: bool, total_iters: int, start_iter: int):
        self.enabled = enabled
        self.lcfg = cfg.logging
        self.total = total_iters
        self.jsonl = None
        self.wandb_run = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        path = os.path.join(run_dir, "metrics.jsonl")
        self.dropped = truncate_metrics(path, start_iter)
        self.jsonl = open(path, "a", encoding="utf-8")
        if cfg.logging.wandb:
            self.wandb_run = _start_wandb(cfg, run_dir)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if cfg.logging.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                            leave=False)

    def print(self, text: str) -> None:
        """A console line that does not tear the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self) -> None:
        """Advance the progress bar by one iteration."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any], line: Optional[str] = None) -> None:
        """Write one record everywhere; print ``line`` (or a default rendering)."""
        if not self.enabled:
            return
        assert self.jsonl is not None          # opened whenever the logger is enabled
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record.get("iteration", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        self.print(line or " | ".join(f"{k} {v}" for k, v in record.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def truncate_metrics(path: str, last_iteration: int) -> int:
    """Make ``path`` hold exactly the records an uninterrupted run has written by the end of
    ``last_iteration`` (the iteration a run resumes at): later records and a torn last
    line are removed. Removed records are appended to ``metrics-abandoned.jsonl`` beside
    it (a rolled-back lineage's history is kept, not lost). Returns how many were removed."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    kept: list[str] = []
    dropped: list[str] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:            # a line cut by a kill
            continue
        it = rec.get("iteration", 0) if isinstance(rec, dict) else 0
        (kept if isinstance(it, int) and it <= last_iteration else dropped).append(line)
    if len(kept) == len(lines):
        return 0
    if dropped:
        with open(os.path.join(os.path.dirname(path), "metrics-abandoned.jsonl"), "a",
                  encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _start_wandb(cfg: RunConfig, run_dir: str):
    """A wandb run that never prompts: offline without a key or network."""
    mode: str = cfg.logging.wandb_mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.training.name, dir=run_dir,
                      mode=cast(WandbMode, mode), config=cfg.to_dict(), resume="allow",
                      id=_wandb_id(run_dir), settings=wandb.Settings(console="off"))


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run directory so resumed runs continue one wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(path):
        return open(path).read().strip()
    import secrets
    rid = secrets.token_hex(4)
    with open(path, "w") as f:
        f.write(rid)
    return rid


def format_line(rec: dict[str, Any]) -> str:
    """The per-interval console line; step statistics modules reported (names with a
    ``/``, e.g. ``aux/load_balance``) and skipped steps follow when present."""
    line = (f"iter {rec['iteration']:>6}/{rec['total_iterations']} | tokens {rec['consumed_tokens']:.3e}"
            f" | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | grad_norm {rec['grad_norm']:.3f}"
            f" | {rec['tokens_per_s']:.0f} tok/s | mfu {100 * rec['mfu']:.2f}%"
            f" | step {1000 * rec['step_time_s']:.0f} ms | mem {rec['peak_memory_bytes'] / 2**30:.2f} GiB")
    if rec.get("skipped_steps"):
        line += f" | skipped {rec['skipped_steps']}"
    for key in sorted(k for k in rec if "/" in k):
        line += f" | {key} {rec[key]:.4g}"
    return line


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
