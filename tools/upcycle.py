#!/usr/bin/env python
"""Upcycle dense checkpoints into a mixture-of-experts checkpoint (docs/upcycling.md).

    python tools/upcycle.py sparse SRC DST --experts 8 --top-k 2 [--shared-experts 1]
                            [--noise 0.01 | --partition] [section.key=value ...]
    python tools/upcycle.py upit SRC1 SRC2 [...] DST --experts 4 --top-k 2 [--merge dare]
                            [--seed-samples 64 --router-steps 50] [--seed-data PREFIX ...]
                            [section.key=value ...]

SRC is one of our checkpoints (a checkpoint directory, a checkpoint root or a run's output
directory: its newest complete checkpoint) or a local Hugging Face Llama-family directory
(``config.json`` + safetensors), read as tools/convert_mha_to_dha.py reads it. ``sparse``
reads no data, so a Hugging Face source needs no ``data.paths``: the written config then
names none, and training it takes ``data.paths=[PREFIX]`` (data tokenized with the
source's tokenizer).

``sparse`` (Komatsuzaki et al. 2022): every routed expert a copy of the dense SwiGLU (down
projection scaled by 1/(shared+1) when shared experts take copies too), optional
``--noise`` (Gaussian, relative to each weight's std); or ``--partition``: the dense inner
width cut into experts + shared experts slices (the router zero, route_scale = top_k).
Without noise, copies reproduce the dense logits whenever the top-k weights are
renormalized; a partition does so with top_k = experts.

``upit`` (Hui et al. 2024): K >= 2 intermediate checkpoints of one dense run become K
experts per MoE layer (other tensors: their mean); a genetic algorithm grows them to
``--experts`` N (parents: the two most distant experts; offspring: ``--merge`` average or
dare, plus mutation; the most diverse of ``--candidates`` kept); then seed samples from the
run config's data (or ``--seed-data`` prefixes, blended equally) are labelled with the expert
whose dense model has the lowest loss, and only the routers train on those labels for
``--router-steps`` (held-out accuracy reported).
The sources must share one tokenizer: the fingerprint each checkpoint records
(``tokenizer_fingerprint`` in trainer_state.json), for an older checkpoint that of the
tokenizer its run config names (relative paths looked up under its run directory) when it
still loads, for a Hugging Face directory its own tokenizer's. Two known fingerprints that
differ are refused with one line naming both (``--allow-tokenizer-change`` merges them
anyway, with a note); sources whose tokenizer is unknown are compared by vocabulary size.
A checkpoint whose recorded fingerprint is not that of the ``data.tokenizer`` its config
now names is refused (both modes): the written checkpoint records the config's tokenizer;
``data.tokenizer=PATH`` on the command line is used as asked, with a note.

DST receives ``checkpoint/`` (weights-only), ``config.yaml`` (continued training:
``python launch/pretrain.py --config DST/config.yaml``) and ``upcycle_report.json``. DST must
be new or empty unless ``--overwrite``; the output is staged beside DST.

Exit status 0; 2 with one ``error:`` line naming the bad input (a ``config.json`` that is
no JSON object, NaN or infinite numbers); 1 with one line when writing fails (a full disk:
DST is left as it was).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import time
from typing import Any, Optional

import torch

from polytron.model.hf import ConvertError
from polytron.tools.cli import command
from polytron.tools.convert_mha_to_dha import batches, load_source, source_model


def moe_settings(args, run):
    """The run config's model.moe section (defaults and overrides) with the command's counts."""
    from polytron.model.moe.config import MoEConfig
    moe = run.model.moe if isinstance(run.model.moe, MoEConfig) else MoEConfig()
    moe = dataclasses.replace(moe, num_experts=args.experts, top_k=args.top_k, shared_experts=args.shared_experts)
    if getattr(args, "partition", False):
        moe = dataclasses.replace(moe, score="softmax", normalize_top_k=True, route_scale=float(args.top_k))
    return moe


def exactness(moe, partition: bool, noise: float) -> str:
    """What the initial MoE reproduces of the dense model."""
    if partition:
        ok = moe.top_k == moe.num_experts and moe.score == "softmax" and moe.normalize_top_k
        return "exact (all slices chosen, weight 1 each)" if ok else "approximate (top_k < experts drops slices)"
    if noise > 0:
        return "approximate (noise)"
    return "exact (identical experts, renormalized top-k weights)" if moe.normalize_top_k or moe.top_k == 0 \
        else "approximate (model.moe.normalize_top_k=false: combine weights do not sum to 1)"


# ====================================================================== sparse

def sparse(args) -> dict:
    from polytron.model.moe import upcycle as up
    from polytron.tools.convert_checkpoint import check_destination
    if not 0 <= args.noise < math.inf:
        raise ConvertError(f"--noise {args.noise:g}: must be a finite number >= 0")
    run, tensors, origin = load_source(args.src, args.overrides, needs_data=False,
                                       plugins=tuple(args.plugins))  # reads no data
    cfg = up.moe_config(run.model, moe_settings(args, run), args.partition)
    check_destination(args.dst, args.overwrite, [args.src])
    out = up.sparse_upcycle(tensors, cfg, partition=args.partition, noise=args.noise, seed=args.seed)
    report = {"mode": "sparse", "source": origin, "partition": args.partition, "noise": args.noise,
              "moe": dataclasses.asdict(cfg.moe), "initial_output": exactness(cfg.moe, args.partition, args.noise),
              "needs_data": not (run.data.paths or run.data.builtin_corpus)}
    _write(args, run, cfg, out, origin, report, "sparse")
    return report


# ====================================================================== upit

def upit(args) -> dict:
    from polytron.model.moe import upcycle as up
    from polytron.tools.convert_checkpoint import check_destination
    if len(args.srcs) < 2:
        raise ConvertError("upit needs at least two source checkpoints (SRC1 SRC2 ... DST)")
    if args.experts < len(args.srcs):
        raise ConvertError(f"--experts {args.experts} is fewer than the {len(args.srcs)} source checkpoints")
    needs_data = args.router_steps > 0 and not args.seed_data       # seed samples from the run's data
    loaded = [load_source(s, args.overrides, needs_data, tuple(args.plugins)) for s in args.srcs]
    runs_, sources, origins = zip(*loaded)
    up.check_same([r.model for r in runs_], list(sources), list(origins))
    fingerprints = check_same_tokenizer(list(origins), args.allow_tokenizer_change)
    run = runs_[-1]
    cfg = up.moe_config(run.model, moe_settings(args, run), partition=False)
    check_destination(args.dst, args.overwrite, list(args.srcs))
    expansion = up.Expansion(merge=args.merge, weight_range=tuple(args.weight_range), dare_drop=args.dare_drop,
                             mutation_rate=args.mutation_rate, mutation_scale=args.mutation_scale,
                             candidates=args.candidates)
    start = time.perf_counter()
    out, logs, dense = up.upit_tensors(list(sources), cfg, args.experts, expansion, seed=args.seed)
    report: dict[str, Any] = {"mode": "upit", "sources": list(origins), "tokenizer_fingerprints": fingerprints,
              "moe": dataclasses.asdict(cfg.moe),
              "expansion": dataclasses.asdict(expansion), "layers": _expansion_report(logs, args.experts)}
    report["expansion"]["seconds"] = round(time.perf_counter() - start, 2)
    if args.router_steps > 0:
        report["router"] = _pre_optimize(args, run, cfg, out, dense)
    _write(args, run, cfg, out, origins[-1], report, "upit")
    return report


def tokenizer_fingerprint(origin: str) -> Optional[str]:
    """The fingerprint of the tokenizer a source was trained with, None when unknown.

    A checkpoint's recorded ``tokenizer_fingerprint`` (trainer_state.json); for an older
    checkpoint without one, the fingerprint of the tokenizer its run config names (a relative
    path looked up under its run directory, never this directory) when that still loads; for a
    Hugging Face directory, its own tokenizer's when it has one."""
    from polytron.data.errors import DataError
    from polytron.data.tokenizer import load_tokenizer
    from polytron.pretrain import checkpoint as ckpt
    from polytron.tools.convert_checkpoint import resolve_tokenizer
    if os.path.isfile(os.path.join(origin, "config.json")):             # a Hugging Face directory
        path: Optional[str] = origin
    else:
        state = ckpt.read_trainer_state(origin)
        recorded = state.get("tokenizer_fingerprint")
        if isinstance(recorded, str) and recorded:
            return recorded
        config = state.get("config")
        try:
            path = resolve_tokenizer(config if isinstance(config, dict) else {}, None, origin)
        except (DataError, ConvertError, OSError):
            return None
    try:
        return load_tokenizer(path).fingerprint if path else None
    except (DataError, OSError, RuntimeError, ValueError):             # gone or unreadable: unknown
        return None


def check_same_tokenizer(origins: list[str], allow: bool) -> list[Optional[str]]:
    """The sources' tokenizer fingerprints; two that are known and differ are refused (DataError
    naming both), or with ``allow`` noted on stderr. Sources whose tokenizer is unknown are
    compared by vocabulary size only (model.vocab_size, by check_same)."""
    from polytron.data.errors import DataError
    prints = [tokenizer_fingerprint(o) for o in origins]
    known = [(fp, o) for fp, o in zip(prints, origins) if fp]
    for fp, origin in known[1:]:
        if fp != known[0][0]:
            line = (f"tokenizer mismatch: {known[0][1]} was trained with tokenizer {known[0][0]}, {origin} with "
                    f"{fp}")
            if not allow:
                raise DataError(f"{line}; UpIT experts must share one tokenizer (--allow-tokenizer-change "
                                "merges them anyway)")
            print(f"note: {line}; merging them as --allow-tokenizer-change asks", file=sys.stderr)
    return prints


def _expansion_report(logs: dict, n: int) -> list[dict]:
    return [{"layer": i, "offspring": [{"expert": o.index, "parents": list(o.parents), "weight": o.weight,
                                        "distance_to_parents": [round(d, 8) for d in o.distance_to_parents],
                                        "diversity": round(o.diversity, 8)} for o in log]}
            for i, log in logs.items()]


def _pre_optimize(args, run, cfg, tensors: dict, dense: list[dict]) -> dict:
    """Seed samples each expert excels at (by its dense model's loss), split per expert into
    router-training and held-out samples; only the routers train; held-out accuracy reported."""
    from polytron.model.moe import upcycle as up
    pool, _ = batches(seed_run(run, args.seed_data), args.seed_samples)
    _, losses = up.seed_labels([source_model(run.model, t) for t in dense], pool)       # (N, S)
    n = cfg.moe.num_experts
    per = args.per_expert or losses.shape[1] // (2 * n)
    held = max(1, round(per * args.held_out))
    if per - held < 1:
        raise ConvertError(f"--seed-samples {args.seed_samples}: too few to select and hold out seed samples "
                           f"for {n} experts")
    try:
        picks = up.select_seed(losses, per)
    except ValueError as e:
        raise ConvertError(f"--per-expert {per}: {e}") from None
    samples, gen = up.rows(pool), torch.Generator().manual_seed(args.seed)
    train, test = [], []
    for expert, ids in enumerate(picks):
        ids = [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
        train += [(i, expert) for i in ids[held:]]
        test += [(i, expert) for i in ids[:held]]
    train = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
    mb = run.training.micro_batch_size
    tb, ty = up.rebatch([samples[i] for i, _ in train], [e for _, e in train], mb)
    vb, vy = up.rebatch([samples[i] for i, _ in test], [e for _, e in test], mb)
    model = source_model(cfg, tensors)
    before = up.routing_accuracy(model, vb, vy)
    start = time.perf_counter()
    history = up.pre_optimize_routers(model, tb, ty, args.router_steps, args.router_lr)
    sd = model.state_dict()
    for k in tensors:
        if k.endswith("router.weight"):
            tensors[k] = sd[k].detach().clone()
    return {"seed_pool": int(losses.shape[1]), "per_expert": per, "held_out_per_expert": held,
            "argmin_label_counts": torch.bincount(losses.argmin(0), minlength=n).tolist(),
            "mean_loss_per_expert": [round(x, 5) for x in losses.mean(1).tolist()],
            "steps": args.router_steps, "lr": args.router_lr, "seconds": round(time.perf_counter() - start, 2),
            "loss": history, "held_out_accuracy_before": before,
            "held_out_accuracy": up.routing_accuracy(model, vb, vy),
            "held_out_top_k_accuracy": up.routing_accuracy(model, vb, vy, cfg.moe.top_k),
            "held_out_confusion": up.confusion(model, vb, vy, n),
            "train_accuracy": up.routing_accuracy(model, tb, ty),
            "chance": 1.0 / n, "seed_data": list(args.seed_data),
            "argmin_label_counts_per_seed_dataset": _per_source_counts(pool, losses, n)}


def seed_run(run, paths: list[str]):
    """The run config whose training data gives the seed samples: ``run`` itself, or with
    ``--seed-data`` those dataset prefixes (``builtin``: the built-in corpus) blended with
    equal weights, tokenized with the run's tokenizer."""
    if not paths:
        return run
    from polytron.data.builtin import ensure_builtin_corpus
    run = copy.deepcopy(run)
    resolved = []
    for p in paths:
        if p == "builtin":
            run.data.builtin_corpus = True
            p = ensure_builtin_corpus(run.data.cache_dir, run.data.tokenizer_vocab_size).prefix
        resolved.append(p)
    run.data.paths, run.data.weights = resolved, [1.0] * len(resolved)
    run.data.validate()
    return run


def _per_source_counts(pool: list[dict], losses: torch.Tensor, n: int):
    """Lowest-loss expert counts for the samples of each seed dataset (None for one dataset)."""
    if "source" not in pool[0]:
        return None
    source = torch.cat([b["source"] for b in pool]).argmax(-1)                 # (S,)
    label = losses.argmin(0)
    return [torch.bincount(label[source == d], minlength=n).tolist() for d in range(int(source.max()) + 1)]


# ====================================================================== output

def _write(args, run, cfg, tensors: dict, origin: str, report: dict, mode: str) -> None:
    from polytron.tools.convert_checkpoint import write_converted_run
    write_converted_run(args.dst, run, cfg, tensors, origin, suffix=f"{mode}-moe",
                        what=f"upcycled to MoE ({mode}, tools/upcycle.py)", report_name="upcycle_report.json",
                        report=report)


# ====================================================================== CLI

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="routed experts per token (default 2)")
    p.add_argument("--shared-experts", type=int, default=0, help="always-on shared experts (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output in a non-empty DST")
    p.add_argument("overrides", nargs="*", default=[], help="run-config overrides section.key=value")
    from polytron.model.provenance import add_plugin_option
    add_plugin_option(p)                     # plugins a checkpoint lists are imported only when named


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Upcycle dense checkpoints into an MoE checkpoint.")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sparse", help="experts = copies (or a partition) of the dense MLP")
    s.add_argument("src", help="our checkpoint / run directory, or a Hugging Face Llama-family directory")
    s.add_argument("dst", help="output directory")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--noise", type=float, default=0.0, help="expert weight noise, relative to each weight's std")
    g.add_argument("--partition", action="store_true", help="slice the dense inner width into the experts")
    _common(s)
    u = sub.add_parser("upit", help="UpIT: intermediate checkpoints as experts, genetic expansion, "
                                    "router pre-optimization")
    u.add_argument("paths", nargs="+", metavar="SRC... DST", help="K >= 2 dense checkpoints, then the output directory")
    u.add_argument("--merge", choices=("average", "dare"), default="average", help="offspring merge (default average)")
    u.add_argument("--weight-range", type=float, nargs=2, default=[0.2, 0.8], metavar=("LO", "HI"),
                   help="parents' mixing weight drawn uniformly from [LO, HI] (default 0.2 0.8)")
    u.add_argument("--dare-drop", type=float, default=0.5, help="DARE drop rate of the parents' deltas (default 0.5)")
    u.add_argument("--mutation-rate", type=float, default=0.1, help="fraction of elements mutated (default 0.1)")
    u.add_argument("--mutation-scale", type=float, default=0.1, help="mutation std relative to each tensor's std")
    u.add_argument("--candidates", type=int, default=8, help="offspring tried per new expert (default 8)")
    u.add_argument("--seed-samples", type=int, default=64, help="seed sequences for router labels (default 64)")
    u.add_argument("--seed-data", nargs="+", default=[], metavar="PREFIX",
                   help="dataset prefixes (tokenized with the run's tokenizer; 'builtin': the built-in corpus) "
                        "blended equally for the seed samples (default: the run config's training data)")
    u.add_argument("--per-expert", type=int, default=0,
                   help="seed samples selected per expert (default: seed-samples / (2 x experts))")
    u.add_argument("--held-out", type=float, default=0.25, help="fraction of each expert's seed samples held out "
                   "for the accuracy (default 0.25)")
    u.add_argument("--router-steps", type=int, default=50, help="router pre-optimization steps; 0 skips (default 50)")
    u.add_argument("--router-lr", type=float, default=0.01, help="router pre-optimization Adam lr (default 0.01)")
    u.add_argument("--allow-tokenizer-change", action="store_true",
                   help="merge checkpoints trained with different tokenizers (refused by default)")
    _common(u)
    args, rest = p.parse_known_args(argv)
    unknown = [x for x in rest if x.startswith("-") or "=" not in x]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + rest
    if args.mode == "upit":
        paths = [x for x in args.paths]
        args.overrides = [x for x in paths if "=" in x] + args.overrides
        paths = [x for x in paths if "=" not in x]
        if len(paths) < 2:
            p.error("upit needs SRC1 SRC2 ... DST")
        args.srcs, args.dst = paths[:-1], paths[-1]
        args.overrides += [x for x in args.seed_data if "=" in x]
        args.seed_data = [x for x in args.seed_data if "=" not in x]
    return args


def _check_args(args) -> None:
    if args.experts < 1 or args.top_k < 1 or args.shared_experts < 0:
        raise ConvertError("--experts and --top-k must be >= 1, --shared-experts >= 0")
    if args.top_k > args.experts:
        raise ConvertError(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.mode == "upit":
        lo, hi = args.weight_range
        if not (0 <= lo <= hi <= 1) or not (0 <= args.dare_drop < 1) or not (0 <= args.mutation_rate <= 1):
            raise ConvertError("--weight-range must lie in [0, 1] (LO <= HI), --dare-drop in [0, 1), "
                               "--mutation-rate in [0, 1]")
        if not (0 <= args.mutation_scale < math.inf and 0 < args.router_lr < math.inf):
            raise ConvertError(f"--mutation-scale {args.mutation_scale:g} / --router-lr {args.router_lr:g}: need a "
                               "finite mutation scale >= 0 and a finite router learning rate > 0")
        if args.candidates < 1 or args.seed_samples < 2 or not (0 < args.held_out < 1) or args.router_steps < 0 \
                or args.per_expert < 0:
            raise ConvertError("--candidates >= 1, --seed-samples >= 2, --held-out in (0, 1), --router-steps >= 0, "
                               "--per-expert >= 0")


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    _check_args(args)
    report = sparse(args) if args.mode == "sparse" else upit(args)
    moe = report["moe"]
    print(f"wrote {report['mode']} MoE checkpoint {os.path.join(args.dst, 'checkpoint')} "
          f"({moe['num_experts']} experts, top-{moe['top_k']}, {moe['shared_experts']} shared) "
          f"and run config {os.path.join(args.dst, 'config.yaml')}")
    if report.get("needs_data"):
        print(f"note: the run config names no training data; train with data.paths=[PREFIX] (data tokenized "
              f"with the source's tokenizer): python launch/pretrain.py --config "
              f"{os.path.join(args.dst, 'config.yaml')} data.paths=[PREFIX]")
    if "router" in report:
        r = report["router"]
        print(f"router pre-optimization: held-out routing accuracy {r['held_out_accuracy']:.3f} "
              f"(before {r['held_out_accuracy_before']:.3f}, chance {r['chance']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
