"""The one ``main`` wrapper of every command-line tool and launcher.

    @command
    def main(argv: list[str]) -> int:
        ...

A wrapped ``main`` prints one ``error:`` line and returns the error's exit status for
every :class:`polytron.model.errors.PolytronError` (2: bad input; 1: writing failed;
3: non-finite numerics), returns 1 with ``error: FILE: reason`` for any ``OSError`` (a
full disk, a permission), and 130 with one line on Ctrl-C. Any other exception is a bug
and keeps its traceback. Before ``main`` runs, :func:`quiet_startup` drops the import-time
messages of libraries that concern no run of ours (each by logger and exact message).

Stdlib only: importing this module imports neither torch nor transformers.
"""
from __future__ import annotations

import functools
import logging
import re
import sys
from typing import Callable, Optional, Union, overload

from polytron.model.errors import EXIT_FAILED, PolytronError, error_line

#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130

Main = Callable[..., int]


@overload
def command(main: Main, *, interrupted: str = ..., cleanup: Optional[Callable[[], None]] = ...) -> Main: ...


@overload
def command(main: None = None, *, interrupted: str = ...,
            cleanup: Optional[Callable[[], None]] = ...) -> Callable[[Main], Main]: ...


def command(main: Optional[Main] = None, *, interrupted: str = "error: interrupted",
            cleanup: Optional[Callable[[], None]] = None) -> Union[Main, Callable[[Main], Main]]:
    """Wrap a tool's ``main``: one ``error:`` line and the exit status instead of a traceback.

    ``interrupted`` is the line printed on Ctrl-C; ``cleanup`` runs last, after the error
    line (e.g. closing a process group, which could block). Usable bare (``@command``) or
    with options (``@command(interrupted="error: interrupted; no output written")``).
    """
    def wrap(fn: Main) -> Main:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs) -> int:
            quiet_startup()
            try:
                return fn(*args, **kwargs)
            except PolytronError as e:
                return report(error_line(e), e.exit_code)
            except OSError as e:       # writing failed: a full disk, a permission, an I/O error
                return report(error_line(e), EXIT_FAILED)
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
            finally:
                if cleanup is not None:
                    cleanup()
        return wrapped
    return wrap(main) if main is not None else wrap


def report(line: str, status: int) -> int:
    """Print ``error: line`` to stderr; return ``status``."""
    print(f"error: {line}", file=sys.stderr, flush=True)
    return status


# ====================================================================== start-up output

def _torchao_unused_extension(record: logging.LogRecord) -> bool:
    """torchao's import-time "Failed to load .../torchao/_C_mxfp8...so" and "_C_cutlass_90a"
    lines: kernels of MX formats and of CUTLASS on sm90 that polytron never calls (its FP8 is
    ``torchao.float8`` on ``torch._scaled_mm``); a build mismatch there is not our run's."""
    return bool(re.match(r"Failed to load \S*torchao/_C_(mxfp8|cutlass_90a)[^/\s]*\.so: ", record.getMessage()))


def _torchao_enum_constant(record: logging.LogRecord) -> bool:
    """torch's ``_pytree`` warning that torchao registers its own Enum classes as pytree
    constants (``KernelPreference``, ``ScaleCalculationMode``): a deprecation inside torchao."""
    cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return (str(record.msg).startswith("%s is an Enum subclass and is now natively supported by torch.compile")
            and isinstance(cls, type) and cls.__module__.startswith("torchao."))


#: logger name -> the records of it that are dropped (every other record passes).
KNOWN_NOISE: dict[str, Callable[[logging.LogRecord], bool]] = {
    "torchao": _torchao_unused_extension,
    "torch.utils._pytree": _torchao_enum_constant,
}


class _DropNoise(logging.Filter):
    """A logger filter dropping the records ``test`` matches."""

    def __init__(self, test: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self.test = test

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.test(record)


def quiet_startup() -> None:
    """Install the :data:`KNOWN_NOISE` filters (once; before or after the libraries load).

    DCP's "assuming the intent is to save in a single process" warning is avoided where
    we ask for one process (``pretrain.checkpoint.common.dcp_one_process``), not here.
    """
    for name, test in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(test))
