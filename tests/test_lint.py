"""Lint and types: ruff and mypy over the package report zero findings.

Both are dev dependencies (``pip install -e .[dev]``), configured in the repository's own
``ruff.toml`` and ``mypy.ini``; a missing tool fails these tests rather than skipping them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The repository's folders installed as ``polytron.<folder>`` (setup.py's FOLDERS).
PACKAGE_FOLDERS = ("model", "data", "parallel", "pretrain", "launch", "tools")
LINTED = (*PACKAGE_FOLDERS, "tests")


def _tool(name: str) -> str:
    """The ``name`` executable next to this interpreter (else on PATH); fails when absent."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is a dev dependency (pip install -e .[dev])")
    return found


def _run(argv: list[str], cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_ruff_reports_nothing() -> None:
    proc = _run([_tool("ruff"), "check", "--no-cache", *LINTED], cwd=ROOT)
    assert proc.returncode == 0, f"ruff findings:\n{proc.stdout}{proc.stderr}"


def mypy_root(tmp: str) -> str:
    """A directory holding ``polytron/<folder>`` symlinks to the repository's folders.

    mypy does not follow setuptools' editable finder, so it checks ``-p polytron`` through
    this tree (``polytron`` is a namespace package, as installed)."""
    package = os.path.join(tmp, "polytron")
    os.makedirs(package)
    for folder in PACKAGE_FOLDERS:
        os.symlink(os.path.join(ROOT, folder), os.path.join(package, folder))
    return tmp


def test_mypy_reports_nothing(tmp_path) -> None:
    root = mypy_root(str(tmp_path))
    env = dict(os.environ, MYPYPATH=root)
    proc = _run([_tool("mypy"), "-p", "polytron", "--config-file", os.path.join(ROOT, "mypy.ini"),
                 "--cache-dir", os.path.join(root, ".mypy_cache")], cwd=root, env=env)
    assert proc.returncode == 0, f"mypy findings:\n{proc.stdout}{proc.stderr}"
