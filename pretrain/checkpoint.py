"""Sharded checkpoints through torch.distributed.checkpoint (DCP).

Layout under the checkpoint root (``<output_dir>/checkpoints``)::

    iter_0000100/          one complete checkpoint
        .metadata, *.distcp   DCP shards: model and optimizer (fully-qualified names,
                              so any parallel layout can load them)
        trainer_state.json    iteration, consumed samples/tokens, data-loader position,
                              LR, run config
    latest                 text file: name of the newest complete checkpoint

A save is written to ``iter_XXXXXXX.tmp``, then renamed; only then is
``latest`` replaced (atomically), so an interrupted save is never picked up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

CKPT_RE = re.compile(r"^iter_(\d{7})$")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def ckpt_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_complete(path: str) -> bool:
    """A finished checkpoint has DCP metadata and the trainer state."""
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, STATE_FILE))


def latest_checkpoint(root: str) -> Optional[str]:
    """Newest complete checkpoint under ``root`` (the ``latest`` pointer, else a scan)."""
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        name = open(pointer).read().strip()
        if CKPT_RE.match(name) and is_complete(os.path.join(root, name)):
            return os.path.join(root, name)
    found = sorted(n for n in os.listdir(root) if CKPT_RE.match(n) and is_complete(os.path.join(root, n)))
    return os.path.join(root, found[-1]) if found else None


def _model_state(model_parts: list[torch.nn.Module]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for part in model_parts:
        state.update(get_model_state_dict(part))
    return state


def _optim_state(model_parts, optimizer) -> dict[str, Any]:
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    state: dict[str, Any] = {}
    for part in model_parts:
        state.update(get_optimizer_state_dict(part, optimizer, options=opts))
    return state


def save(root: str, iteration: int, model_parts, optimizer, trainer_state: dict, keep_last: int,
         rank_files: Optional[dict[str, Any]] = None) -> str:
    """Write one checkpoint atomically on every rank; returns its final path.

    ``rank_files`` maps file names to objects this rank saves with ``torch.save``
    (e.g. its RNG state) inside the checkpoint before it is marked complete.
    """
    final = os.path.join(root, ckpt_name(iteration))
    tmp = final + ".tmp"
    if _is_rank0():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    state = {"model": _model_state(model_parts), "optimizer": _optim_state(model_parts, optimizer)}
    dcp.save(state, checkpoint_id=tmp)
    for name, obj in (rank_files or {}).items():
        torch.save(obj, os.path.join(tmp, name))
    _barrier()
    if _is_rank0():
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(trainer_state, f, indent=1)
        if not is_complete(tmp):
            raise CheckpointError(f"checkpoint {tmp} is incomplete after writing")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_pointer(root, os.path.basename(final))
        _retain(root, keep_last)
    _barrier()
    return final


def _write_pointer(root: str, name: str) -> None:
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))


def _retain(root: str, keep_last: int) -> None:
    done = sorted(n for n in os.listdir(root) if CKPT_RE.match(n))
    for name in done[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_trainer_state(path: str) -> dict:
    """The JSON trainer state of a checkpoint, with a clear error when damaged."""
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}: incomplete save?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint file {file} is corrupted: {e}") from None


def load(path: str, model_parts, optimizer=None) -> dict:
    """Load model (and optimizer) shards into the current layout; returns the trainer state."""
    trainer_state = read_trainer_state(path)
    state: dict[str, Any] = {"model": _model_state(model_parts)}
    if optimizer is not None:
        state["optimizer"] = _optim_state(model_parts, optimizer)
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP wraps per-rank failures; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first}") from None
    for part in model_parts:
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if optimizer is not None:
            set_optimizer_state_dict(part, optimizer, state["optimizer"],
                                     options=StateDictOptions(flatten_optimizer_state_dict=True,
                                                              strict=False))
    return trainer_state
