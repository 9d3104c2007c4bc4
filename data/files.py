"""File-system checks shared by the data tools: input files, writable output directories.

Every failure here is a :class:`DataError` of one line naming the path, so the tools and
the launcher can print it as a single ``error:`` line instead of a traceback.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from data.errors import DataError


def os_reason(e: OSError) -> str:
    """Short text of an ``OSError``: the system's message and the path it names."""
    text = e.strerror or type(e).__name__
    return f"{text}: {e.filename}" if e.filename else text


def check_input_files(inputs: list[str]) -> None:
    """Every input must be an existing regular file (a directory is named as such)."""
    if not inputs:
        raise DataError("no input files given")
    for p in inputs:
        if os.path.isdir(p):
            raise DataError(f"input {p}: is a directory; give files")
        if not os.path.isfile(p):
            raise DataError(f"input {p}: no such file")


def name_inputs(inputs: list[str], shown: int = 3) -> str:
    """``input a`` or ``inputs a, b, c and 4 more`` for a one-line message."""
    if len(inputs) == 1:
        return f"input {inputs[0]}"
    more = f" and {len(inputs) - shown} more" if len(inputs) > shown else ""
    return "inputs " + ", ".join(inputs[:shown]) + more


def missing_dirs(directory: str) -> list[str]:
    """The ancestors of ``directory`` (itself included) that do not exist yet, outermost first."""
    out: list[str] = []
    d = os.path.abspath(directory)
    while not os.path.lexists(d):
        out.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out[::-1]


def remove_empty_dirs(dirs: list[str]) -> None:
    """Remove directories created by a failed run, innermost first, if still empty."""
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _blocking_file(directory: str) -> str | None:
    """The nearest existing ancestor of ``directory`` when it is not a directory."""
    d = os.path.abspath(directory)
    while not os.path.lexists(d):
        d = os.path.dirname(d)
    return None if os.path.isdir(d) else d


def ensure_writable_dir(directory: str, what: str) -> str:
    """Create ``directory`` if needed and prove a file can be created in it.

    ``what`` starts the error line (``"output /x/y"``, ``"data.cache_dir /c"``).
    Returns the absolute directory.
    """
    d = os.path.abspath(os.path.expanduser(directory))
    blocker = _blocking_file(d)
    if blocker is not None:
        raise DataError(f"{what}: cannot write there: {blocker} is a file, not a directory")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise DataError(f"{what}: cannot create {d} ({os_reason(e)})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{what}: cannot write in {d} ({e.strerror or type(e).__name__})") from None
    return d


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing into a one-line :class:`DataError`."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{what}: cannot write ({os_reason(e)})") from None
