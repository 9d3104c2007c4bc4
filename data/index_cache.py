"""megatron-core's GPTDataset index cache, verified before use and never unpickled.

megatron-core saves each GPTDataset's document, sample and shuffle index arrays as
``.npy`` files (plus a ``description.txt``) in ``path_to_cache`` and, on a cache hit,
reads them with ``numpy.load(..., allow_pickle=True)``: anyone who can write that
directory could plant a pickle that runs code in every training process, and a
truncated file from a killed build gives a traceback forever after.

:class:`CheckedGPTDataset` takes over that step:

* **Read**: the four files must match ``<base>-manifest.json`` (byte size and SHA-256
  of each) and the description must be this dataset's; then each array is loaded with
  ``allow_pickle=False`` (memory-mapped) and must be an integer array of the expected
  rank. Nothing megatron-core would unpickle is ever handed to it.
* **Rebuild**: anything else (missing, no manifest, truncated, corrupt, a pickle) is
  rebuilt by megatron-core's own code in a private temporary directory, the manifest
  is written there, and the files are renamed into place with the manifest last, so
  a reader sees either a complete verified set or a set that fails verification.
* Under a process group only global rank 0 writes; another rank that finds the cache
  unusable after rank 0 built it raises :class:`DataError` naming the file.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from polytron.data._megatron import GPTDataset, GPTDatasetConfig
from polytron.data.errors import DataError
from polytron.data.files import os_reason

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
#: (array name, number of dimensions, size of the second dimension or None)
_ARRAYS = (("document_index", 1, None), ("sample_index", 2, 2), ("shuffle_index", 1, None))
MEMBERS = ("description.txt",) + tuple(f"{name}.npy" for name, _, _ in _ARRAYS)
_MISSING = "missing"


class CacheCorrupt(Exception):
    """An index cache file that must not be used (one line naming it)."""


@dataclass(frozen=True)
class CacheFiles:
    """The files of one GPTDataset split in a cache directory: ``<dir>/<base>-<member>``."""
    directory: str
    base: str

    def path(self, member: str) -> str:
        return os.path.join(self.directory, f"{self.base}-{member}")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")


def _digest(path: str) -> tuple[int, str]:
    """Size in bytes and SHA-256 of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def write_manifest(files: CacheFiles) -> None:
    """Record size and SHA-256 of every member in ``<base>-manifest.json`` (atomically)."""
    entries = {}
    for m in MEMBERS:
        size, sha = _digest(files.path(m))
        entries[m] = {"bytes": size, "sha256": sha}
    tmp = files.manifest + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": MANIFEST_VERSION, "files": entries}, f, indent=1)
    os.replace(tmp, files.manifest)


def _read_manifest(files: CacheFiles) -> dict:
    """The manifest's ``files`` entries; :class:`CacheCorrupt` if absent or malformed."""
    try:
        with open(files.manifest, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        present = any(os.path.lexists(files.path(m)) for m in MEMBERS)
        raise CacheCorrupt(f"{files.manifest}: no manifest" if present else _MISSING) from None
    except (OSError, ValueError) as e:
        raise CacheCorrupt(f"{files.manifest}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION \
            or not isinstance(manifest.get("files"), dict):
        raise CacheCorrupt(f"{files.manifest}: not a version-{MANIFEST_VERSION} manifest")
    return manifest["files"]


def verify(files: CacheFiles, description: str) -> None:
    """Raise :class:`CacheCorrupt` unless every member matches the manifest and the
    description is ``description``."""
    entries = _read_manifest(files)
    for m in MEMBERS:
        p, want = files.path(m), entries.get(m)
        if not isinstance(want, dict):
            raise CacheCorrupt(f"{files.manifest}: lists no {m}")
        try:
            size, sha = _digest(p)
        except OSError as e:
            raise CacheCorrupt(f"{p}: unreadable ({os_reason(e)})") from None
        if size != want.get("bytes"):
            raise CacheCorrupt(f"{p}: {size} bytes, its manifest says {want.get('bytes')} (truncated?)")
        if sha != want.get("sha256"):
            raise CacheCorrupt(f"{p}: content differs from its manifest's SHA-256 (corrupt)")
    with open(files.path("description.txt"), encoding="utf-8", errors="replace") as f:
        if f.read() != description:
            raise CacheCorrupt(f"{files.path('description.txt')}: describes another dataset")


def load_arrays(files: CacheFiles) -> tuple[np.ndarray, ...]:
    """The three index arrays, memory-mapped, read with ``allow_pickle=False``."""
    out = []
    for name, ndim, width in _ARRAYS:
        p = files.path(f"{name}.npy")
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise CacheCorrupt(f"{p}: not a plain .npy array ({str(e).splitlines()[0]})") from None
        if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.integer) or a.ndim != ndim \
                or (width is not None and a.shape[1] != width):
            raise CacheCorrupt(f"{p}: not a {ndim}-d integer index array")
        out.append(a)
    return tuple(out)


_IDENTITIES: dict[tuple, dict] = {}  # file stamps -> identity, so each process hashes a .idx once


def dataset_identity(prefix: str) -> dict:
    """What the dataset at ``prefix`` *is*: size and ``mtime_ns`` of ``PREFIX.idx`` and
    ``PREFIX.bin`` and the SHA-256 of the ``.idx`` (document lengths and offsets, all the
    sample indices depend on)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    try:
        si, sb = os.stat(idx), os.stat(bin_)
    except OSError as e:
        raise DataError(f"dataset {prefix}: cannot read ({os_reason(e)})") from None
    stamps = (os.path.abspath(idx), si.st_size, si.st_mtime_ns, si.st_ino, sb.st_size, sb.st_mtime_ns)
    if stamps not in _IDENTITIES:
        try:
            _, sha = _digest(idx)
        except OSError as e:
            raise DataError(f"dataset index {idx}: cannot read ({os_reason(e)})") from None
        _IDENTITIES[stamps] = {"idx_bytes": si.st_size, "idx_mtime_ns": si.st_mtime_ns, "idx_sha256": sha,
                               "bin_bytes": sb.st_size, "bin_mtime_ns": sb.st_mtime_ns}
    return _IDENTITIES[stamps]


def _is_follower() -> bool:
    """True on a rank that must not write the cache (not global rank 0 of a process group)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_rank() != 0


def _install(staged: CacheFiles, final: CacheFiles) -> None:
    """Move a freshly built, manifested set into place: old manifest out first, new one last."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(final.manifest)
    for m in MEMBERS:
        os.replace(staged.path(m), final.path(m))
    os.replace(staged.manifest, final.manifest)


class CheckedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset with a verified, pickle-free index cache (see module doc)."""

    config: GPTDatasetConfig  # set by megatron-core's constructor; swapped in :meth:`_build_into`

    def _key_on_content(self) -> None:
        """Add the dataset's identity (:func:`dataset_identity`) to megatron-core's cache key
        (``unique_identifiers``, hence ``unique_description`` and its hash), which names
        only the path: a corpus regenerated under the same prefix gets new indices."""
        self.unique_identifiers["dataset_identity"] = dataset_identity(self.dataset.path_prefix)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                             default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                   usedforsecurity=False).hexdigest()

    def _build_document_sample_shuffle_indices(self):  # noqa: D102 (megatron-core hook)
        self._key_on_content()
        if not self.config.path_to_cache:
            return super()._build_document_sample_shuffle_indices()
        files = CacheFiles(self.config.path_to_cache,
                           f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
        try:
            verify(files, self.unique_description)
            return load_arrays(files)
        except CacheCorrupt as e:
            problem = str(e)
        if _is_follower():
            where = f"{files.manifest}: missing" if problem == _MISSING else problem
            raise DataError(f"index cache {where}, after rank 0 built it; data.cache_dir must "
                            f"be one directory shared by all ranks") from None
        if problem != _MISSING:
            log.warning("index cache %s; rebuilding it", problem)
        return self._rebuild(files)

    def _rebuild(self, files: CacheFiles) -> tuple[np.ndarray, ...]:
        """Build the indices with megatron-core in a private directory, then install them."""
        try:
            staging = tempfile.mkdtemp(prefix=".build-", dir=files.directory)
        except OSError as e:
            raise DataError(f"data.cache_dir: cannot write the index cache in {files.directory} "
                            f"({os_reason(e)})") from None
        try:
            arrays = self._build_into(staging)
            staged = CacheFiles(staging, files.base)
            write_manifest(staged)
            _install(staged, files)
        except OSError as e:
            raise DataError(f"data.cache_dir: cannot write the index cache in {files.directory} "
                            f"({os_reason(e)})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return arrays

    def _build_into(self, directory: str) -> tuple[np.ndarray, ...]:
        """megatron-core's own build (and save) of the indices, with ``directory`` as its cache."""
        shared = self.config
        local = copy.copy(shared)
        local.path_to_cache = directory
        self.config = local
        try:
            return super()._build_document_sample_shuffle_indices()
        finally:
            self.config = shared
