#!/usr/bin/env python
"""Convert a trained MHA/GQA model into decoupled-head attention (DHA), within a KV-head budget.

    python tools/convert_mha_to_dha.py SRC DST --budget 0.25 [section.key=value ...]
    python tools/convert_mha_to_dha.py SRC DST --layer-budget 4,2,2,1 [--init mean] [...]

SRC is one of our checkpoints (a checkpoint directory, a checkpoint root or a run's
output directory: its newest complete checkpoint) or a local Hugging Face Llama-family
directory (``config.json`` + safetensors). The calibration and validation batches come
from the data of the run config: the checkpoint's own run config, or for a Hugging Face
directory a fresh one with the directory's tokenizer (``training.global_batch_size`` 0:
auto, the micro-batch size), so ``data.paths=[PREFIX]`` (data tokenized with it) must be
given. Trailing ``section.key=value`` overrides change that run config, and with it the
written continued pre-training config. A checkpoint whose recorded tokenizer fingerprint
is not that of the ``data.tokenizer`` its config now names is refused (the written
checkpoint records the config's tokenizer); ``data.tokenizer=PATH`` given here is used as
asked, with a note.

Steps (model/dha/fusion.py; docs/dha.md): per layer, separately for keys and values,
the similarity of the source heads on ``--calib-samples`` calibration sequences; groups
chosen by least fusion residual until the budget is met (``--budget F``: a fraction of
all source key+value heads, allocated across layers and kinds; ``--layer-budget``: KV
heads per layer); each group initialized by adaptive fusion (``--init fused``: fusion
weights trained on the calibration set for ``--fusion-steps`` steps) or by mean pooling
(``--init mean``, the GQA initialization). ``--grouping contiguous`` takes GQA's
contiguous groups of equal size instead of the searched ones.

DST receives ``checkpoint/`` (weights-only), ``config.yaml`` (continued pre-training
from it: ``python launch/pretrain.py --config DST/config.yaml``) and ``dha_report.json``
(groups, similarities, fusion history, validation losses of the source, of mean
pooling and of the result, KV-cache bytes per token). DST must be new or empty unless
``--overwrite``; the output is staged beside DST and moved in when complete.

Exit status 0; 2 with one ``error:`` line naming the bad input (a ``config.json`` that is
no JSON object, a budget or learning rate that is NaN or infinite); 1 with one line when
writing fails (a full disk: DST is left as it was).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import sys
import time

import torch

from polytron.model.hf import ConvertError
from polytron.tools.cli import command

# ====================================================================== source

def load_source(src: str, overrides: list[str], needs_data: bool = True, plugins: tuple[str, ...] = ()):
    """(run config, source tensors, origin): our checkpoint or a Hugging Face directory.
    ``needs_data=False`` (a conversion that reads no data) accepts a run config without
    ``data.paths``; the written config then needs them when training starts."""
    from polytron.model.configlib import apply_override, parse_override
    from polytron.pretrain import checkpoint as ckpt
    from polytron.pretrain.config import RunConfig
    if os.path.isfile(os.path.join(src, "config.json")):
        from polytron.model.hf import find_adapter, read_hf_config
        from polytron.tools.convert_checkpoint import hf_config_to_model, read_safetensors
        hf_cfg, cfg_file = read_hf_config(src)
        mcfg = hf_config_to_model(hf_cfg, cfg_file)
        tensors = find_adapter(hf_cfg.get("model_type"), cfg_file).from_hf_tensors(mcfg, read_safetensors(src), src)
        run = RunConfig(model=mcfg)
        run.data.tokenizer = os.path.abspath(src)
        run.data.seq_len = min(2048, mcfg.max_seq_len)
        run_dict = run.to_dict()
        origin, path = os.path.abspath(src), None
    else:
        path = ckpt.resolve_checkpoint(src)
        state = ckpt.read_trainer_state(path)
        stored = state.get("config")
        if not isinstance(stored, dict):
            raise ConvertError(f"{path}: the checkpoint records no run config")
        run_dict = stored
        from polytron.model.provenance import check_plugins  # a checkpoint is data: its plugins need --plugin
        check_plugins(run_dict.get("model"), plugins, f"checkpoint {path}")
        tensors = ckpt.load_tensors(path)
        origin = path
    given = set()
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(run_dict, keys, absolute_override(keys, value))
        given.add(tuple(keys))
    if path:
        anchor_stored_paths(run_dict, path)
        check_trained_tokenizer(run_dict, state.get("tokenizer_fingerprint"), path, ("data", "tokenizer") in given)
    return validated(run_dict, needs_data), tensors, origin


def check_trained_tokenizer(run_dict: dict, recorded, ckpt_path: str, explicit: bool) -> None:
    """The converted checkpoint records the fingerprint of ``data.tokenizer`` (and training
    checks against it), so that tokenizer must be the one checkpoint ``ckpt_path`` was
    trained with (``recorded``): a stored one that is not is refused naming both; one given
    on this command line (``explicit``) is used as asked, with a note. Nothing to compare
    when the checkpoint records no fingerprint or the tokenizer does not load."""
    from polytron.data.errors import DataError
    from polytron.data.tokenizer import fingerprint_of
    data = run_dict.get("data")
    tok = data.get("tokenizer") if isinstance(data, dict) else None
    if not isinstance(recorded, str) or not recorded or not isinstance(tok, str) or not tok:
        return
    try:
        now = fingerprint_of(tok)
    except (DataError, OSError):
        return                                   # validation or training names the unreadable file
    if now == recorded:
        return
    line = (f"tokenizer mismatch: checkpoint {ckpt_path} was trained with tokenizer {recorded}, "
            f"data.tokenizer {tok} is {now}")
    if not explicit:
        raise ConvertError(f"{line}; give data.tokenizer=PATH on the command line (the tokenizer it was trained "
                           "with, or another one deliberately)")
    print(f"note: {line}; using it as data.tokenizer= asks", file=sys.stderr)


def anchor_stored_paths(run_dict: dict, ckpt_path: str) -> None:
    """Relative data paths an older run stored (``data.tokenizer``, ``data.cache_dir``,
    ``data.paths``) are looked up under its run directory, never this directory; one that is
    not there is bad input naming the key (give it on the command line instead)."""
    from polytron.tools.convert_checkpoint import run_directories
    data = run_dict.get("data")
    if not isinstance(data, dict):
        return
    bases = run_directories(run_dict, ckpt_path)

    def anchor(value, key: str):
        path = os.path.expanduser(value) if isinstance(value, str) else value
        if not isinstance(path, str) or not path or os.path.isabs(path):
            return path
        for base in bases:
            if glob.glob(glob.escape(os.path.join(base, path)) + "*"):    # a file, or a dataset prefix
                return os.path.join(base, path)
        raise ConvertError(f"checkpoint {ckpt_path} stores the relative path data.{key}={value!r} (not found "
                           f"under {', '.join(bases)}); it is not resolved against this directory: give "
                           f"data.{key}=... on the command line")
    for key in ("tokenizer", "cache_dir"):
        if key in data:
            data[key] = anchor(data[key], key)
    if isinstance(data.get("paths"), list):
        data["paths"] = [anchor(p, "paths") for p in data["paths"]]


#: Run-config keys that hold paths.
PATH_KEYS = {("data", "paths"), ("data", "tokenizer"), ("data", "cache_dir"), ("checkpoint", "load"),
             ("checkpoint", "dir"), ("training", "output_dir")}


def absolute_override(keys: list[str], value):
    """A path given on this command line means this directory: made absolute before the
    written config and checkpoint store it (whoever reads them later, from wherever)."""
    if tuple(keys) not in PATH_KEYS:
        return value

    def one(p):
        return os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and p else p
    return [one(p) for p in value] if isinstance(value, list) else one(value)


def validated(run_dict: dict, needs_data: bool):
    """The typed run config of ``run_dict``, validated; without ``needs_data`` an empty
    ``data.paths`` (no data given) is accepted and kept empty."""
    import copy

    from polytron.model.configlib import from_dict
    from polytron.pretrain.config import RunConfig
    run = from_dict(RunConfig, run_dict)
    if needs_data or run.data.paths or run.data.builtin_corpus:
        run.validate()
    else:
        probe = copy.deepcopy(run)
        probe.data.builtin_corpus = True           # every other setting is still checked
        probe.validate()
    return run


def check_source(mcfg) -> None:
    """The converter fuses the K/V heads of the dense attention of plain projections."""
    if mcfg.attention != "gqa" or mcfg.linear != "linear":
        raise ConvertError(f"source model: attention={mcfg.attention}, linear={mcfg.linear}; the conversion "
                           "reads MHA/GQA attention (model.attention=gqa) with plain linear projections")


def source_model(mcfg, tensors: dict):
    from polytron.model.transformer import build_model
    model = build_model(mcfg, "cpu", seed=0)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.float().eval()


# ====================================================================== data

def batches(run, calib_samples: int) -> tuple[list[dict], list[dict]]:
    """(calibration micro-batches from the training split, validation micro-batches: the ones
    the trainer evaluates on with this run config)."""
    from polytron.data import build_data
    t = run.training
    global_batch = t.global_batch_size or t.micro_batch_size      # 0: auto, micro x data-parallel size (1)
    steps = max(1, math.ceil(calib_samples / global_batch))
    has_valid = _split_has_valid(run.data.split)
    data = build_data(run.data, model_vocab_size=run.model.vocab_size, seed=t.seed,
                      global_batch_size=global_batch, micro_batch_size=t.micro_batch_size,
                      dp_rank=0, dp_size=1, train_iterations=steps, eval_iterations=t.eval_iters,
                      eval_interval=1 if has_valid else 0)
    calib: list[dict] = []
    try:
        while sum(b["tokens"].shape[0] for b in calib) < calib_samples:
            calib += data.train.next_step()
    finally:
        data.train.close()
    valid = list(data.valid_batches(t.eval_iters)) if has_valid else []
    return calib, valid


def _split_has_valid(split: str) -> bool:
    parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    return len(parts) > 1 and parts[1] > 0


# ====================================================================== conversion

def plan_groups(args, mcfg):
    """The grouping rule for ``args``' budget, checked before any data is read: a function
    grams -> groups per (layer, kind)."""
    from polytron.model.dha import fusion
    L, H = mcfg.num_layers, mcfg.num_kv_heads
    if args.grouping == "contiguous":
        counts = _uniform_counts(args, L, H)
        return lambda grams: {(layer, kind): fusion.contiguous_groups(H, counts[layer])
                              for layer in range(L) for kind in fusion.KINDS}
    try:
        pools = (fusion.layer_pools(args.layer_budget, L, H) if args.layer_budget
                 else fusion.fraction_pool(args.budget, L, H))
    except ValueError as e:
        raise ConvertError(str(e)) from None
    return lambda grams: fusion.choose_groups(grams, pools)


def _uniform_counts(args, L: int, H: int) -> list[int]:
    per = args.layer_budget or [args.budget * H] * L
    counts = [int(round(n)) for n in per]
    if any(abs(n - c) > 1e-6 or c < 1 or H % c for n, c in zip(per, counts)):
        raise ConvertError(f"--grouping contiguous needs a whole number of heads per layer dividing the source's "
                           f"{H} KV heads (got {[f'{n:g}' for n in per]})")
    return counts


def convert(args) -> dict:
    """Run the conversion; returns the report (also written to DST)."""
    from polytron.model.accounting import kv_cache_bytes_per_token
    from polytron.model.config import ModelConfig  # noqa: F401  (config classes for replace)
    from polytron.model.dha import fusion
    from polytron.model.dha.config import DHAConfig
    from polytron.tools.convert_checkpoint import check_destination
    torch.manual_seed(args.seed)
    run, tensors, origin = load_source(args.src, args.overrides, plugins=tuple(args.plugins))
    mcfg = run.model
    check_source(mcfg)
    choose = plan_groups(args, mcfg)
    check_destination(args.dst, args.overwrite, [args.src])
    calib, valid = batches(run, args.calib_samples)
    model = source_model(mcfg, tensors)
    report = {"source": origin, "budget": args.layer_budget or args.budget, "init": args.init,
              "grouping": args.grouping, "calib_samples": sum(b["tokens"].shape[0] for b in calib),
              "valid_samples": sum(b["tokens"].shape[0] for b in valid)}
    report["loss_source"] = fusion.eval_loss(model, valid) if valid else None
    grams = fusion.head_grams(model, [b["tokens"] for b in calib], mcfg.head_dim)
    groups = choose(grams)
    report["layers"] = _layer_report(grams, groups)
    fusing = fusion.install(model, groups, mcfg.head_dim)
    lists = fusion.dha_lists(groups, mcfg.num_layers, mcfg.num_heads, mcfg.num_kv_heads)
    dha_cfg = dataclasses.replace(mcfg, arch="dha", attention="dha", dha=DHAConfig(**lists))
    dha_cfg.validate()
    mean = fusion.merged_tensors(tensors, fusing)             # Omega = I: mean pooling
    report["loss_mean_pooling"] = _eval(dha_cfg, mean, valid)
    if args.init == "fused":
        start = time.perf_counter()
        log = fusion.fuse(model, [fp for _, fp in fusing.values()], calib, args.fusion_steps, lr=args.fusion_lr)
        report["fusion"] = {"steps": args.fusion_steps, "seconds": round(time.perf_counter() - start, 2),
                            "lm_loss": log.loss, "distance": log.distance, "target": log.target}
        out = fusion.merged_tensors(tensors, fusing)
        report["loss_fused"] = _eval(dha_cfg, out, valid)
    else:
        out = mean
    dtype = next(iter(tensors.values())).dtype
    src_kv, dha_kv = kv_cache_bytes_per_token(mcfg, dtype), kv_cache_bytes_per_token(dha_cfg, dtype)
    report["kv_cache_bytes_per_token"] = {"dtype": str(dtype).replace("torch.", ""), "source": src_kv,
                                          "dha": dha_kv, "ratio": dha_kv / src_kv}
    report["model_dha"] = dataclasses.asdict(dha_cfg.dha)
    _write(args, run, dha_cfg, out, origin, report)
    return report


def _layer_report(grams: dict, groups: dict) -> list[dict]:
    from polytron.model.dha import fusion
    layers = sorted({layer for layer, _ in grams})
    out = []
    for layer in layers:
        entry = {"layer": layer}
        for kind in fusion.KINDS:
            g = grams[(layer, kind)]
            entry[kind] = {"groups": groups[(layer, kind)],
                           "similarity": [[round(float(x), 4) for x in row] for row in fusion.cosine(g)],
                           "residual": round(sum(fusion.fusion_residual(g, m) for m in groups[(layer, kind)])
                                             / max(float(g.trace()), 1e-30), 6)}
        out.append(entry)
    return out


def _eval(cfg, tensors: dict, valid: list[dict]):
    if not valid:
        return None
    from polytron.model.dha import fusion
    return fusion.eval_loss(source_model(cfg, tensors), valid)


def _write(args, run, dha_cfg, tensors: dict, origin: str, report: dict) -> None:
    from polytron.tools.convert_checkpoint import write_converted_run
    write_converted_run(args.dst, run, dha_cfg, tensors, origin, suffix="dha",
                        what="converted to DHA (tools/convert_mha_to_dha.py)", report_name="dha_report.json",
                        report=report)


# ====================================================================== CLI

def _budget_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated KV heads per layer, e.g. 4,2,2,1") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert an MHA/GQA checkpoint or Hugging Face Llama directory to DHA.")
    p.add_argument("src", help="our checkpoint / run directory, or a Hugging Face Llama-family directory")
    p.add_argument("dst", help="output directory (checkpoint/, config.yaml, dha_report.json)")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget", type=float, help="fraction of the source's key+value heads to keep, e.g. 0.25")
    b.add_argument("--layer-budget", type=_budget_list, help="KV heads per layer, e.g. 4,2,2,1")
    p.add_argument("--init", choices=("fused", "mean"), default="fused",
                   help="group heads from adaptive fusion (default) or mean pooling")
    p.add_argument("--grouping", choices=("similarity", "contiguous"), default="similarity",
                   help="groups from the similarity search (default) or GQA's contiguous blocks")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--fusion-steps", type=int, default=200, help="fusion optimizer steps (default 200)")
    p.add_argument("--fusion-lr", type=float, default=0.01, help="fusion learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in a non-empty DST")
    p.add_argument("overrides", nargs="*", help="run-config overrides section.key=value (e.g. data.paths=[P])")
    from polytron.model.provenance import add_plugin_option
    add_plugin_option(p)                     # plugins a checkpoint lists are imported only when named
    return p.parse_intermixed_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse counts and numbers no conversion can use (NaN and infinity included), naming the option."""
    if args.calib_samples < 1 or args.fusion_steps < 0:
        raise ConvertError("--calib-samples must be >= 1 and --fusion-steps >= 0")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise ConvertError(f"--budget {args.budget:g}: a fraction of the source's key+value heads, in (0, 1]")
    for i, n in enumerate(args.layer_budget or []):
        if not math.isfinite(n):
            raise ConvertError(f"--layer-budget entry {i} = {n:g}: KV heads of the layer, a finite number")
    if not 0 < args.fusion_lr < math.inf:
        raise ConvertError(f"--fusion-lr {args.fusion_lr:g}: must be a finite number > 0")


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_args(args)
    report = convert(args)
    kv = report["kv_cache_bytes_per_token"]
    losses = " | ".join(f"{k[5:]} {v:.4f}" for k, v in report.items() if k.startswith("loss_") and v is not None)
    print(f"wrote DHA checkpoint {os.path.join(args.dst, 'checkpoint')} and run config "
          f"{os.path.join(args.dst, 'config.yaml')}")
    print(f"kv cache {kv['dha']} B/token ({kv['dtype']}) vs source {kv['source']} ({kv['ratio']:.1%})"
          + (f" | validation loss: {losses}" if losses else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
