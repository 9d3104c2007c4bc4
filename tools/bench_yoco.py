#!/usr/bin/env python
"""YOCO measurements for docs/benchmarks.md: cache memory, prefill early exit, training
throughput against the dense model, sliding-window attention against a masked full one.

    python tools/bench_yoco.py [--sections memory,prefill,train,swa] [--json out.json]
                               [--repeats 3] [--threads 2]

* ``memory``: the inference cache of a YOCO model and of the dense model of the same shape
  (same width, layers, heads, KV heads; ``model.arch=llama``) at 4K, 32K and 128K
  positions, batch 1, bf16: both caches are allocated (``torch.zeros``) through the
  specs' ``make_cache`` and measured with ``bytes()`` and the tensors' storages; the
  computed figure (:func:`model.yoco.cache.cache_bytes`) is printed beside them.
* ``prefill``: one forward of a 4096- and an 8192-token prompt into a fresh cache, with the
  cross-decoder run for the last position only (early exit) and for all positions; fp32,
  ``torch.no_grad``, alternating, median of ``--repeats``.
* ``train``: the trainer's own step (``tools/benchmark.py``'s runner: ``build_engine`` +
  ``TrainStep``, AdamW) on ``launch/configs/yoco-tiny.yaml``, ``yoco-retention-tiny.yaml``
  and the dense ``tiny.yaml`` (same shape), fp32, one process, random tokens; the three
  alternate within each repeat.
* ``swa``: forward + backward of sliding-window attention (``model.yoco.kernels``) against
  SDPA with the full T x T band mask and against plain causal attention, T = 4096, 8 heads
  of 64, windows 512 and 1024, fp32.

The machine's load average is recorded before and after each section (shared machines).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.errors import BadInput
from polytron.tools.cli import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The shape the memory section compares (Llama-3.2-1B-like: d=2048, 16 layers, 32 heads of 64, 8 KV heads).
MEMORY_SHAPE = dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                    ffn_hidden_size=8192, max_seq_len=131072)
#: The shape the prefill section runs (d=512, 8 layers, 8 heads of 64, 2 KV heads, window 1024).
PREFILL_SHAPE = dict(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                     ffn_hidden_size=1408, max_seq_len=8192)
CONTEXTS = (4096, 32768, 131072)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def config(shape: dict, **over) -> ModelConfig:
    cfg = from_dict(ModelConfig, {**shape, **over}, prefix="model.")
    cfg.validate()
    return cfg


def storage_bytes(cache) -> int:
    """Bytes of the distinct storages behind every tensor attribute of a cache."""
    seen, total = set(), 0
    stack = list(vars(cache).values())
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


# ---------------------------------------------------------------- sections

def bench_memory(args) -> list[dict]:
    from polytron.model.spec import get_spec
    from polytron.model.yoco.cache import cache_bytes, dense_cache_bytes
    rows = []
    for context in CONTEXTS:
        row: dict[str, object] = {"context": context}
        for name, over in (("dense", dict(arch="llama")),
                           ("yoco_swa", dict(arch="yoco", yoco=dict(self_decoder="swa", sliding_window=1024))),
                           ("yoco_retention", dict(arch="yoco", yoco=dict(self_decoder="retention")))):
            cfg = config(MEMORY_SHAPE, **over)
            make_cache = get_spec(cfg.arch).make_cache
            assert make_cache is not None                # both architectures generate with a cache
            cache = make_cache(cfg, 1, context, "cpu", torch.bfloat16)
            row[name] = {"bytes": cache.bytes(), "storage_bytes": storage_bytes(cache),
                         "computed": (dense_cache_bytes if name == "dense" else cache_bytes)(
                             cfg, context, 1, torch.bfloat16)}
            del cache
        rows.append(row)
    return rows


def _prefill_once(model, prompt: torch.Tensor, early_exit: bool) -> float:
    from polytron.model.yoco.cache import YOCOCache
    cache = YOCOCache.build(model.cfg, 1, prompt.shape[1], early_exit=early_exit)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(prompt, cache=cache, start=0)
    return time.perf_counter() - t0


def bench_prefill(args) -> list[dict]:
    from polytron.model.transformer import build_model
    rows = []
    for kind in ("swa", "retention"):
        model = build_model(config(PREFILL_SHAPE, arch="yoco", yoco=dict(self_decoder=kind, sliding_window=1024,
                                                                          retention_chunk=64))).eval()
        for T in (4096, 8192):
            prompt = torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(T))
            _prefill_once(model, prompt[:, :512], True)                           # warm-up
            early, full = [], []
            for _ in range(args.repeats):
                early.append(_prefill_once(model, prompt, True))
                full.append(_prefill_once(model, prompt, False))
            rows.append({"self_decoder": kind, "tokens": T, "early_exit_s": statistics.median(early),
                         "full_s": statistics.median(full), "early_exit_runs": early, "full_runs": full})
    return rows


def bench_train(args) -> dict:
    from polytron.pretrain.config import load_config
    from polytron.tools.benchmark import Runner, polytron_step
    device = torch.device("cpu")
    common = ["training.device=cpu", "precision.dtype=fp32", "logging.wandb=false", "parallel.compile=false"]
    runners = {}
    for name, file in (("dense", "tiny.yaml"), ("yoco_swa", "yoco-tiny.yaml"),
                       ("yoco_retention", "yoco-retention-tiny.yaml")):
        cfg = load_config(os.path.join(ROOT, "launch", "configs", file), common)
        runners[name] = (Runner(name, polytron_step, cfg, device), cfg)
    for _ in range(args.repeats):
        for runner, _cfg in runners.values():
            runner.run(args.steps, 1)
    out = {}
    for name, (runner, cfg) in runners.items():
        out[name] = {"tokens_per_s": runner.tokens_per_s(),
                     "runs": [runner.tokens_per_step / t for t in runner.times],
                     "params": cfg.model.num_params(), "seq_len": cfg.data.seq_len,
                     "micro_batch": cfg.training.micro_batch_size}
    return out


def _time_fwd_bwd(fn, q, k, v, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        fn(q, k, v).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])                                          # first: warm-up


def bench_swa(args) -> list[dict]:
    from polytron.model.yoco.kernels import sliding_window_attention
    T, H, hd = 4096, 8, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, hd, generator=gen).requires_grad_() for _ in range(3))
    i = torch.arange(T)
    rows = []
    for window in (512, 1024):
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)          # (T, T)
        masked = lambda a, b, c, band=band: F.scaled_dot_product_attention(a, b, c, attn_mask=band)  # noqa: E731
        blocked = lambda a, b, c, window=window: sliding_window_attention(a, b, c, window)  # noqa: E731
        causal = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
        torch.testing.assert_close(blocked(q, k, v), masked(q, k, v), atol=1e-5, rtol=0)
        row: dict[str, float] = {"T": T, "window": window, "heads": H, "head_dim": hd}
        for name, fn in (("blocked_swa_s", blocked), ("masked_full_s", masked), ("causal_full_s", causal)):
            row[name] = _time_fwd_bwd(fn, q, k, v, args.repeats)
        rows.append(row)
    return rows


SECTIONS = {"memory": bench_memory, "prefill": bench_prefill, "train": bench_train, "swa": bench_swa}


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="memory,swa,prefill,train")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="train: timed steps per repeat")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise BadInput(f"--sections: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    for name in names:
        before = load()
        t0 = time.time()
        out = SECTIONS[name](args)
        result[name] = {"load_before": before, "load_after": load(), "wall_s": time.time() - t0, "result": out}
        print(json.dumps({name: result[name]}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
