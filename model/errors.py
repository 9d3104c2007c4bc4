"""The one error base of every command: an error a tool reports as one ``error:`` line.

Every package's error class derives from :class:`PolytronError` (``ConfigError``,
``DataError``, ``CheckpointError``, ``ConvertError``, ``LaunchError``, ...) and keeps its
builtin base (a ``ConfigError`` is still a ``ValueError``, a ``CheckpointError`` still a
``RuntimeError``), so existing ``except`` clauses keep working. The class says the exit
status; ``polytron.tools.cli.command`` turns any of them into one line and that status.

This module imports nothing, so every package (``model/`` is the lowest, see
docs/design.md "Layering") can derive from it without importing torch.
"""
from __future__ import annotations

#: Bad input: a config key, a file, a checkpoint, an option the command refuses.
EXIT_BAD_INPUT = 2
#: The command could not finish for a reason outside its input (writing failed, a peer was lost).
EXIT_FAILED = 1


class PolytronError(Exception):
    """An error reported as one ``error:`` line (its message's first line) and ``exit_code``."""

    #: Exit status of a command that stops with this error (2: bad input).
    exit_code: int = EXIT_BAD_INPUT


class BadInput(PolytronError):
    """Input a tool refuses (an option, a file, a setting); exit status 2."""


class Failure(PolytronError):
    """The command could not finish for a reason outside its input; exit status 1."""

    exit_code = EXIT_FAILED


class WriteFailed(Failure, OSError):
    """Writing the output failed (full disk, permissions, I/O error); exit status 1.

    An ``OSError`` too: ``WriteFailed(errno.ENOSPC, "cannot write DST: ...")``; its line is
    ``strerror`` (prefixed with ``filename`` when one is given).
    """


def error_line(e: BaseException) -> str:
    """The one line a command prints for ``e`` (without ``error: ``).

    An ``OSError`` gives ``filename: strerror``; anything else its message's first line
    (or the class name when the message is empty).
    """
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
