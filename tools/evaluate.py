#!/usr/bin/env python
"""Run lm-evaluation-harness tasks on a checkpoint, with our model serving the requests.

    python tools/evaluate.py CHECKPOINT --tasks TASK[,TASK...] [--include-path DIR ...]
                             [--limit N] [--num-fewshot K] [--batch-size 16] [--device cpu]
                             [--tokenizer PATH] [--output FILE] [--seed 1234] [--no-progress]
                             [--plugin MODULE ...]

CHECKPOINT is a checkpoint directory, a checkpoint root or a run directory (its newest complete
checkpoint), saved with any layout, of any registered architecture (BitNet latent weights
included), or a packed BitNet Hugging Face directory (``convert_checkpoint.py to-hf --packed``).
The full model is built in this one process (:mod:`pretrain.lm_eval_model`): log-likelihood
requests are batched by length, ``generate_until`` decodes greedily through the model's own
inference cache. A TASK is a task name of the harness (built-in tasks download their data), a
name defined in an ``--include-path`` directory, or the path of a task YAML file or of a
directory of them (every task it defines): local tasks run offline (docs/evaluation.md).

A progress bar shows the requests; the harness's results table is printed, and its results JSON
is written beside the checkpoint (``<checkpoint>.lm_eval.json``, or ``--output``). The numbers
equal the harness's Hugging Face backend on the model exported with ``to-hf``.

Exit status 0; 2 with one ``error:`` line for bad input (no such checkpoint or task, a task file
that does not load, no harness installed: ``pip install -e '.[eval]'``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

from polytron.model.errors import BadInput
from polytron.model.provenance import add_plugin_option  # light: no torch
from polytron.tools.cli import command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a polytron checkpoint with lm-evaluation-harness tasks.")
    p.add_argument("checkpoint", help="checkpoint directory, checkpoint root, run directory or packed BitNet "
                                      "Hugging Face directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names, task YAML files or directories")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="directory of local task YAML files (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="at most N documents per task (0: all)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward (default 16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the run's")
    p.add_argument("--output", help="results JSON path (default: <checkpoint>.lm_eval.json)")
    p.add_argument("--seed", type=int, default=1234, help="harness seed (few-shot sampling)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every document's requests and responses into the results JSON")
    add_plugin_option(p)
    return p.parse_args(argv)


def harness() -> Any:
    """The lm_eval package, or one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise BadInput(f"lm-evaluation-harness is not installed ({e}): pip install -e '.[eval]'") from None
    return lm_eval


def build_lm(args: argparse.Namespace, source: tuple):
    """The harness model of ``source`` = (config, tokenizer, loader(device))."""
    from polytron.pretrain.lm_eval_model import ModelScorer, PolytronLM
    from polytron.tools.generate import _device
    cfg, tok, load = source
    if tok.vocab_size > cfg.vocab_size:
        raise BadInput(f"tokenizer {tok.path} has {tok.vocab_size} tokens, the model only {cfg.vocab_size} "
                       "embeddings: not the tokenizer this model was trained with")
    model = load(_device(args.device))
    return PolytronLM(ModelScorer(model, batch_size=args.batch_size), tok, show_progress=not args.no_progress)


def evaluate(args: argparse.Namespace) -> tuple[str, dict]:
    """(checkpoint path, the harness's results) of the run ``args`` asks for."""
    if args.limit < 0 or args.batch_size < 1:
        raise BadInput("--limit must be >= 0 and --batch-size >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lm_eval = harness()
    from polytron.pretrain.checkpoint.discovery import read_newest
    from polytron.pretrain.evaluation import TaskError, load_tasks
    from polytron.tools.generate import checkpoint_model, packed_model
    try:
        tasks = load_tasks([t for t in args.tasks.split(",") if t], args.include_path)
    except TaskError as e:
        raise BadInput(str(e)) from None
    if os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        path, lm = args.checkpoint, build_lm(args, packed_model(args.checkpoint, args.tokenizer))
    else:
        path, lm = read_newest(args.checkpoint, lambda p: build_lm(
            args, checkpoint_model(p, args.tokenizer, tuple(args.plugins))))
    from lm_eval.evaluator import evaluate as run_tasks
    for task in _leaves(tasks):
        if args.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=args.num_fewshot)
        task.set_fewshot_seed(seed=args.seed)
    results = run_tasks(lm=lm, task_dict=tasks, limit=args.limit or None, bootstrap_iters=0,
                        log_samples=args.log_samples, verbosity="ERROR")
    results["config"] = {"model": "polytron", "model_args": os.path.abspath(path), "limit": args.limit or None,
                         "num_fewshot": args.num_fewshot, "batch_size": args.batch_size, "device": args.device,
                         "lm_eval_version": getattr(lm_eval, "__version__", "?")}
    return path, results


def _leaves(task_dict: dict) -> list:
    """The task objects of a (possibly grouped) task dict."""
    out = []
    for value in task_dict.values():
        out += _leaves(value) if isinstance(value, dict) else [value]
    return out


def write_results(results: dict, path: str) -> None:
    from lm_eval.utils import handle_non_serializable
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    os.replace(tmp, path)


def output_path(checkpoint: str, output: Optional[str]) -> str:
    return output or os.path.normpath(os.path.abspath(checkpoint)) + ".lm_eval.json"


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    path, results = evaluate(args)
    from lm_eval.utils import make_table
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    out = output_path(path, args.output)
    write_results(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
