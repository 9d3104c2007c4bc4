#!/usr/bin/env python
"""BitNet b1.58 benchmark, in one run: training throughput against the dense config of the
same shape, packed weight size, and evaluation memory of the packed model against bf16.

    python tools/bench_bitnet.py [--bitnet launch/configs/bitnet-tiny.yaml]
        [--dense launch/configs/tiny.yaml] [--steps 5] [--warmup 1] [--repeats 5]
        [--eval-config launch/configs/bitnet-b158.yaml] [--eval-layers 4] [--json out.json]

* Training: the trainer's own step (``tools/benchmark.py``'s ``polytron_step``: engine,
  TrainStep, AdamW) on random batches of each config's shape, one process, the two
  configs alternating ``--repeats`` times so machine drift hits both; medians reported.
* Size: bytes of the quantized projections packed (2-bit + fp32 scale per tensor)
  against the same weights in bf16.
* Evaluation memory: each model in a fresh subprocess (the ``--eval-config`` shape with
  ``--eval-layers`` layers, random weights): growth of the resident-set high-water mark
  (``/proc/self/status`` VmHWM, reset after the imports) to the end of an eval forward of
  one 256-token sequence, for
  the bf16 model (latent weights, BitLinear) and the packed one (PackedBitLinear, built
  without ever allocating latent weights), plus their parameter + buffer bytes and the
  forward's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from polytron.tools.cli import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training(args) -> dict:
    """Alternating training steps of the BitNet and the dense config: median tokens/s."""
    import torch

    from polytron.pretrain.config import load_config
    from polytron.tools.benchmark import Runner, polytron_step
    overrides = ["training.device=cpu", "precision.dtype=fp32", "logging.wandb=false"]
    cfgs = {name: load_config(path, overrides) for name, path in (("bitnet", args.bitnet), ("dense", args.dense))}
    device = torch.device("cpu")
    runners = {name: Runner(name, polytron_step, cfg, device) for name, cfg in cfgs.items()}
    for _ in range(args.repeats):
        for runner in runners.values():
            runner.run(args.steps, args.warmup)
    speed = {name: r.tokens_per_s() for name, r in runners.items()}
    out: dict[str, object] = {
        name: {"tokens_per_s": speed[name], "runs_tokens_per_s": [r.tokens_per_step / t for t in r.times]}
        for name, r in runners.items()}
    out["ratio_bitnet_over_dense"] = speed["bitnet"] / speed["dense"]
    out["shape"] = {k: getattr(cfgs["bitnet"].model, k) for k in ("hidden_size", "num_layers", "num_heads",
                                                                  "ffn_hidden_size", "vocab_size")}
    out["tokens_per_step"] = runners["bitnet"].tokens_per_step
    return out


def eval_model_config(args):
    from polytron.pretrain.config import load_config
    return load_config(args.eval_config, [f"model.num_layers={args.eval_layers}", "data.paths=[unused]"]).model


def proc_status_kib(key: str) -> int:
    """A ``/proc/self/status`` memory line (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (``clear_refs`` 5); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_kib("VmRSS") * 1024


def eval_memory(kind: str, args) -> dict:
    """(In a subprocess) build the ``kind`` model and run one eval forward; memory and time."""
    import torch

    from polytron.model.bitnet.layers import BitLinear
    from polytron.model.bitnet.packed import PackedBitLinear, packed_skeleton
    from polytron.model.transformer import Transformer
    cfg = eval_model_config(args)
    base = reset_peak_rss()
    if kind == "packed":
        model = packed_skeleton(cfg, "cpu", torch.bfloat16)
        for m in model.modules():
            if isinstance(m, PackedBitLinear):
                m.weight.random_(0, 256)
                m.weight_scale.fill_(0.02)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
    else:
        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        model.to(torch.bfloat16)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens)
        t0 = time.perf_counter()
        model(tokens)
        sec = time.perf_counter() - t0
    kinds = (PackedBitLinear,) if kind == "packed" else (BitLinear,)
    state = list(model.parameters()) + list(model.buffers())
    return {"model_bytes": sum(t.numel() * t.element_size() for t in state),
            "projection_bytes": sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, kinds)
                                    for t in list(m.parameters()) + list(m.buffers())),
            "peak_rss_growth_bytes": proc_status_kib("VmHWM") * 1024 - base,
            "forward_s": sec, "threads": torch.get_num_threads()}


def eval_memory_subprocess(kind: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--eval-only", kind, "--eval-config", args.eval_config,
           "--eval-layers", str(args.eval_layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def packed_size(args) -> dict:
    """Packed bytes of the quantized projections against their bf16 bytes (from shapes)."""
    import torch

    from polytron.model.bitnet.layers import BitLinear
    from polytron.model.transformer import Transformer
    from polytron.pretrain.config import load_config
    cfg = load_config(args.bitnet, []).model
    with torch.device("meta"):
        model = Transformer(cfg)
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    bf16 = sum(2 * m.weight.numel() for m in layers)
    packed = sum(-(-m.out_features // 4) * m.in_features + 4 for m in layers)
    return {"projections": len(layers), "bf16_bytes": bf16, "packed_bytes": packed, "ratio": packed / bf16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bitnet", default=os.path.join(ROOT, "launch", "configs", "bitnet-tiny.yaml"))
    p.add_argument("--dense", default=os.path.join(ROOT, "launch", "configs", "tiny.yaml"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eval-config", default=os.path.join(ROOT, "launch", "configs", "bitnet-b158.yaml"))
    p.add_argument("--eval-layers", type=int, default=4)
    p.add_argument("--eval-only", choices=["packed", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--json")
    return p.parse_args(argv)


@command
def main(argv) -> int:
    args = parse_args(argv)
    if args.eval_only:
        print(json.dumps(eval_memory(args.eval_only, args)))
        return 0
    result = {"loadavg_1m_start": os.getloadavg()[0], "training": training(args), "size": packed_size(args),
              "eval": {kind: eval_memory_subprocess(kind, args) for kind in ("bf16", "packed")},
              "loadavg_1m_end": os.getloadavg()[0], "cpus": os.cpu_count()}
    import torch
    result["torch"] = torch.__version__
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
