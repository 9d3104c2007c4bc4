"""Integrity of a checkpoint directory: the size + CRC32 manifest and DCP's own index.

A save ends with ``manifest.json`` (every file with its size and CRC32), written only
after the directory was checked against DCP's index (:func:`verify_tmp`). Loading
checks sizes, CRC32s (each rank a share of the files) and the index's extents
(:func:`verify_files`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from typing import Iterable, Optional

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from polytron.pretrain.checkpoint.common import (
    FORMAT_VERSION,
    MANIFEST,
    STATE_FILE,
    CheckpointError,
    agree,
    first_line,
    is_dist,
)
from polytron.pretrain.checkpoint.safe_read import read_metadata


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
        raise CheckpointError(f"checkpoint file {file} is corrupted: {first_line(e)}") from None


def identity(path: str) -> str:
    """``sha256:<16 hex>`` of a complete checkpoint's manifest (every file's name, size and
    CRC32): equal for two copies of one checkpoint, different once any file differs (a
    checkpoint rewritten in place by a conversion tool gets a new identity)."""
    files = read_manifest(path)["files"]
    text = json.dumps(files, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()[:16]


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


def verify_files(path: str, collective: bool = True) -> Metadata:
    """Check sizes of all files, CRC32s (each rank a share), and DCP's index; all ranks agree.

    Call on every rank when ``collective`` (the default) and a process group exists.
    """
    error = None
    try:
        man = read_manifest(path)
        rank, world = (dist.get_rank(), dist.get_world_size()) if collective and is_dist() else (0, 1)
        for i, (name, info) in enumerate(man["files"].items()):
            error = error or _check_file(path, name, info, crc=i % world == rank)
        md = read_metadata(path) if error is None else None
        if md is not None:
            _check_extents(path, md, exact=True)
    except CheckpointError as e:
        error, md = str(e), None
    agree(error, collective)
    assert md is not None
    return md


def verify_tmp(tmp: str, keys: list[str]) -> None:
    """Before the rename: metadata loads, lists every saved key, shard sizes are exact."""
    md = read_metadata(tmp)
    missing = [k for k in keys if k not in md.state_dict_metadata]
    if missing:
        raise CheckpointError(f"checkpoint {tmp} is incomplete after writing: no entry for "
                              f"{missing[0]} ({len(missing)} missing)")
    _check_extents(tmp, md, exact=True)
    if not os.path.isfile(os.path.join(tmp, STATE_FILE)):
        raise CheckpointError(f"checkpoint {tmp} is incomplete after writing: no {STATE_FILE}")
