"""One command-line plumbing: the error base, the ``main`` wrapper, and start-up output."""
from __future__ import annotations

import ast
import errno
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from polytron.model.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, Failure, PolytronError, WriteFailed
from polytron.tools.cli import command, quiet_startup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Lines of library start-up output no command of ours may print.
NOISE = ("Failed to load", "_C_mxfp8", "_C_cutlass_90a", "register_constant()",
         "torch.distributed is disabled")


def _error_classes() -> dict[type, tuple[type, int]]:
    """Every package's error class -> (the builtin base it keeps, its exit status)."""
    from polytron.data.errors import DataError
    from polytron.launch.env import LaunchError
    from polytron.launch.submit import SubmitError
    from polytron.model.configlib import ConfigError
    from polytron.model.generate import GenerationError
    from polytron.model.hf import ConvertError
    from polytron.model.provenance import UntrustedCode
    from polytron.parallel.mesh import LayoutError
    from polytron.pretrain.checkpoint.common import CheckpointError
    from polytron.pretrain.errors import RunError
    from polytron.pretrain.guards import NumericsError
    from polytron.pretrain.runlock import RunLockError
    from polytron.tools.plot_metrics import MetricsError
    bad = EXIT_BAD_INPUT
    return {ConfigError: (ValueError, bad), LayoutError: (ValueError, bad), UntrustedCode: (ValueError, bad),
            ConvertError: (ValueError, bad), GenerationError: (ValueError, bad), DataError: (ValueError, bad),
            MetricsError: (ValueError, bad), CheckpointError: (RuntimeError, bad), RunError: (RuntimeError, bad),
            RunLockError: (RuntimeError, bad), LaunchError: (RuntimeError, bad), SubmitError: (Exception, bad),
            NumericsError: (RuntimeError, 3), BadInput: (Exception, bad), Failure: (Exception, EXIT_FAILED),
            WriteFailed: (OSError, EXIT_FAILED)}


def test_every_error_class_derives_from_the_one_base():
    """One base with an exit status; each class keeps its builtin base, so old ``except``s still match."""
    for cls, (builtin, status) in _error_classes().items():
        assert issubclass(cls, PolytronError) and issubclass(cls, builtin), cls
        assert cls.exit_code == status, cls


def _run(fn, capsys) -> tuple[int, list[str]]:
    status = command(fn)()
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("error, status, line", [
    (BadInput("--top-p 2: must be in (0, 1]\nsecond line"), 2, "error: --top-p 2: must be in (0, 1]"),
    (Failure("lost contact with rank 1"), 1, "error: lost contact with rank 1"),
    (WriteFailed(errno.ENOSPC, "cannot write out: no space; out is left as it was"), 1,
     "error: cannot write out: no space; out is left as it was"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/metrics.jsonl"), 1,
     "error: /x/metrics.jsonl: No such file or directory"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
])
def test_wrapper_prints_one_line_and_the_status(error, status, line, capsys):
    def main() -> int:
        raise error
    assert _run(main, capsys) == (status, [line])


def test_wrapper_keeps_the_traceback_of_a_bug_and_runs_cleanup(capsys):
    """An unexpected exception is a bug: it propagates (traceback); ``cleanup`` runs after the line."""
    calls = []

    @command(cleanup=lambda: calls.append("cleanup"))
    def main() -> int:
        raise ZeroDivisionError("bug")
    with pytest.raises(ZeroDivisionError):
        main()
    assert calls == ["cleanup"] and capsys.readouterr().err == ""
    assert command(lambda: 0)() == 0


def _entry_points() -> list[str]:
    """Every script of tools/, launch/ and launch/slurm/ that runs as ``__main__``."""
    out = []
    for folder in ("tools", "launch", os.path.join("launch", "slurm")):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            path = os.path.join(ROOT, folder, name)
            if name.endswith(".py") and "__main__" in open(path, encoding="utf-8").read():
                out.append(path)
    return out


def test_every_tool_uses_the_one_wrapper():
    """Each entry point's main is wrapped by ``command``; no copied error-to-status blocks."""
    scripts = _entry_points()
    assert len(scripts) >= 20
    for path in scripts:
        text = open(path, encoding="utf-8").read()
        tree = ast.parse(text)
        entry = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("main", "run")
                 and any("command" in ast.unparse(d) for d in n.decorator_list)]
        assert entry, f"{path}: main is not wrapped by polytron.tools.cli.command"
        for copied in ("EXIT_BAD_INPUT = ", "_is_bad_input", "sys.modules.get(\"polytron", "class BadInput"):
            assert copied not in text, f"{path}: {copied}"


def test_known_noise_is_dropped_and_nothing_else(caplog):
    """torchao's unused-extension lines are dropped by exact message; its other warnings pass."""
    quiet_startup()
    quiet_startup()                                  # idempotent: one filter per logger
    assert len(logging.getLogger("torchao").filters) == 1
    # parallel/fp8.py quiets the torchao logger once FP8 is built (an earlier test may have):
    # the filter is what is under test here, so give the logger its default level back
    with caplog.at_level(logging.WARNING), caplog.at_level(logging.WARNING, logger="torchao"):
        logging.getLogger("torchao").warning("Failed to load /v/torchao/_C_mxfp8.cpython-310-x.so: no")
        logging.getLogger("torchao").warning("Failed to load /v/torchao/_C_other.so: kept")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.",
            type("UserEnum", (), {"__module__": "mine"}))
    kept = [r.getMessage() for r in caplog.records]
    assert len(kept) == 2 and "_C_other" in kept[0] and "UserEnum" in kept[1], kept


def test_one_process_checkpoint_io_warns_nothing(tmp_path):
    """DCP's "assuming ... single process" note is avoided where we ask for one process;
    another warning inside the same calls still shows."""
    import torch

    from polytron.pretrain.checkpoint.common import dcp_one_process
    from polytron.pretrain.checkpoint.offline import load_tensors, save_tensors
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        path = save_tensors(str(tmp_path / "ckpt"), {"w": torch.ones(2)}, {"iteration": 0})
        assert torch.equal(load_tensors(path)["w"], torch.ones(2))
        with dcp_one_process(True):
            warnings.warn("a warning about the user's run", stacklevel=1)   # attributed to this line
    assert [str(w.message) for w in seen] == ["a warning about the user's run"]


def test_tools_print_no_startup_noise(tmp_path):
    """A one-process conversion (from-hf: DCP save) and a synthesis with a transformers model
    (torchao is imported) print their results and none of the :data:`NOISE` lines."""
    from tests.checkpoint.helpers import hf_llama, train_spm
    src = str(tmp_path / "hf")
    hf_llama(src, tokenizer=train_spm(str(tmp_path)))
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"text": "A short document about cats."}) + "\n")
    script = ("import sys\n"
              "from polytron.tools import convert_checkpoint, synthesize_instructions\n"
              f"assert convert_checkpoint.main(['from-hf', {src!r}, {str(tmp_path / 'ours')!r}]) == 0\n"
              f"sys.exit(synthesize_instructions.main(['--model', {src!r}, '--input', {str(raw)!r}, '--output', "
              f"{str(tmp_path / 'pairs.jsonl')!r}, '--max-new-tokens', '2', '--no-progress']))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote checkpoint" in r.stdout and "1 documents" in r.stdout, r.stdout
    noisy = [line for line in r.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy


def test_cli_imports_no_torch():
    """Tools and launchers can import the plumbing before deciding to import torch."""
    code = "import sys, polytron.tools.cli, polytron.model.errors; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
