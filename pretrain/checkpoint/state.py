"""State dicts of the model parts and optimizer, and loading them into any layout.

Keys are fully-qualified parameter names (``model.<fqn>``, ``optimizer.state.<fqn>.*``,
``extras.<name>.*``), so DCP reshards between tensor / pipeline / FSDP layouts. Before
reading any tensor the loader compares the checkpoint's names and shapes with what
this rank will load (and, when given, with the full model's shapes); the first
mismatch is named. Model and optimizer are then loaded strictly, never partially.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from polytron.pretrain.checkpoint.common import CheckpointError, dcp_one_process, first_line, is_dist
from polytron.pretrain.checkpoint.manifest import verify_files
from polytron.pretrain.checkpoint.safe_read import SafeLoadPlanner, SafeReader, read_trainer_state, tensor_shapes

_OPT_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)

#: What a failed DCP call may raise: DCP's own CheckpointException derives from
#: BaseException, so ``except Exception`` alone lets it escape.
DCP_ERRORS = (Exception, CheckpointException)


def model_state(model_parts: list[torch.nn.Module]) -> list[dict[str, Any]]:
    return [get_model_state_dict(part) for part in model_parts]


def optim_state(model_parts, optimizer) -> list[dict[str, Any]]:
    """Flattened optimizer state of each part, keyed by the unsplit model's names: the last
    pipeline stage's copy of a tied weight is saved under its source's name (as one process
    saves it), so both copies write (and read) the same entries and any layout loads them."""
    return [_renamed(get_optimizer_state_dict(part, optimizer, options=_OPT_OPTS), _tied_names(part))
            for part in model_parts]


def _tied_names(part: torch.nn.Module) -> dict[str, str]:
    """This part's tied copies: local name -> the unsplit model's name (only those that differ)."""
    from polytron.parallel.pipeline import tied_copies
    return {local: source for local, source in tied_copies(part).items() if local != source}


def _renamed(flat: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """``flat`` (``state.<fqn>.<key>`` / ``param_groups.<fqn>.<key>``) with each fqn in ``names``
    replaced by its mapped name."""
    if not names:
        return flat
    prefixes = {f"{top}.{old}.": f"{top}.{new}." for old, new in names.items()
                for top in ("state", "param_groups")}
    out = {}
    for key, value in flat.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        out[prefixes[old] + key[len(old):] if old else key] = value
    return out


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for p in parts:
        merged.update(p)
    return merged


def flat_keys(prefix: str, obj: Any) -> Iterable[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat_keys(f"{prefix}.{k}", v)
    else:
        yield prefix


def extras_state(extras: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``extras`` values as state dicts (``Stateful`` objects are asked for theirs)."""
    return {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in (extras or {}).items()}


def check_model_shapes(path: str, md: Metadata, expected: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's ``model.*`` tensors are exactly ``expected`` (name -> global shape)."""
    have = tensor_shapes(md, "model")
    for name, shape in expected.items():
        if name not in have:
            missing = [n for n in expected if n not in have]
            raise CheckpointError(f"checkpoint {path} does not match the model: tensor '{name}' is "
                                  f"missing from the checkpoint ({len(missing)} missing)")
        if tuple(have[name]) != tuple(shape):
            raise CheckpointError(f"checkpoint {path} does not match the model: tensor '{name}' has "
                                  f"shape {tuple(have[name])} in the checkpoint, {tuple(shape)} in the model")
    unexpected = [n for n in have if n not in expected]
    if unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: unexpected tensor "
                              f"'{unexpected[0]}' ({len(unexpected)} not in the model)")


def _check_local(path: str, md: Metadata, top: str, state: dict[str, Any], what: str) -> None:
    """Every key this rank will read exists in the checkpoint with the same global shape."""
    for key in flat_keys(top, state):
        entry = md.state_dict_metadata.get(key)
        if entry is None:
            raise CheckpointError(f"checkpoint {path} has no {what} entry '{key}'"
                                  + (" (a weights-only checkpoint: use checkpoint.load to initialize "
                                     "from it)" if top == "optimizer" else ""))
        local = _get(state, key[len(top) + 1:])
        if isinstance(local, torch.Tensor) and isinstance(entry, TensorStorageMetadata) \
                and tuple(entry.size) != tuple(local.shape):
            raise CheckpointError(f"checkpoint {path} does not match: '{key}' has shape "
                                  f"{tuple(entry.size)} in the checkpoint, {tuple(local.shape)} here")


def _get(state: dict, dotted: str) -> Any:
    if dotted in state:
        return state[dotted]
    head, _, rest = dotted.partition(".")
    return _get(state[head], rest) if isinstance(state.get(head), dict) else None


def dcp_load(state: dict, path: str, single_process: bool = False) -> None:
    """``dcp.load`` through the safe reader; every failure becomes one CheckpointError."""
    try:
        no_dist = single_process or not is_dist()
        with dcp_one_process(no_dist):
            dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointError:
        raise
    except DCP_ERRORS as e:  # DCP wraps per-rank failures in a BaseException
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line(e)}") from None


def load(path: str, model_parts, optimizer=None, expected_shapes: Optional[dict] = None,
         extras: Optional[dict[str, Any]] = None) -> dict:
    """Load model (and optimizer, extras) into the current layout; returns the trainer state.

    ``expected_shapes`` (full-model name -> shape; default: the parts' own
    ``full_param_shapes()`` when they have it) makes every rank compare the whole
    model, not only the parts it owns, before any tensor is read: missing, unexpected
    and mis-shaped tensors are named.
    """
    trainer_state = read_trainer_state(path)
    md = verify_files(path)
    if expected_shapes is None and hasattr(model_parts[0], "full_param_shapes"):
        expected_shapes = model_parts[0].full_param_shapes()
    if expected_shapes is not None:
        check_model_shapes(path, md, expected_shapes)
    model_sd = model_state(model_parts)
    state: dict[str, Any] = {"model": merge(model_sd)}
    optim_sd = optim_state(model_parts, optimizer) if optimizer is not None else None
    if optim_sd is not None:
        state["optimizer"] = merge(optim_sd)
    if extras:
        state["extras"] = extras_state(extras)
    for top, what in (("model", "model"), ("optimizer", "optimizer"), ("extras", "extra state")):
        if top in state:
            _check_local(path, md, top, state[top], what)
    dcp_load(state, path)
    _apply(model_parts, optimizer, model_sd, optim_sd, state)
    for k, v in (extras or {}).items():
        if hasattr(v, "load_state_dict"):
            v.load_state_dict(state["extras"][k])
    return trainer_state


def _apply(model_parts, optimizer, model_sd, optim_sd, state) -> None:
    """Copy loaded values into each part strictly (every key, nothing extra).

    Optimizer moments and steps come from the checkpoint; hyper-parameters (lr, betas,
    weight decay, eps) stay those of the current run config.
    """
    merged_opt = state.get("optimizer")
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] \
        if optimizer is not None else []
    for i, part in enumerate(model_parts):
        sd = {k: state["model"][k] for k in model_sd[i]}
        set_model_state_dict(part, sd, options=StateDictOptions(strict=True))
        if optim_sd is not None:
            back = {new: old for old, new in _tied_names(part).items()}
            osd = _renamed({k: merged_opt[k] for k in optim_sd[i]}, back)
            set_optimizer_state_dict(part, optimizer, osd, options=_OPT_OPTS)
    for group, saved in zip(optimizer.param_groups if optimizer is not None else [], hyper):
        group.update(saved)
