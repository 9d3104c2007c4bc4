"""Which checkpoints exist, which one to resume, what retention may delete, rollbacks.

One notion of *complete* is used everywhere (resume, ``latest``, retention, tools): a
directory named ``iter_XXXXXXX`` directly under the checkpoint root holding
``.metadata``, ``trainer_state.json`` and ``manifest.json``. The manifest is written
last, after verification, and the directory only gets its final name after that, so a
save interrupted at any point never produces a complete checkpoint.

Everything else under the root is classified, reported and never resumed:

* *leftovers*: ``iter_*.tmp`` (an interrupted save) and ``iter_*.old`` (an interrupted
  deletion). They are our own half-written files; the run holding the run-directory
  lock removes them before its next save.
* *incomplete*: an ``iter_XXXXXXX`` directory without its manifest (damaged or copied
  in by hand). It is never counted by retention and never deleted; a save that needs
  its name moves it aside into ``abandoned/``.

Rollback: resuming from an explicit older checkpoint (or ``training.resume=none``)
starts a new lineage. The checkpoints of the abandoned lineage that are newer than the
starting point are moved to ``abandoned/rollback-to-<name>-<time>/`` (or
``abandoned/restart-<time>/``): kept, never resumed, never deleted. When the
rollback point lies outside this root, ``lineage.json`` records it, so an automatic
resume before the new lineage's first save still continues from it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, TypeVar

from polytron.pretrain.checkpoint.common import (
    MANIFEST,
    POINTER,
    STATE_FILE,
    CheckpointError,
    ckpt_iteration,
    write_json,
)
from polytron.pretrain.faults import fault_point

ABANDONED = "abandoned"
T = TypeVar("T")
LINEAGE = "lineage.json"


@dataclass
class Scan:
    """The checkpoint root, classified. Names are sorted by iteration."""
    root: str
    complete: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def newest(self) -> Optional[str]:
        return self.complete[-1] if self.complete else None


def is_complete(path: str) -> bool:
    """A finished checkpoint has DCP metadata, the trainer state and the manifest."""
    return all(os.path.isfile(os.path.join(path, n)) for n in (".metadata", STATE_FILE, MANIFEST))


def scan(root: str) -> Scan:
    """Classify every ``iter_*`` entry of ``root`` (an absent root is empty)."""
    out = Scan(root)
    if not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith("iter_") or not os.path.isdir(path):
            continue
        if ckpt_iteration(name) is None:
            out.leftovers.append(name)
        elif is_complete(path):
            out.complete.append(name)
        else:
            out.incomplete.append(name)
    return out


def scanned_iteration(name: str) -> int:
    """The iteration of a name :func:`scan` classified complete or incomplete (it has one)."""
    it = ckpt_iteration(name)
    assert it is not None, f"{name} is not a checkpoint name"
    return it


def describe_incomplete(s: Scan) -> list[str]:
    """One line per incomplete checkpoint directory: what is missing and that it is kept."""
    lines = []
    for name in s.incomplete:
        missing = [n for n in (".metadata", STATE_FILE, MANIFEST) if not os.path.isfile(s.path(name))
                   or not os.path.isfile(os.path.join(s.path(name), n))]
        lines.append(f"checkpoint {s.path(name)} is incomplete (no {', '.join(missing)}): "
                     "never resumed, not counted by retention, not deleted")
    return lines


# ---------------------------------------------------------------- lineage

def read_lineage(root: str) -> Optional[dict]:
    """The rollback record of ``root`` (None when absent or unreadable)."""
    try:
        with open(os.path.join(root, LINEAGE)) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) and isinstance(rec.get("iteration"), int) else None
    except (OSError, ValueError):
        return None


def latest_checkpoint(root: str) -> Optional[str]:
    """The checkpoint an automatic resume continues from, or None.

    The newest complete checkpoint of ``root``, unless a rollback to a checkpoint
    outside ``root`` happened and this lineage has not saved past it yet.
    """
    s = scan(root)
    newest = s.newest()
    lineage = read_lineage(root)
    if lineage and (newest is None or ckpt_iteration(newest) <= lineage["iteration"]):
        origin = lineage.get("resumed_from", "")
        if is_complete(origin):
            return origin
    return s.path(newest) if newest else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or the checkpoint to resume from in a run / checkpoint root."""
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


def read_newest(src: str, read: Callable[[str], T], attempts: int = 3) -> tuple[str, T]:
    """``(path, read(path))`` for the checkpoint ``src`` resolves to, on a live run directory too.

    Retention of a running job may delete the checkpoint a tool resolved before the tool
    has read it. When ``read`` fails and the checkpoint directory is gone, ``src`` (a run
    directory or checkpoint root) is resolved again and the newest complete checkpoint
    that still exists is read, up to ``attempts`` times. A checkpoint directory named
    directly, or one that still exists, is not retried: its error says what happened.
    """
    for _ in range(attempts):
        path = resolve_checkpoint(src)
        try:
            return path, read(path)
        except (CheckpointError, OSError):
            if os.path.isdir(path):
                raise                                   # still there: damaged, not removed
            gone = (f"checkpoint {path} was removed while it was being read (retention of a live run "
                    "deletes older checkpoints)")
            if os.path.abspath(path) == os.path.abspath(src):
                raise CheckpointError(f"{gone}; pass the run directory to read its newest complete "
                                      "checkpoint") from None
    raise CheckpointError(f"{gone}; {attempts} checkpoints of {src} were removed while being read in a row: "
                          "copy a checkpoint out of the live run and read the copy")


def start_lineage(root: str, origin: Optional[str]) -> list[str]:
    """Rank 0, when a run starts from ``origin`` (None: from scratch) instead of resuming
    automatically: set the abandoned lineage aside.

    Complete and incomplete checkpoints of ``root`` newer than ``origin`` move to
    ``abandoned/<reason>-<time>/``. Returns the moved paths (new locations).
    """
    it = 0 if origin is None else ckpt_iteration(origin)
    if it is None:                    # e.g. a weights-only export: it is not part of a lineage
        return []
    s = scan(root)
    newer = [n for n in s.complete + s.incomplete if scanned_iteration(n) > it]
    reason = f"rollback-to-{os.path.basename(origin)}" if origin else "restart"
    moved = set_aside(root, newer, f"{reason}-{_stamp()}")
    inside = origin is not None and os.path.dirname(os.path.abspath(origin)) == os.path.abspath(root)
    if origin is None or inside:
        _remove_file(os.path.join(root, LINEAGE))
    else:
        os.makedirs(root, exist_ok=True)
        write_json(os.path.join(root, LINEAGE), {"resumed_from": os.path.abspath(origin), "iteration": it,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if os.path.isdir(root):
        _fix_pointer(root)
    return moved


def set_aside(root: str, names: Iterable[str], group: str) -> list[str]:
    """Move ``names`` (entries of ``root``) into ``root/abandoned/<group>/``; returns new paths."""
    names = list(names)
    if not names:
        return []
    dest = os.path.join(root, ABANDONED, group)
    os.makedirs(dest, exist_ok=True)
    out = []
    for name in names:
        os.replace(os.path.join(root, name), os.path.join(dest, name))
        out.append(os.path.join(dest, name))
    return out


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


# ---------------------------------------------------------------- housekeeping of a save

def clean_leftovers(root: str) -> list[str]:
    """Remove ``iter_*.tmp`` / ``iter_*.old`` of interrupted saves and deletions.

    Only the run that holds the run-directory lock may call this: then no other
    process is writing them, so they are provably abandoned.
    """
    removed = []
    for name in scan(root).leftovers:
        if name.endswith((".tmp", ".old")):
            remove(os.path.join(root, name))
            removed.append(name)
    return removed


def make_room(root: str, name: str) -> Optional[str]:
    """Before a save renames into ``name``: an incomplete directory there is moved aside."""
    path = os.path.join(root, name)
    if os.path.isdir(path) and not is_complete(path):
        return set_aside(root, [name], f"incomplete-{_stamp()}")[0]
    if os.path.isdir(path):           # a complete one of the same iteration: superseded
        remove(path)
    return None


def remove(path: str) -> None:
    """Delete a checkpoint directory; renamed first so a half-deleted one is never complete."""
    if os.path.isdir(path):
        doomed = path + ".old"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def retain(root: str, keep_last: int, protect: Iterable[str] = ()) -> list[str]:
    """Delete complete checkpoints beyond the newest ``keep_last``; returns the deleted names.

    Only complete checkpoints are counted and deleted. Never deleted: the newest
    complete checkpoint and the names in ``protect`` (the checkpoint the run resumed
    from). Incomplete directories are left alone.
    """
    done = scan(root).complete
    keep = set(done[-keep_last:]) | set(done[-1:]) | {os.path.basename(p) for p in protect}
    doomed = [n for n in done if n not in keep]
    for name in doomed:
        fault_point("retention")
        remove(os.path.join(root, name))
    return doomed


def write_pointer(root: str, name: str) -> None:
    """Atomically point ``latest`` at ``name``."""
    tmp = os.path.join(root, POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, POINTER))


def _fix_pointer(root: str) -> None:
    """Point ``latest`` at the newest complete checkpoint, or remove it when there is none."""
    newest = scan(root).newest()
    if newest:
        write_pointer(root, newest)
    else:
        _remove_file(os.path.join(root, POINTER))


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def finish_lineage(root: str, saved: str) -> None:
    """After a save: the lineage record is obsolete once this root holds a newer checkpoint."""
    lineage = read_lineage(root)
    if lineage and ckpt_iteration(saved) > lineage["iteration"]:
        _remove_file(os.path.join(root, LINEAGE))
