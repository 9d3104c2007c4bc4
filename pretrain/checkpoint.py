"""Sharded, atomic, verified checkpoints through torch.distributed.checkpoint (DCP).

Layout under the checkpoint root (``<output_dir>/checkpoints``)::

    iter_0000100/              one complete checkpoint
        .metadata, __R_0.distcp  DCP shards: ``model.*``, ``optimizer.*`` (flattened, by
                                 fully-qualified parameter name) and ``extras.*``; any
                                 TP / PP / FSDP / DP layout can load them
        rng_rank<R>.pt           RNG states of rank R (tensors and plain values only)
        trainer_state.json       iteration, consumed samples/tokens, LR and schedule,
                                 data-loader position, run config, layout
        manifest.json            every file above with its size and CRC32
    latest                     text file: name of the newest complete checkpoint

Saving (all ranks): write everything into ``iter_XXXXXXX.tmp``; rank 0 then verifies
it (``.metadata`` loads, lists every tensor every rank saved, each shard file exists
and is exactly as long as DCP's index says), writes ``manifest.json``, renames the
directory to ``iter_XXXXXXX`` and only then moves ``latest``. A directory without a
manifest, or any ``*.tmp`` directory, is never loaded. With ``async_save`` the DCP write
runs in a background thread on its own gloo group and the verify/rename/pointer step
runs once every rank's write has finished (:class:`PendingSave`).

Loading never executes code from a checkpoint: ``.metadata`` is unpickled with an
allow-list of DCP's metadata classes, byte items and rank files go through
``torch.load(weights_only=True)``. Before reading any tensor the loader checks file
sizes against the manifest and DCP's index (a truncated file is named) and compares
the checkpoint's tensor names and shapes with the model (the first mismatching tensor
is named); the model and optimizer are then loaded strictly, never partially.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

CKPT_RE = re.compile(r"^iter_(\d{7})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
POINTER = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or tensor."""


def ckpt_name(iteration: int) -> str:
    """Directory name of the checkpoint taken after ``iteration`` steps."""
    return f"iter_{iteration:07d}"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _is_rank0() -> bool:
    return not _dist() or dist.get_rank() == 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ====================================================================== safe reading

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
        raise CheckpointError(f"checkpoint file {file} is corrupted or unsafe: {_first_line(e)}") from None
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
                                  f"is corrupted: {_first_line(e)}") from None


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


# ====================================================================== file checks

def _crc32(file: str) -> int:
    crc = 0
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _extents(md: Metadata) -> dict[str, int]:
    """Bytes each shard file must hold according to DCP's index."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def _check_extents(path: str, md: Metadata, exact: bool) -> dict[str, int]:
    """Every shard file exists and is (exactly, when ``exact``) as long as the index says."""
    need = _extents(md)
    for rel, size in sorted(need.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint file {file} is missing")
        have = os.path.getsize(file)
        if have < size or (exact and have != size):
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupted: "
                                  f"{have} bytes, index says {size}")
    return need


def own_files(path: str, rank: int) -> list[str]:
    """Files of ``path`` this rank wrote (rank 0 also owns the shared ones)."""
    mine = []
    for name in sorted(os.listdir(path)):
        if name == MANIFEST or not os.path.isfile(os.path.join(path, name)):
            continue
        m = re.match(r"^(?:__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt)$", name)
        owner = int(m.group(1) or m.group(2)) if m else 0
        if owner == rank:
            mine.append(name)
    return mine


def checksum_files(path: str, names: Iterable[str]) -> dict[str, dict]:
    """Size and CRC32 of each named file."""
    return {n: {"size": os.path.getsize(os.path.join(path, n)), "crc32": _crc32(os.path.join(path, n))}
            for n in names}


def build_manifest(path: str, files: Optional[dict[str, dict]] = None) -> dict:
    """Size and CRC32 of every file in ``path`` (computed here unless given)."""
    if files is None:
        files = checksum_files(path, [n for n in sorted(os.listdir(path))
                                      if n != MANIFEST and os.path.isfile(os.path.join(path, n))])
    return {"format_version": FORMAT_VERSION, "files": dict(sorted(files.items()))}


def read_manifest(path: str) -> dict:
    """The manifest of a complete checkpoint (its absence means an unfinished save)."""
    file = os.path.join(path, MANIFEST)
    try:
        with open(file) as f:
            man = json.load(f)
        man["files"].items()
        return man
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: unfinished save") from None
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {file} is corrupted: {_first_line(e)}") from None


def _check_file(path: str, name: str, info: dict, crc: bool) -> Optional[str]:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return f"checkpoint file {file} is missing"
    if os.path.getsize(file) != info.get("size"):
        return (f"checkpoint file {file} is truncated or corrupted: {os.path.getsize(file)} bytes, "
                f"manifest says {info.get('size')}")
    if crc and "crc32" in info and _crc32(file) != info["crc32"]:
        return f"checkpoint file {file} is corrupted: its CRC32 differs from the manifest"
    return None


def _agree(error: Optional[str], collective: bool) -> None:
    """Raise the first rank's error on every rank (so no rank enters DCP's collectives alone)."""
    errors = [error]
    if collective and _dist():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def verify_files(path: str, collective: bool = True) -> Metadata:
    """Check sizes of all files, CRC32s (each rank a share), and DCP's index; all ranks agree.

    Call on every rank when ``collective`` (the default) and a process group exists.
    """
    error = None
    try:
        man = read_manifest(path)
        rank, world = (dist.get_rank(), dist.get_world_size()) if collective and _dist() else (0, 1)
        for i, (name, info) in enumerate(man["files"].items()):
            error = error or _check_file(path, name, info, crc=i % world == rank)
        md = read_metadata(path) if error is None else None
        if md is not None:
            _check_extents(path, md, exact=True)
    except CheckpointError as e:
        error, md = str(e), None
    _agree(error, collective)
    assert md is not None
    return md


# ====================================================================== finding checkpoints

def is_complete(path: str) -> bool:
    """A finished checkpoint has DCP metadata, the trainer state and the manifest."""
    return all(os.path.isfile(os.path.join(path, n)) for n in (".metadata", STATE_FILE, MANIFEST))


def latest_checkpoint(root: str) -> Optional[str]:
    """Newest complete checkpoint under ``root``; ``*.tmp`` directories are never picked."""
    if not os.path.isdir(root):
        return None
    found = sorted(n for n in os.listdir(root) if CKPT_RE.match(n) and is_complete(os.path.join(root, n)))
    return os.path.join(root, found[-1]) if found else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or the newest complete one of a run / checkpoint root."""
    if is_complete(path):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        found = latest_checkpoint(root)
        if found:
            return found
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST} or {STATE_FILE}): "
                              "interrupted save")
    raise CheckpointError(f"{path}: not a checkpoint, checkpoint root or run directory with a "
                          "complete checkpoint")


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
        raise CheckpointError(f"checkpoint file {file} is corrupted or unsafe: {_first_line(e)}") from None


# ====================================================================== state dicts

def _model_state(model_parts: list[torch.nn.Module]) -> list[dict[str, Any]]:
    return [get_model_state_dict(part) for part in model_parts]


_OPT_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


def _optim_state(model_parts, optimizer) -> list[dict[str, Any]]:
    return [get_optimizer_state_dict(part, optimizer, options=_OPT_OPTS) for part in model_parts]


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for p in parts:
        merged.update(p)
    return merged


def _flat_keys(prefix: str, obj: Any) -> Iterable[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat_keys(f"{prefix}.{k}", v)
    else:
        yield prefix


# ====================================================================== saving

_CKPT_GROUP: Optional[dist.ProcessGroup] = None


def _async_group() -> Optional[dist.ProcessGroup]:
    """A gloo group for background writes, so they never interleave with training collectives."""
    global _CKPT_GROUP
    if _dist() and _CKPT_GROUP is None:
        _CKPT_GROUP = dist.new_group(backend="gloo")
    return _CKPT_GROUP


@dataclass
class PendingSave:
    """A checkpoint being written; :meth:`finalize` verifies, renames and moves ``latest``."""
    root: str
    tmp: str
    final: str
    keep_last: int
    keys: list[str]
    future: Optional[Future] = None
    checksums: Optional[Future] = None

    def start_checksums(self) -> None:
        """After this rank's write: CRC32 of its own files (in a thread when writing async)."""
        rank = dist.get_rank() if _dist() else 0

        def job() -> dict[str, dict]:
            if self.future is not None:
                self.future.result()
            return checksum_files(self.tmp, own_files(self.tmp, rank))
        if self.future is None:
            self.checksums = Future()
            self.checksums.set_result(job())
        else:
            import concurrent.futures
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-crc")
            self.checksums = pool.submit(job)
            pool.shutdown(wait=False)

    def ready(self, device: torch.device = torch.device("cpu")) -> bool:
        """True on every rank once every rank's background write has finished (collective)."""
        local = self.checksums is None or self.checksums.done()
        if not _dist():
            return local
        flag = torch.tensor([1 if local else 0], device=device)   # default group: the writer thread owns the other
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def finalize(self) -> str:
        """Wait for the write, verify on rank 0, rename, move ``latest``, apply retention."""
        if self.checksums is None:
            self.start_checksums()
        sums = self.checksums.result()          # raises the write's error, if any
        if _dist():
            gathered: list[Optional[dict]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sums)
            sums = {k: v for g in gathered for k, v in (g or {}).items()}
        error = None
        if _is_rank0():
            try:
                self._commit(sums)
            except CheckpointError as e:
                error = str(e)
            except OSError as e:
                error = f"checkpoint {self.tmp}: cannot finish the save ({e})"
        _agree(error, collective=True)      # every rank raises rank 0's error, none hangs
        return self.final

    def _commit(self, sums: dict[str, dict]) -> None:
        """Rank 0: verify, manifest, rename, pointer, retention."""
        _verify_tmp(self.tmp, self.keys)
        sums.update(checksum_files(self.tmp, [n for n in own_files(self.tmp, 0) if n not in sums]))
        _write_json(os.path.join(self.tmp, MANIFEST), build_manifest(self.tmp, sums))
        _fsync_dir(self.tmp)
        _remove(self.final)
        os.replace(self.tmp, self.final)
        _write_pointer(self.root, os.path.basename(self.final))
        _retain(self.root, self.keep_last)


def _verify_tmp(tmp: str, keys: list[str]) -> None:
    """Before the rename: metadata loads, lists every saved key, shard sizes are exact."""
    md = read_metadata(tmp)
    missing = [k for k in keys if k not in md.state_dict_metadata]
    if missing:
        raise CheckpointError(f"checkpoint {tmp} is incomplete after writing: no entry for "
                              f"{missing[0]} ({len(missing)} missing)")
    _check_extents(tmp, md, exact=True)
    if not os.path.isfile(os.path.join(tmp, STATE_FILE)):
        raise CheckpointError(f"checkpoint {tmp} is incomplete after writing: no {STATE_FILE}")


def _write_json(file: str, obj: Any) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gather_keys(local: list[str]) -> list[str]:
    if not _dist():
        return local
    out: list[Optional[list[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return sorted({k for ks in out for k in (ks or [])})


def save(root: str, iteration: int, model_parts, optimizer, trainer_state: dict, keep_last: int,
         rank_files: Optional[dict[str, Any]] = None, extras: Optional[dict[str, Any]] = None,
         async_save: bool = False) -> PendingSave:
    """Start one checkpoint on every rank (collective); returns the pending save.

    Synchronous saves come back already written: call :meth:`PendingSave.finalize`
    right away. With ``async_save`` the DCP write continues in the background (the
    state is staged to CPU memory first, so training may modify the weights); poll
    :meth:`PendingSave.ready` and finalize when it is True.

    ``rank_files`` maps file names to objects this rank writes with ``torch.save``
    (tensors and plain values only: they are read back with ``weights_only=True``).
    ``extras`` maps names to state dicts or ``Stateful`` objects saved under
    ``extras.<name>`` — the hook for further training state (e.g. FP8 scaling
    history); :func:`load` restores the same names.
    """
    final = os.path.join(root, ckpt_name(iteration))
    tmp = final + ".tmp"
    if _is_rank0():
        os.makedirs(root, exist_ok=True)
        _clean_stale(root)
        os.makedirs(tmp)
        _write_json(os.path.join(tmp, STATE_FILE), trainer_state)
    _barrier()
    state: dict[str, Any] = {"model": _merge(_model_state(model_parts)),
                             "optimizer": _merge(_optim_state(model_parts, optimizer))}
    if extras:
        state["extras"] = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in extras.items()}
    keys = _gather_keys([k for top, v in state.items() for k in _flat_keys(top, v)])
    for name, obj in (rank_files or {}).items():
        torch.save(obj, os.path.join(tmp, name))
    pending = PendingSave(root, tmp, final, keep_last, keys)
    if async_save:
        pending.future = dcp.async_save(state, checkpoint_id=tmp, process_group=_async_group(),
                                        no_dist=not _dist())
    else:
        dcp.save(state, checkpoint_id=tmp, no_dist=not _dist())
    pending.start_checksums()
    return pending


def _clean_stale(root: str) -> None:
    """Remove leftovers of interrupted saves and deletions (``*.tmp``, ``*.old``)."""
    for name in os.listdir(root):
        if name.endswith((".tmp", ".old")) and name.startswith("iter_"):
            _remove(os.path.join(root, name))


def _remove(path: str) -> None:
    """Delete a checkpoint directory; renamed first so a half-deleted one is never complete."""
    if os.path.isdir(path):
        doomed = path + ".old"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _write_pointer(root: str, name: str) -> None:
    tmp = os.path.join(root, POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, POINTER))


def _retain(root: str, keep_last: int) -> None:
    done = sorted(n for n in os.listdir(root) if CKPT_RE.match(n))
    for name in done[:-keep_last]:
        _remove(os.path.join(root, name))


# ====================================================================== loading

def model_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of every tensor of the full (unsharded) model, built on meta."""
    from model.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
    for key in _flat_keys(top, state):
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


def load(path: str, model_parts, optimizer=None, expected_shapes: Optional[dict] = None,
         extras: Optional[dict[str, Any]] = None) -> dict:
    """Load model (and optimizer, extras) into the current layout; returns the trainer state.

    ``expected_shapes`` (full-model name -> shape; default: built from the parts'
    ``cfg``) makes every rank compare the whole model, not only the parts it owns,
    before any tensor is read: missing, unexpected and mis-shaped tensors are named.
    """
    trainer_state = read_trainer_state(path)
    md = verify_files(path)
    if expected_shapes is None and hasattr(model_parts[0], "cfg"):
        expected_shapes = model_shapes(model_parts[0].cfg)
    if expected_shapes is not None:
        check_model_shapes(path, md, expected_shapes)
    model_sd = _model_state(model_parts)
    state: dict[str, Any] = {"model": _merge(model_sd)}
    optim_sd = _optim_state(model_parts, optimizer) if optimizer is not None else None
    if optim_sd is not None:
        state["optimizer"] = _merge(optim_sd)
    if extras:
        state["extras"] = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in extras.items()}
    for top, what in (("model", "model"), ("optimizer", "optimizer"), ("extras", "extra state")):
        if top in state:
            _check_local(path, md, top, state[top], what)
    reader = SafeReader(path)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not _dist())
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps per-rank failures
        raise CheckpointError(f"cannot load checkpoint {path}: {_first_line(e)}") from None
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
            osd = {k: merged_opt[k] for k in optim_sd[i]}
            set_optimizer_state_dict(part, optimizer, osd, options=_OPT_OPTS)
    for group, saved in zip(optimizer.param_groups if optimizer is not None else [], hyper):
        group.update(saved)


# ====================================================================== single process

def load_tensors(path: str, prefix: str = "model") -> dict[str, torch.Tensor]:
    """All ``prefix.*`` tensors of a checkpoint as full plain CPU tensors (one process)."""
    md = verify_files(path, collective=False)
    shapes = tensor_shapes(md, prefix)
    if not shapes:
        raise CheckpointError(f"checkpoint {path} holds no '{prefix}' tensors")
    dtypes = {k[len(prefix) + 1:]: v.properties.dtype for k, v in md.state_dict_metadata.items()
              if k.startswith(prefix + ".") and isinstance(v, TensorStorageMetadata)}
    state = {prefix: {k: torch.empty(s, dtype=dtypes[k]) for k, s in shapes.items()}}
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {_first_line(e)}") from None
    return state[prefix]


def save_tensors(path: str, tensors: dict[str, torch.Tensor], trainer_state: dict) -> str:
    """Write a weights-only checkpoint (``model.*``) from one process, atomically."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_json(os.path.join(tmp, STATE_FILE), trainer_state)
    dcp.save({"model": tensors}, checkpoint_id=tmp, no_dist=True)
    _verify_tmp(tmp, [f"model.{k}" for k in tensors])
    _write_json(os.path.join(tmp, MANIFEST), build_manifest(tmp))
    _remove(path)
    os.replace(tmp, path)
    return path
