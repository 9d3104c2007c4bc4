"""Reading checkpoint files without executing code from them.

``.metadata`` (DCP's index) is a pickle: it is unpickled with an allow-list of DCP's
metadata classes. Byte items and per-rank files go through
``torch.load(weights_only=True)``. Reader errors name the shard file.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from polytron.pretrain.checkpoint.common import STATE_FILE, CheckpointError, first_line

#: The only globals a DCP ``.metadata`` pickle may reference.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"), ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
} | {("torch", str(d).split(".")[-1]) for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.complex64)}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside DCP's metadata classes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def read_metadata(path: str) -> Metadata:
    """The DCP index of checkpoint ``path``, unpickled with an allow-list (no code runs)."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no .metadata: not a complete checkpoint") from None
    except Exception as e:  # truncated, corrupted or malicious pickle
        raise CheckpointError(f"checkpoint file {file} is corrupted or unsafe: {first_line(e)}") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"checkpoint file {file} is not DCP metadata")
    return md


class SafeReader(FileSystemReader):
    """DCP file reader: allow-listed metadata, and errors that name the shard file."""

    def __init__(self, path: str):
        super().__init__(path)
        self._current = ""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return read_metadata(str(self.path))

    def _slice_file(self, file, sinfo):
        self._current = sinfo.relative_path
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except Exception as e:
            raise CheckpointError(f"checkpoint file {os.path.join(str(self.path), self._current)} "
                                  f"is corrupted: {first_line(e)}") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def tensor_shapes(md: Metadata, prefix: str) -> dict[str, tuple[int, ...]]:
    """Global shapes of the checkpoint's tensors under ``prefix.`` (prefix stripped)."""
    p = prefix + "."
    return {k[len(p):]: tuple(v.size) for k, v in md.state_dict_metadata.items()
            if k.startswith(p) and isinstance(v, TensorStorageMetadata)}


def read_trainer_state(path: str) -> dict:
    """The JSON trainer state of a checkpoint, with a clear error when damaged."""
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}: incomplete save?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {file} is corrupted: {e}") from None


def load_rank_file(path: str, name: str) -> Optional[Any]:
    """A per-rank file (e.g. RNG state) via ``torch.load(weights_only=True)``; None if absent."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return None
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {file} is corrupted or unsafe: {first_line(e)}") from None
