"""Names, errors and small process-group helpers shared by the checkpoint modules."""
from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch.distributed as dist

from polytron.model.errors import PolytronError

#: A complete checkpoint's directory name; anything with a suffix is not one.
CKPT_RE = re.compile(r"^iter_(\d{7})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
POINTER = "latest"
FORMAT_VERSION = 1


class CheckpointError(PolytronError, RuntimeError):
    """A checkpoint that cannot be used or written; the message names the file or tensor."""


def ckpt_name(iteration: int) -> str:
    """Directory name of the checkpoint taken after ``iteration`` steps."""
    return f"iter_{iteration:07d}"


def ckpt_iteration(name: str) -> Optional[int]:
    """The iteration of a checkpoint directory name, or None for any other name."""
    m = CKPT_RE.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)) if m else None


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


#: DCP's warning whenever it saves or loads without a process group (``no_dist``).
DCP_ONE_PROCESS_NOTE = (r"torch\.distributed is disabled, unavailable or uninitialized, "
                        r"assuming the intent is to (save|load) in a single process")


@contextmanager
def dcp_one_process(no_dist: bool) -> Iterator[None]:
    """Around a ``dcp.save``/``dcp.load`` given ``no_dist``: one process is then our intent,
    so DCP's warning saying it assumes one process is dropped (that message only)."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message=DCP_ONE_PROCESS_NOTE, category=UserWarning)
        yield


def barrier() -> None:
    if is_dist():
        dist.barrier()


def is_rank0() -> bool:
    return not is_dist() or dist.get_rank() == 0


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty).

    DCP's ``CheckpointException`` carries each failed rank's own exception: the first
    of those is described instead ("rank 1: [Errno 28] No space left on device")."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, cause = sorted(failures.items(), key=lambda kv: kv[0])[0]
        if isinstance(cause, tuple) and cause and isinstance(cause[0], BaseException):
            cause = cause[0]
        if isinstance(cause, BaseException):
            return f"rank {rank}: {first_line(cause)}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def agree(error: Optional[str], collective: bool = True) -> None:
    """Raise the first rank's error on every rank (so no rank enters DCP's collectives alone)."""
    errors = [error]
    if collective and is_dist():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def write_json(file: str, obj: Any) -> None:
    """Write ``obj`` as JSON and fsync it."""
    with open(file, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
