"""Whole-tensor checkpoint I/O in one process, for the conversion tools.

``load_tensors`` reads every ``model.*`` tensor of any checkpoint (whatever layout
wrote it) as full CPU tensors; ``save_tensors`` writes a weights-only checkpoint that
``checkpoint.load`` / ``training.resume`` can read, with the same verify-then-rename
protocol as a training save.
"""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from polytron.pretrain.checkpoint import discovery
from polytron.pretrain.checkpoint.common import MANIFEST, STATE_FILE, CheckpointError, dcp_one_process, write_json
from polytron.pretrain.checkpoint.manifest import build_manifest, verify_files, verify_tmp
from polytron.pretrain.checkpoint.safe_read import tensor_shapes
from polytron.pretrain.checkpoint.state import dcp_load


def load_tensors(path: str, prefix: str = "model") -> dict[str, torch.Tensor]:
    """All ``prefix.*`` tensors of a checkpoint as full plain CPU tensors (one process)."""
    md = verify_files(path, collective=False)
    shapes = tensor_shapes(md, prefix)
    if not shapes:
        raise CheckpointError(f"checkpoint {path} holds no '{prefix}' tensors")
    dtypes = {k[len(prefix) + 1:]: v.properties.dtype for k, v in md.state_dict_metadata.items()
              if k.startswith(prefix + ".") and isinstance(v, TensorStorageMetadata)}
    state = {prefix: {k: torch.empty(s, dtype=dtypes[k]) for k, s in shapes.items()}}
    dcp_load(state, path, single_process=True)
    return state[prefix]


def save_tensors(path: str, tensors: dict[str, torch.Tensor], trainer_state: dict) -> str:
    """Write a weights-only checkpoint (``model.*``) from one process, atomically."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_json(os.path.join(tmp, STATE_FILE), trainer_state)
    with dcp_one_process(True):
        dcp.save({"model": tensors}, checkpoint_id=tmp, no_dist=True)
    verify_tmp(tmp, [f"model.{k}" for k in tensors])
    write_json(os.path.join(tmp, MANIFEST), build_manifest(tmp))
    discovery.remove(path)
    os.replace(tmp, path)
    return path
