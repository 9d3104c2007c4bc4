#!/usr/bin/env python
"""Continue a prompt with a trained checkpoint, on one device.

    python tools/generate.py CHECKPOINT --prompt "text" [--max-new-tokens 50] [--temperature 0.8]
                             [--top-p 0.95] [--seed 0] [--tokenizer PATH] [--no-cache] [--no-bos]
                             [--device cpu] [--plugin MODULE ...]
    torchrun --nproc-per-node N tools/generate.py CHECKPOINT --prompt "text" --context-parallel N ...

CHECKPOINT is a checkpoint directory (``.../iter_0000300``), a checkpoint root or a
run's output directory (its newest complete checkpoint), or a packed BitNet Hugging Face
directory (``convert_checkpoint.py to-hf --packed``; its tokenizer, weights kept packed). The model config comes from
the checkpoint's ``trainer_state.json``, the full weights are read in this one
process, and the tokenizer is the one the run trained with (``data.tokenizer`` or the
built-in corpus's) unless ``--tokenizer`` names another. The prompt is encoded with
the tokenizer's BOS token when it has one (``--no-bos`` leaves it out); generation
stops at the end-of-sequence token or after ``--max-new-tokens``. Greedy by default
(``--temperature 0``). Prints the prompt followed by the decoded continuation.

``--context-parallel N`` (under ``torchrun --nproc-per-node N``; gloo on CPU, NCCL on
CUDA, each rank on ``cuda:<local rank>``) prefills the prompt under context parallelism
over the N processes (``parallel/context_prefill.py``: every rank runs its chunks of the
prompt and then holds the whole cache); every rank then decodes the same tokens in one
process's form, and rank 0 prints them. The text equals the one-process run's.

The checkpoint is data: ``model.plugins`` it lists are imported only when named with
``--plugin``, else refused; a relative ``data.tokenizer`` it stores is looked up under its
run directory, never the current one; a recorded ``tokenizer_fingerprint`` must match the
tokenizer (an explicit ``--tokenizer`` that differs is used with a note). A tokenizer
smaller than the model's vocabulary: ids it lacks are never generated. On a live run
directory a checkpoint deleted by retention while being read is replaced by the newest
complete one left (docs/checkpoints.md, "What the tools trust and verify").

Exit status 0; 2 with one ``error:`` line for bad input (no such checkpoint, a
corrupt one, no tokenizer, a request longer than the model's ``max_seq_len``, a
temperature or top-p that is NaN, infinite or out of range, a device that holds no data).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Any, Iterator, Optional

from polytron.model.errors import BadInput
from polytron.model.provenance import UntrustedCode, add_plugin_option  # light: no torch
from polytron.tools.cli import command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Continue a prompt with a polytron checkpoint.")
    p.add_argument("checkpoint", help="checkpoint directory, checkpoint root or run directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the run's (SentencePiece .model "
                                       "or Hugging Face directory)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with the BOS token")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="prefill the prompt under context parallelism over N processes "
                        "(run under torchrun --nproc-per-node N; rank 0 prints)")
    add_plugin_option(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Sampling settings a generation can use (NaN and infinities included)."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise BadInput(f"--temperature {args.temperature}: must be a finite number >= 0 (0: greedy)")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise BadInput(f"--top-p {args.top_p}: must be a number in (0, 1]")
    if args.max_new_tokens < 0:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    if args.context_parallel < 1:
        raise BadInput(f"--context-parallel {args.context_parallel}: must be >= 1")
    if args.context_parallel > 1 and args.no_cache:
        raise BadInput("--context-parallel fills the inference cache: it cannot run with --no-cache")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.context_parallel > 1 and world != args.context_parallel:
        raise BadInput(f"--context-parallel {args.context_parallel} runs under torchrun --nproc-per-node "
                       f"{args.context_parallel} (this run has {world} process{'es' if world > 1 else ''})")


@contextlib.contextmanager
def context_parallel_group(args: argparse.Namespace) -> Iterator[Any]:
    """The process group of ``--context-parallel N`` (None for 1): every process of the run,
    initialized here (gloo on CPU, NCCL on CUDA) unless the caller already did."""
    if args.context_parallel == 1:
        yield None
        return
    import torch.distributed as dist
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        yield dist.group.WORLD
    finally:
        if owned:
            dist.destroy_process_group()


# ---------------------------------------------------------------- model

def model_config(state: dict, path: str, plugins: tuple[str, ...] = ()):
    """The validated ModelConfig a checkpoint's trainer state records. Only ``plugins``
    (the user's ``--plugin`` names) are imported; a checkpoint listing others is refused."""
    from polytron.model.configlib import ConfigError
    from polytron.model.provenance import trusted_model_config
    try:
        run_cfg = state["config"]
        cfg = trusted_model_config(run_cfg.get("model"), plugins, f"checkpoint {path}")
    except UntrustedCode:
        raise
    except (KeyError, TypeError, AttributeError, ConfigError) as e:
        raise BadInput(f"{os.path.join(path, 'trainer_state.json')}: no usable model config ({e})") from None
    return cfg


def load_model(path: str, cfg, device: str):
    """Meta build, materialize on ``device``, copy the checkpoint's full tensors in."""
    import torch

    from polytron.model.layers import rope_table
    from polytron.model.protocols import InitBuffers
    from polytron.model.transformer import Transformer
    from polytron.pretrain import checkpoint as ckpt
    tensors = ckpt.load_tensors(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    _check_names(path, model, tensors)
    model.to_empty(device=device)
    model.tie_weights()
    model.rope = rope_table(cfg, device=model.rope.device)       # non-persistent: not in checkpoints
    for module in model.modules():
        if isinstance(module, InitBuffers):
            module.init_buffers()
    model.load_state_dict(tensors, strict=False)                 # names checked above
    model.tie_weights()
    return model.eval()


def _check_names(path: str, model, tensors: dict) -> None:
    """The checkpoint holds every model tensor at its shape; a tied parameter may be saved
    only under the name it shares storage with."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    shared = dict(model.spec.tied(model.cfg))                 # parameter -> its source
    for name, shape in expected.items():
        if name not in have and shared.get(name) not in have:
            raise BadInput(f"checkpoint {path} does not match its model config: tensor '{name}' is missing")
        if name in have and have[name] != shape:
            raise BadInput(f"checkpoint {path} does not match its model config: tensor '{name}' has shape "
                           f"{have[name]}, the config gives {shape}")
    extra = sorted(set(have) - set(expected))
    if extra:
        raise BadInput(f"checkpoint {path} does not match its model config: unexpected tensor '{extra[0]}'")


# ---------------------------------------------------------------- tokenizer

def load_run_tokenizer(run_cfg: dict, override: Optional[str], ckpt_path: Optional[str] = None,
                       fingerprint: Optional[str] = None):
    """The tokenizer the run trained with (or ``override``). A relative ``data.tokenizer``
    is looked up under the run directory of ``ckpt_path``, never this process's working
    directory; ``fingerprint`` (the checkpoint's ``tokenizer_fingerprint``) must match unless
    ``override`` names the tokenizer (then a mismatch is a note on stderr)."""
    from polytron.tools.convert_checkpoint import checkpoint_tokenizer
    tok = checkpoint_tokenizer({"config": run_cfg, "tokenizer_fingerprint": fingerprint}, ckpt_path, override)
    if tok is None:
        raise BadInput("the run names no tokenizer (no data.tokenizer, no built-in corpus); pass --tokenizer PATH")
    return tok


def limit_vocabulary(model, size: int) -> None:
    """Ids the tokenizer lacks (embedding rows past its ``size``, e.g. padding) are never
    generated: their logits become -inf (a hook on the head, which a context-parallel
    prefill runs too)."""
    import torch
    if size >= model.cfg.vocab_size:
        return

    def mask(_module, _inputs, logits):
        return logits.index_fill(-1, torch.arange(size, logits.shape[-1], device=logits.device), float("-inf"))

    head = next(module for unit, module in model.unit_modules() if unit.kind == "head")
    head.register_forward_hook(mask)


def bos_id(tok: Any) -> Optional[int]:
    """The tokenizer's beginning-of-sequence id, or None when it has none."""
    sp = getattr(tok, "_sp", None)
    if sp is not None:
        return int(sp.bos_id()) if sp.bos_id() >= 0 else None
    hf = getattr(tok, "_tok", None)
    return getattr(hf, "bos_token_id", None)


def continuation_text(tok: Any, prompt: str, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The prompt as typed plus the decoded new tokens (decoded in context, so word-initial
    spaces survive)."""
    before = tok.decode(prompt_ids)
    after = tok.decode(prompt_ids + new_ids)
    return prompt + (after[len(before):] if after.startswith(before) else tok.decode(new_ids))


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> str:
    """Everything after argument parsing; returns the text to print. On a live run
    directory, a checkpoint that retention removes while it is read is replaced by the
    newest complete one that still exists."""
    from polytron.pretrain.checkpoint.discovery import read_newest
    check_args(args)
    with context_parallel_group(args) as group:
        if os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            return continue_prompt(args, packed_model(args.checkpoint, args.tokenizer), group)
        return read_newest(args.checkpoint, lambda path: continue_prompt(
            args, checkpoint_model(path, args.tokenizer, tuple(args.plugins)), group))[1]


def continue_prompt(args: argparse.Namespace, source: tuple, group: Any = None) -> str:
    """The prompt and its continuation by the model ``load(device)`` of ``source`` = (config,
    tokenizer, load) builds; with a process ``group`` the prompt's prefill runs under context
    parallelism over it."""
    import torch
    cfg, tok, load = source

    from polytron.model.generate import check_length, generate
    from polytron.parallel.context_prefill import context_parallel_prefill
    if tok.vocab_size > cfg.vocab_size:
        raise BadInput(f"tokenizer {tok.path} has {tok.vocab_size} tokens, the model only {cfg.vocab_size} "
                       "embeddings: not the tokenizer this model was trained with")
    bos = None if args.no_bos else bos_id(tok)
    text_ids = tok.encode(args.prompt)
    ids = ([bos] if bos is not None else []) + text_ids
    if not ids:
        raise BadInput("the prompt encodes to no tokens and the tokenizer has no BOS token to start from")
    check_length(len(ids), args.max_new_tokens, cfg.max_seq_len)             # before loading weights
    device = _device(args.device)
    if group is not None and device == "cuda":
        device = _device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")      # one GPU per rank
    model = load(device)
    limit_vocabulary(model, tok.vocab_size)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)          # (1, T0)
    use_cache = not args.no_cache
    if group is not None and model.spec.make_cache is None:
        raise BadInput(f"architecture {cfg.arch!r} declares no inference cache: --context-parallel fills one")
    if use_cache and model.spec.make_cache is None:
        print(f"note: architecture {cfg.arch!r} declares no inference cache; recomputing every step",
              file=sys.stderr)
        use_cache = False
    prefill = context_parallel_prefill(group) if group is not None else None
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                   use_cache=use_cache, eos_id=tok.eod_id, prefill=prefill)
    new = [t for t in out[0, len(ids):].tolist() if t != tok.eod_id]
    return continuation_text(tok, args.prompt, text_ids, new)


def checkpoint_model(path: str, tokenizer: Optional[str], plugins: tuple[str, ...] = ()):
    """(config, tokenizer, loader(device)) of the polytron checkpoint directory ``path``."""
    from polytron.pretrain import checkpoint as ckpt
    state = ckpt.read_trainer_state(path)
    cfg = model_config(state, path, plugins)
    tok = load_run_tokenizer(state.get("config", {}), tokenizer, path, state.get("tokenizer_fingerprint"))
    return cfg, tok, lambda device: load_model(path, cfg, device)


def packed_model(src: str, tokenizer: Optional[str]):
    """(config, tokenizer, loader(device)) of a packed BitNet Hugging Face directory
    (``convert_checkpoint.py to-hf --packed``): the ternary weights stay packed in memory."""
    from polytron.data.tokenizer import load_tokenizer
    from polytron.model.bitnet.packed import load_packed, packed_config
    cfg = packed_config(src)
    return cfg, load_tokenizer(tokenizer or src), lambda device: load_packed(src, device)


def _device(name: str) -> str:
    """``name`` if torch can allocate there, else a BadInput naming it."""
    import torch
    try:
        torch.empty(1, device=name).cpu()       # meta and other data-less devices fail here
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
        raise BadInput(f"--device {name}: not usable ({str(e).splitlines()[0]})") from None
    return name


@command
def main(argv: list[str]) -> int:
    text = run(parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:               # --context-parallel: rank 0 prints
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
