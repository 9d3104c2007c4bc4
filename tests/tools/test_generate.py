"""tools/generate.py on a checkpoint trained by launch/pretrain.py (built-in corpus, its tokenizer)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from polytron.tools.generate import main
from tests.checkpoint import runs

TOOL = os.path.join(runs.ROOT, "tools", "generate.py")
PROMPT = "The function returns"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A tiny model trained for 3 iterations (fp32, CPU); its final checkpoint is saved."""
    out = str(tmp_path_factory.mktemp("gen") / "run")
    assert runs.run(out, 3) == 0, runs.output(out)[-3000:]
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """tools/generate.py's main in this process: (exit status, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_script_prints_a_continuation(run_dir, capsys):
    """The script, as a user runs it, continues the prompt; the uncached path and the same
    seed give the same text."""
    args = [run_dir, "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "5"]
    p = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=runs.env(),
                       cwd=runs.ROOT, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith(PROMPT) and p.stdout[len(PROMPT):].strip()
    assert cli(capsys, *args, "--no-cache") == (0, p.stdout, "")
    assert cli(capsys, *args[:-1], "6")[1] != p.stdout                        # another seed


def test_greedy_same_with_and_without_cache(run_dir, capsys):
    args = [run_dir, "--prompt", PROMPT, "--max-new-tokens", "10"]
    code, out, err = cli(capsys, *args)
    assert code == 0 and err == "" and out.startswith(PROMPT) and len(out) > len(PROMPT) + 1
    assert cli(capsys, *args, "--no-cache") == (0, out, "")
    ckpt_dir = os.path.join(run_dir, "checkpoints", "iter_0000003")
    assert cli(capsys, ckpt_dir, *args[1:]) == (0, out, "")                 # a checkpoint directory too


def one_error(capsys, *args: str) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_error_line(run_dir, tmp_path, capsys):
    assert "not a checkpoint" in one_error(capsys, str(tmp_path / "none"), "--prompt", "x")
    err = one_error(capsys, run_dir, "--prompt", "x", "--tokenizer", str(tmp_path / "no.model"))
    assert "no such file" in err
    err = one_error(capsys, run_dir, "--prompt", PROMPT, "--max-new-tokens", "100")
    assert "exceeds the model's max_seq_len of 64" in err
    bad = tmp_path / "corrupt"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "iter_0000003"), bad)
    shard = next(f for f in os.listdir(bad) if f.endswith(".distcp"))
    with open(bad / shard, "r+b") as f:                                     # flip bytes, same size
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "corrupted" in one_error(capsys, str(bad), "--prompt", "x")


def test_config_without_model_is_one_error_line(run_dir, tmp_path, capsys):
    """A trainer state with no model config (and a manifest that still matches it)."""
    from polytron.pretrain.checkpoint import build_manifest
    bad = tmp_path / "nomodel"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "iter_0000003"), bad)
    state = json.loads((bad / "trainer_state.json").read_text())
    del state["config"]["model"]
    (bad / "trainer_state.json").write_text(json.dumps(state))
    (bad / "manifest.json").write_text(json.dumps(build_manifest(str(bad))))
    assert "no usable model config" in one_error(capsys, str(bad), "--prompt", "x")


def test_help_does_not_import_torch():
    """--help answers before the heavy imports (torch, megatron) happen."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{TOOL!r}, '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torch loaded:', 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--max-new-tokens" in p.stdout, p.stderr
    assert p.stdout.rstrip().endswith("torch loaded: False")
