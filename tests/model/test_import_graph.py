"""The import graph of the package, read with ``ast`` (nothing imported): no import loop
inside model/, the model core and parallel/ import no architecture folder; and the package
installs under one name: every module imports as ``polytron.*`` only, and a program outside
the checkout cannot ``import data``."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("model", "parallel", "data", "pretrain", "launch", "tools")
#: Architecture folders: the subpackages of model/ (discovered by model/architectures.py).
ARCHS = sorted(p.name for p in (ROOT / "model").iterdir() if (p / "__init__.py").exists())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(["polytron"] + (parts[:-1] if parts[-1] == "__init__" else parts))


def modules(*tops: str) -> dict[str, Path]:
    return {module_name(p): p for top in tops for p in (ROOT / top).rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The polytron modules ``path`` imports anywhere in it (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names}
    return {m for m in out if m.startswith("polytron.")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                comp.append(stack.pop())
                if comp[-1] == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def arch_imports(tops_or_core: dict[str, Path], known: dict[str, Path]) -> list[str]:
    arch_prefixes = tuple(f"polytron.model.{a}" for a in ARCHS)
    return sorted(f"{m} imports {t}" for m, p in tops_or_core.items() for t in imports(p, known)
                  if t.startswith(arch_prefixes))


def test_architectures_are_found_not_listed():
    assert set(ARCHS) >= {"llama", "bitnet", "dha", "moe", "yoco"}
    text = (ROOT / "model" / "architectures.py").read_text(encoding="utf-8")
    assert not [a for a in ARCHS if a in text], "model/architectures.py names an architecture"


def test_no_import_loop_inside_model():
    known = modules("model")
    graph = {m: {t for t in imports(p, known) if t in known} for m, p in known.items()}
    assert cycles(graph) == []


def test_model_core_imports_no_architecture():
    known = modules("model")
    core = {m: p for m, p in known.items() if p.parent == ROOT / "model"}
    assert arch_imports(core, known) == []


def test_parallel_imports_no_architecture():
    known = modules("model", "parallel")
    found = arch_imports(modules("parallel"), known)
    assert found == [], found


#: What an architecture folder may import from the packages above model/: the registries
#: it extends (tensor-parallel styles and their helpers, context-parallel mixers, schedule
#: kinds). Type-only imports (under ``if TYPE_CHECKING:``) are not counted.
UPWARD_REGISTRIES = {"polytron.parallel.roles", "polytron.parallel.tensor_parallel",
                     "polytron.parallel.context", "polytron.pretrain.schedule"}


def runtime_imports(path: Path) -> set[str]:
    """The modules ``path`` imports outside ``if TYPE_CHECKING:`` blocks (any depth)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_model_imports_upward_only_the_registries_it_extends():
    """The model core imports nothing of the packages above it at run time; an architecture
    folder only the registries it extends (docs/design.md, "Layering")."""
    above = tuple(f"polytron.{t}" for t in TOPS if t != "model")
    found = []
    for name, path in sorted(modules("model").items()):
        core = path.parent == ROOT / "model"
        for target in sorted(runtime_imports(path)):
            if target.startswith(above) and (core or target not in UPWARD_REGISTRIES):
                found.append(f"{name} imports {target}")
    assert found == [], found


def test_every_module_imports_under_polytron_only(tmp_path):
    """One module under two names (``model.layers`` and ``polytron.model.layers``) would hold
    two registries; importing everything must leave no bare top-level name in sys.modules."""
    script = (
        "import importlib, pkgutil, sys\n"
        f"tops = {TOPS!r}\n"
        "bad = []\n"
        "for top in tops:\n"
        "    pkg = importlib.import_module('polytron.' + top)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + '.'):\n"
        "        try:\n"
        "            importlib.import_module(m.name)\n"
        "        except Exception as e:\n"
        "            bad.append(f'{m.name}: {type(e).__name__}: {e}')\n"
        "bare = sorted(m for m in sys.modules if m.split('.')[0] in tops)\n"
        "print(repr((bad, bare)))\n")
    res = run_outside(tmp_path, script)
    assert res.returncode == 0, res.stderr[-2000:]
    bad, bare = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert bad == [] and bare == [], (bad, bare)


def test_bare_names_are_not_ours_outside_the_checkout(tmp_path):
    """From a directory outside the checkout, ``import polytron`` works and ``import data``
    (or model, parallel, ...) finds nothing of ours."""
    script = (
        "import polytron, polytron.model.spec, polytron.data\n"
        f"for name in {TOPS!r}:\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError as e:\n"
        "        assert e.name == name, e\n"
        "    else:\n"
        "        raise SystemExit(f'import {name} worked')\n")
    res = run_outside(tmp_path, script)
    assert res.returncode == 0, res.stderr[-2000:]


def run_outside(cwd: Path, code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in ``cwd`` (outside the checkout) with PYTHONPATH unset."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
