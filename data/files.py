"""File-system checks shared by the data tools: input files, writable output directories.

Every failure here is a :class:`DataError` of one line naming the path, so the tools and
the launcher can print it as a single ``error:`` line instead of a traceback.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterator

from polytron.data.errors import DataError


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


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (the same device and inode), through symlinks and
    hard links; False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_prefix(prefix: str, option: str = "output prefix") -> str:
    """The absolute form of a dataset output prefix; :class:`DataError` for a prefix that
    names a directory (``data/out/``, ``data/out/.``) instead of a file name prefix, which
    would otherwise write ``data/out.bin`` into the parent directory."""
    base = os.path.basename(prefix)
    if not prefix or base in ("", ".", ".."):
        raise DataError(f"{option} {prefix!r}: names a directory; give a file name prefix "
                        f"inside it (e.g. {os.path.join(prefix.rstrip('/') or '.', 'name')})")
    return os.path.abspath(os.path.expanduser(prefix))


def output_name(prefix: str) -> re.Pattern:
    """Names of the files a run writing ``prefix`` makes in its directory: ``NAME.bin``,
    ``.idx``, ``.summary.json``, shards ``NAME_00000.*``, and their ``.tmpPID`` temporaries
    (group ``pid``)."""
    name = re.escape(os.path.basename(prefix))
    return re.compile(rf"{name}(?:_\d{{5}})?\.(?:bin|idx|summary\.json)(?:\.tmp(?P<pid>\d+))?")


def is_own_output(path: str, prefix: str) -> bool:
    """Whether ``path`` is one of the files (or temporaries) a run writing ``prefix`` makes:
    same real directory, name matching :func:`output_name`."""
    real_dir = os.path.realpath(os.path.dirname(os.path.abspath(prefix)))
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != real_dir:
        return False
    return output_name(prefix).fullmatch(os.path.basename(path)) is not None


def file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` resolves to; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def output_ids(prefix: str) -> set[tuple[int, int]]:
    """(device, inode) of every existing file a run writing ``prefix`` makes (see
    :func:`output_name`), so an input reached through a symlink or a hard link is
    recognised as one of them."""
    directory = os.path.dirname(os.path.abspath(prefix))
    pattern = output_name(prefix)
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return set()
    return {i for i in (file_id(os.path.join(directory, n)) for n in names) if i is not None}


def refuse_outputs_as_inputs(inputs: list[str], prefix: str, option: str = "--output-prefix") -> None:
    """:class:`DataError` when an input file is (by name or by device and inode) one of the
    files a run writing ``prefix`` makes or replaces."""
    ids = output_ids(prefix)
    for p in inputs:
        if is_own_output(p, prefix) or file_id(p) in ids:
            raise DataError(f"input {p}: is also an output of {prefix} (the same file); "
                            f"choose another {option}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(prefix: str) -> list[str]:
    """Remove the ``.tmpPID`` files an earlier, killed run writing ``prefix`` left behind
    (their PID no longer alive on this host); return the paths removed. Temporaries of a
    live run are kept."""
    directory = os.path.dirname(os.path.abspath(prefix))
    pattern = output_name(prefix)
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for n in names:
        m = pattern.fullmatch(n)
        if m and m.group("pid") and not _alive(int(m.group("pid"))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, n))
                removed.append(os.path.join(directory, n))
    return removed


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing into a one-line :class:`DataError`."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{what}: cannot write ({os_reason(e)})") from None
