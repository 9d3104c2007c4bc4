"""Writing a checkpoint: every rank's shards into ``iter_XXXXXXX.tmp``, then rank 0
verifies, writes the manifest, renames into place, moves ``latest`` and applies retention.

A write that fails on any rank (a full disk, an unwritable directory) fails the save
on every rank with one :class:`CheckpointError` line; the partial ``.tmp`` directory is
removed and every earlier checkpoint is left as it was.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from polytron.pretrain.checkpoint import discovery
from polytron.pretrain.checkpoint.common import (
    MANIFEST,
    STATE_FILE,
    CheckpointError,
    agree,
    ckpt_name,
    dcp_one_process,
    first_line,
    fsync_dir,
    is_dist,
    is_rank0,
    write_json,
)
from polytron.pretrain.checkpoint.manifest import build_manifest, checksum_files, own_files, verify_tmp
from polytron.pretrain.checkpoint.state import DCP_ERRORS, extras_state, flat_keys, merge, model_state, optim_state
from polytron.pretrain.faults import fault_point

_CKPT_GROUP: Optional[dist.ProcessGroup] = None


def _async_group() -> Optional[dist.ProcessGroup]:
    """A gloo group for background writes, so they never interleave with training collectives."""
    global _CKPT_GROUP
    if is_dist() and _CKPT_GROUP is None:
        _CKPT_GROUP = dist.new_group(backend="gloo")
    return _CKPT_GROUP


def _gather(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_error(final: str, e: BaseException) -> str:
    """One line for a failed write, with the free space of the target file system (torch's
    zip writer reports a full disk only as an unexpected file position)."""
    try:
        free = shutil.disk_usage(os.path.dirname(final)).free
        room = f" ({free / 2**20:.1f} MiB free on its file system)"
    except OSError:
        room = ""
    return f"cannot write checkpoint {final}{room}: {first_line(e)}"


@dataclass
class PendingSave:
    """A checkpoint being written; :meth:`finalize` verifies, renames and moves ``latest``."""
    root: str
    tmp: str
    final: str
    keep_last: int
    keys: list[str]
    protect: tuple[str, ...] = ()
    future: Optional[Future] = None
    checksums: Optional[Future] = None
    error: Optional[str] = None

    def start_checksums(self) -> None:
        """After this rank's write: CRC32 of its own files (in a thread when writing async)."""
        rank = dist.get_rank() if is_dist() else 0

        def job() -> dict[str, dict]:
            if self.future is not None:
                self.future.result()
            fault_point("save.write")
            return checksum_files(self.tmp, own_files(self.tmp, rank))
        if self.future is None:
            self.checksums = Future()
            try:
                self.checksums.set_result(job())
            except DCP_ERRORS as e:
                self.checksums.set_exception(e)
        else:
            pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-crc")
            self.checksums = pool.submit(job)
            pool.shutdown(wait=False)

    def local_done(self) -> bool:
        """True once this rank's background write and checksums have finished (no waiting)."""
        return self.checksums is None or self.checksums.done()

    def finalize(self) -> str:
        """Wait for the write, verify on rank 0, rename, move ``latest``, apply retention."""
        sums: dict[str, dict] = {}
        error = self.error
        if error is None:
            if self.checksums is None:
                self.start_checksums()
            assert self.checksums is not None       # set by start_checksums
            try:
                sums = self.checksums.result()
            except DCP_ERRORS as e:
                error = _write_error(self.final, e)
        gathered = _gather((sums, error))
        error = next((e for _, e in gathered if e), None)
        if error is None and is_rank0():
            try:
                self._commit({k: v for s, _ in gathered for k, v in s.items()})
            except CheckpointError as e:
                error = str(e)
            except OSError as e:
                error = _write_error(self.final, e)
        if error is not None:
            self._abort(error)
        agree(None)       # every rank leaves together
        return self.final

    def _abort(self, error: str) -> None:
        """Every rank: remove the partial save (rank 0) and raise ``error``."""
        if is_rank0():
            try:
                discovery.remove(self.tmp)
            except OSError:
                pass
            newest = discovery.scan(self.root).newest()
            error += (f"; the partial save was removed, the newest complete checkpoint is {newest}"
                      if newest else "; the partial save was removed")
        agree(error if is_rank0() else None)
        raise CheckpointError(error)   # unreachable: agree raised rank 0's message on every rank

    def _commit(self, sums: dict[str, dict]) -> None:
        """Rank 0: verify, manifest, rename, pointer, retention."""
        verify_tmp(self.tmp, self.keys)
        sums.update(checksum_files(self.tmp, [n for n in own_files(self.tmp, 0) if n not in sums]))
        write_json(os.path.join(self.tmp, MANIFEST), build_manifest(self.tmp, sums))
        fsync_dir(self.tmp)
        fault_point("save.commit")
        name = os.path.basename(self.final)
        discovery.make_room(self.root, name)
        os.replace(self.tmp, self.final)
        fault_point("save.pointer")
        discovery.write_pointer(self.root, name)
        discovery.finish_lineage(self.root, name)
        discovery.retain(self.root, self.keep_last, self.protect)


def _prepare(root: str, tmp: str, trainer_state: dict) -> Optional[str]:
    """Rank 0: clean leftovers of interrupted saves, create ``tmp``, write the trainer state."""
    try:
        os.makedirs(root, exist_ok=True)
        discovery.clean_leftovers(root)
        os.makedirs(tmp)
        write_json(os.path.join(tmp, STATE_FILE), trainer_state)
    except OSError as e:
        discovery.remove(tmp) if os.path.isdir(tmp) else None
        return _write_error(tmp[:-4], e)
    return None


def save(root: str, iteration: int, model_parts, optimizer, trainer_state: dict, keep_last: int,
         rank_files: Optional[dict[str, Any]] = None, extras: Optional[dict[str, Any]] = None,
         async_save: bool = False, protect: tuple[str, ...] = ()) -> PendingSave:
    """Start one checkpoint on every rank (collective); returns the pending save.

    Synchronous saves come back already written: call :meth:`PendingSave.finalize`
    right away. With ``async_save`` the DCP write continues in the background (the
    state is staged to CPU memory first, so training may modify the weights); poll
    :meth:`PendingSave.ready` and finalize when it is True. Write errors surface in
    ``finalize`` on every rank.

    ``rank_files`` maps file names to objects this rank writes with ``torch.save``
    (tensors and plain values only: they are read back with ``weights_only=True``).
    ``extras`` maps names to state dicts or ``Stateful`` objects saved under
    ``extras.<name>``; :func:`~pretrain.checkpoint.state.load` restores the same names.
    ``protect`` names checkpoints retention must keep (the one the run resumed from).
    """
    final = os.path.join(root, ckpt_name(iteration))
    tmp = final + ".tmp"
    agree(_prepare(root, tmp, trainer_state) if is_rank0() else None)
    state: dict[str, Any] = {"model": merge(model_state(model_parts)),
                             "optimizer": merge(optim_state(model_parts, optimizer))}
    if extras:
        state["extras"] = extras_state(extras)
    keys = sorted({k for ks in _gather([k for top, v in state.items() for k in flat_keys(top, v)])
                   for k in ks})
    pending = PendingSave(root, tmp, final, keep_last, keys, tuple(protect))
    error = None
    try:
        for name, obj in (rank_files or {}).items():
            torch.save(obj, os.path.join(tmp, name))
    except OSError as e:
        error = _write_error(final, e)
    pending.error = next((e for e in _gather(error) if e), None)   # no rank enters DCP alone
    if pending.error:
        return pending
    try:
        with dcp_one_process(not is_dist()):
            if async_save:
                saved = dcp.async_save(state, checkpoint_id=tmp, process_group=_async_group(),
                                       no_dist=not is_dist())
                # a plain Future unless a staging stager is given (then an AsyncSaveResponse)
                pending.future = saved if isinstance(saved, Future) else saved.upload_completion
            else:
                dcp.save(state, checkpoint_id=tmp, no_dist=not is_dist())
    except DCP_ERRORS as e:
        pending.error = _write_error(final, e)
        return pending
    pending.start_checksums()
    return pending
