#!/usr/bin/env python
"""Checkpoint benchmark: save/load time and size, sync vs async training stall.

    python tests/checkpoint/bench_checkpoint.py [--dir /tmp/ckbench] [--steps 3]

One process, fp32, the ~100M dense config (d=768, 12 layers, 12 heads, SwiGLU 2048,
vocab 8192, untied: 97.5M parameters) with AdamW state. "Stall" is the time the
training thread is blocked by a save: the whole save when synchronous; staging +
finalize when asynchronous. Steps running while the background write proceeds are
timed too (on a 2-core machine the writer competes with compute).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch  # noqa: E402

from polytron.model.config import ModelConfig  # noqa: E402
from polytron.parallel.config import ParallelConfig  # noqa: E402
from polytron.parallel.engine import build_engine  # noqa: E402
from polytron.parallel.mesh import ParallelDims  # noqa: E402
from polytron.pretrain import checkpoint as ckpt  # noqa: E402
from polytron.pretrain.config import OptimizerConfig, ScheduleConfig  # noqa: E402
from polytron.pretrain.optim import build_optimizer  # noqa: E402
from polytron.pretrain.step import TrainStep  # noqa: E402

CFG = ModelConfig(vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                  ffn_hidden_size=2048, max_seq_len=128)


def step(train_step, gen) -> float:
    """One training step of the project's TrainStep on a random sequence; its seconds."""
    t0 = time.perf_counter()
    tokens = torch.randint(0, CFG.vocab_size, (1, 129), generator=gen)
    train_step([{"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}], 0)
    return time.perf_counter() - t0


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ckbench")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    dims = ParallelDims.resolve(ParallelConfig(), CFG, 1)
    engine = build_engine(CFG, ParallelConfig(), dims, None, torch.device("cpu"), torch.float32, 0)
    model, opt_cfg = engine.model, OptimizerConfig(lr=1e-4)
    opt = build_optimizer([model], opt_cfg)
    train_step = TrainStep(engine, opt, opt_cfg, ScheduleConfig(kind="constant", warmup_iters=0), 1)
    gen = torch.Generator().manual_seed(0)
    step(train_step, gen)
    base = [step(train_step, gen) for _ in range(args.steps)]
    state = {"iteration": 1, "consumed_samples": 0, "consumed_tokens": 0}
    res: dict = {"params": sum(p.numel() for p in model.parameters()),
                 "step_s": sum(base) / len(base), "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    path = ckpt.save(args.dir, 1, [model], opt, state, keep_last=5).finalize()
    res["sync_save_s"] = res["sync_stall_s"] = time.perf_counter() - t0
    res["size_bytes"] = du(path)

    t0 = time.perf_counter()
    pending = ckpt.save(args.dir, 2, [model], opt, state, keep_last=5, async_save=True)
    staged = time.perf_counter() - t0
    during = []
    while not pending.local_done():
        during.append(step(train_step, gen))
    t1 = time.perf_counter()
    pending.finalize()
    fin = time.perf_counter() - t1
    res.update(async_stage_s=staged, async_finalize_s=fin, async_stall_s=staged + fin,
               async_total_s=time.perf_counter() - t0, steps_during_write=len(during),
               step_s_during_write=sum(during) / len(during) if during else None)

    fresh_engine = build_engine(CFG, ParallelConfig(), dims, None, torch.device("cpu"), torch.float32, 1)
    fopt = build_optimizer([fresh_engine.model], opt_cfg)
    step(TrainStep(fresh_engine, fopt, opt_cfg, ScheduleConfig(kind="constant", warmup_iters=0), 1),
         torch.Generator().manual_seed(1))                # optimizer state exists, as in a run
    t0 = time.perf_counter()
    ckpt.load(path, [fresh_engine.model], fopt)
    res["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt.load_tensors(path)
    res["load_weights_only_s"] = time.perf_counter() - t0
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
