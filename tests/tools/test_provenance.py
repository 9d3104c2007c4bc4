"""What the checkpoint-reading tools trust (issue 25): no code from a checkpoint or model
directory, tokenizer paths and fingerprints checked, live run directories, one error line.

Checkpoints here are weights-only saves (``save_tensors``) of a tiny random model with a
trainer state written by the test, so every case costs a fraction of a second.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.checkpoint import discovery
from polytron.pretrain.config import RunConfig
from tests.checkpoint.helpers import build_model, plant_custom_tokenizer, tiny_model_config, train_spm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "The function returns"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, str]:
    """Three SentencePiece models: the run's, another of the same size, a smaller one."""
    import pydoc_data.topics as topics

    from polytron.data.tokenizer import train_sentencepiece
    d = str(tmp_path_factory.mktemp("toks"))
    docs = list(topics.topics.values())
    return {"run": train_spm(d),
            "other": train_sentencepiece([t[::-1] for t in docs], os.path.join(d, "other"), 384, threads=1),
            "small": train_sentencepiece([re.sub("[^a-z ]", "", t.lower()) for t in docs],
                                         os.path.join(d, "small"), 300, threads=1)}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in build_model(tiny_model_config(), seed=3).state_dict().items()}


def save_run(run_dir: str, weights: dict, tokenizer: str, iteration: int = 2, plugins=(),
             fingerprint=None) -> str:
    """A run directory with one complete checkpoint whose config names ``tokenizer`` as given."""
    run = RunConfig(model=tiny_model_config(plugins=list(plugins)))
    run.data.tokenizer = tokenizer
    state = {"iteration": iteration, "consumed_samples": 0, "consumed_tokens": 0, "extra": {},
             "format_version": ckpt.FORMAT_VERSION, "config": run.to_dict()}
    if fingerprint:
        state["tokenizer_fingerprint"] = fingerprint
    return ckpt.save_tensors(os.path.join(run_dir, "checkpoints", ckpt.ckpt_name(iteration)), weights, state)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, toks, weights) -> str:
    run_dir = str(tmp_path_factory.mktemp("plain") / "run")
    save_run(run_dir, weights, toks["run"])
    return run_dir


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> tuple[str, str]:
    """(module name, marker path): an importable module that writes the marker when imported."""
    name = f"b1_plugin_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "MARKER"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, str(marker)


def run_main(capsys, main, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(capsys, main, *args: str) -> str:
    code, out, err = run_main(capsys, main, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


def generate_main(argv):
    from polytron.tools.generate import main
    return main(argv)


def convert_main(argv):
    from polytron.tools.convert_checkpoint import main
    return main(argv)


# ---------------------------------------------------------------- 1. code named by a checkpoint

def _main_of(tool: str):
    """``polytron.tools.<tool>.main``, imported when called (as each tool's import is lazy here)."""
    return lambda argv: importlib.import_module(f"polytron.tools.{tool}").main(argv)


def _tool_args(tool: str, run_dir: str, tmp) -> tuple:
    jsonl = tmp / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "Some raw text."}) + "\n")
    return {
        "generate": (generate_main, run_dir, "--prompt", "x"),
        "to-hf": (convert_main, "to-hf", run_dir, str(tmp / "hf")),
        "upcycle": (_main_of("upcycle"), "sparse", run_dir, str(tmp / "moe"), "--experts", "2"),
        "dha": (_main_of("convert_mha_to_dha"), run_dir, str(tmp / "dha"), "--budget", "0.5"),
        "synthesize": (_main_of("synthesize_instructions"), "--model", run_dir, "--input", str(jsonl),
                       "--output", str(tmp / "out.jsonl")),
    }[tool]


@pytest.mark.parametrize("tool", ["generate", "to-hf", "upcycle", "dha", "synthesize"])
def test_checkpoint_plugins_are_not_imported(tool, tmp_path, toks, weights, plugin, capsys):
    """A checkpoint listing model.plugins: the tool refuses with one line naming the module and
    --plugin; the module (importable here) is never imported."""
    name, marker = plugin
    run_dir = str(tmp_path / "run")
    save_run(run_dir, weights, toks["run"], plugins=[name])
    main, *args = _tool_args(tool, run_dir, tmp_path)
    line = one_error(capsys, main, *args)
    assert name in line and f"--plugin {name}" in line, line
    assert not os.path.exists(marker) and name not in sys.modules


def test_named_plugin_is_imported(tmp_path, toks, weights, plugin, capsys):
    name, marker = plugin
    run_dir = str(tmp_path / "run")
    save_run(run_dir, weights, toks["run"], plugins=[name])
    code, out, err = run_main(capsys, generate_main, run_dir, "--prompt", PROMPT, "--max-new-tokens", "3",
                              "--plugin", name)
    assert code == 0 and out.startswith(PROMPT), err
    assert os.path.exists(marker)


def test_no_prompt_no_code_with_yes_on_stdin(tmp_path, toks, weights, plugin, plain_run):
    """As a user runs the scripts, with 'y' piped in: a checkpoint's plugin beside it (on the
    path) and a tokenizer directory with auto_map custom code are both refused, nothing runs."""
    name, marker = plugin
    run_dir = str(tmp_path / "run")
    save_run(run_dir, weights, toks["run"], plugins=[name])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    custom = tmp_path / "custom_tok"
    plant_custom_tokenizer(toks["run"], str(custom), marker)
    runs = [[os.path.join(ROOT, "tools", "generate.py"), run_dir, "--prompt", "x"],
            [os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf", plain_run, str(tmp_path / "hf"),
             "--tokenizer", str(custom)]]
    for argv in runs:
        p = subprocess.run([sys.executable, *argv], input="y\ny\n", capture_output=True, text=True,
                           cwd=str(tmp_path), env=env, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
        assert "[y/N]" not in p.stdout + p.stderr
        assert not os.path.exists(marker), argv
    assert not os.path.exists(tmp_path / "hf")


# ---------------------------------------------------------------- 2. tokenizer paths and fingerprints

def test_relative_tokenizer_is_resolved_against_the_run_directory(tmp_path, toks, weights, plain_run,
                                                                   monkeypatch, capsys):
    """An older checkpoint storing data.tokenizer='tok.model': the copy in the run directory is
    used, never the one in the tool's working directory; with none there, one line."""
    run_dir = tmp_path / "run"
    save_run(str(run_dir), weights, "tok.model")
    shutil.copy(toks["run"], run_dir / "tok.model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(toks["other"], elsewhere / "tok.model")           # same size, another tokenizer
    monkeypatch.chdir(elsewhere)
    args = ["--prompt", PROMPT, "--max-new-tokens", "8"]
    want = run_main(capsys, generate_main, plain_run, *args)
    assert want[0] == 0
    assert run_main(capsys, generate_main, str(run_dir), *args) == want
    assert convert_main(["to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == open(toks["run"], "rb").read()
    os.remove(run_dir / "tok.model")
    for main, argv in ((generate_main, [str(run_dir), *args]),
                       (convert_main, ["to-hf", str(run_dir), str(tmp_path / "hf2")])):
        line = one_error(capsys, main, *argv)
        assert "'tok.model'" in line and "relative" in line and "--tokenizer" in line, line


def test_tokenizer_fingerprint_is_verified(tmp_path, toks, weights, capsys):
    """The checkpoint records the fingerprint of the tokenizer it was trained with; its
    data.tokenizer now holds another tokenizer of the same size: refused naming both;
    an explicit --tokenizer is used with a note."""
    from polytron.data.tokenizer import fingerprint_of
    run_dir = str(tmp_path / "run")
    trained, other = fingerprint_of(toks["run"]), fingerprint_of(toks["other"])
    save_run(run_dir, weights, toks["other"], fingerprint=trained)
    for main, argv in ((generate_main, [run_dir, "--prompt", "x"]),
                       (convert_main, ["to-hf", run_dir, str(tmp_path / "hf")])):
        line = one_error(capsys, main, *argv)
        assert trained in line and other in line and "--tokenizer" in line, line
    code, out, err = run_main(capsys, generate_main, run_dir, "--prompt", PROMPT, "--max-new-tokens", "3",
                              "--tokenizer", toks["other"])
    assert code == 0 and out.startswith(PROMPT) and err.startswith("note: ") and trained in err
    code, out, err = run_main(capsys, generate_main, run_dir, "--prompt", PROMPT, "--max-new-tokens", "3",
                              "--tokenizer", toks["run"])
    assert code == 0 and err == ""


# ---------------------------------------------------------------- 3. generate: one line each

@pytest.mark.parametrize("args", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
    ("--top-p", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--device", "meta"),
], ids=lambda a: " ".join(a))
def test_generate_bad_settings_are_one_line(plain_run, args, capsys):
    assert args[0] in one_error(capsys, generate_main, plain_run, "--prompt", "x", *args)


def test_generate_with_a_smaller_tokenizer(plain_run, toks, capsys):
    """A 300-piece tokenizer for a 384-row model: ids it lacks are never generated (sampling
    at a high temperature would hit them at almost every step)."""
    code, out, err = run_main(capsys, generate_main, plain_run, "--prompt", PROMPT, "--max-new-tokens", "40",
                              "--temperature", "5", "--seed", "1", "--tokenizer", toks["small"])
    assert code == 0 and out.startswith(PROMPT) and "Traceback" not in err, err


def test_config_json_that_is_not_an_object(tmp_path, capsys):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("[1, 2]")
    assert "not an object" in one_error(capsys, generate_main, str(d), "--prompt", "x")
    assert "not an object" in one_error(capsys, convert_main, "from-hf", str(d), str(tmp_path / "o"))
    line = one_error(capsys, convert_main, "from-hf", str(d / "config.json"), str(tmp_path / "o"))
    assert "not a directory" in line


# ---------------------------------------------------------------- 4. full disk, aliases

def _mount_tmpfs(path: str, kib: int) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_full_disk_is_one_line_exit_1(tmp_path, plain_run, capsys):
    """to-hf and from-hf onto a file system with room for less than the output: exit 1, one
    line, nothing left behind. Without permission to mount, a per-file size limit
    (RLIMIT_FSIZE, EFBIG) in a subprocess."""
    hf_src = tmp_path / "hf_src"
    assert convert_main(["to-hf", plain_run, str(hf_src)]) == 0
    small = tmp_path / "small"
    cmds = [["to-hf", plain_run, str(small / "hf")], ["from-hf", str(hf_src), str(small / "ours")]]
    if _mount_tmpfs(str(small), 200):
        try:
            for argv in cmds:
                code, out, err = run_main(capsys, convert_main, *argv)
                assert code == 1 and err.startswith("error: cannot write ") and err.count("\n") == 1, err
                assert "No space left on device" in err and os.listdir(small) == []
        finally:
            subprocess.run(["umount", str(small)], check=True)
        return
    import resource
    small.mkdir(exist_ok=True)
    for argv in cmds:
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *argv],
                           capture_output=True, text=True, timeout=120,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))
        assert p.returncode == 1 and p.stderr.startswith("error: cannot write "), p.stderr
        assert p.stderr.count("\n") == 1 and os.listdir(small) == []


def test_to_hf_into_an_alias_of_its_source_is_refused(tmp_path, plain_run, capsys):
    link = tmp_path / "alias"
    os.symlink(os.path.join(plain_run, "checkpoints", "iter_0000002"), link)
    before = sorted(os.listdir(link))
    assert "is the source" in one_error(capsys, convert_main, "to-hf", plain_run, str(link), "--overwrite")
    assert sorted(os.listdir(link)) == before


# ---------------------------------------------------------------- 5. live run directories

def test_checkpoint_removed_while_reading_falls_back(tmp_path, weights):
    """Retention deletes the newest checkpoint after the tool resolved it (the read below does
    what retention does at that moment): the newest complete checkpoint still there is read."""
    run_dir = str(tmp_path / "run")
    older = save_run(run_dir, weights, "tok.model", iteration=2)
    newest = save_run(run_dir, weights, "tok.model", iteration=4)
    seen = []

    def read(path: str):
        seen.append(path)
        if path == newest:
            discovery.remove(newest)              # retention of the live run, mid-read
        return ckpt.read_trainer_state(path)["iteration"], ckpt.load_tensors(path)

    path, (iteration, tensors) = discovery.read_newest(run_dir, read)
    assert (path, iteration, seen) == (older, 2, [newest, older])
    assert torch.equal(tensors["tok_embeddings.weight"], weights["tok_embeddings.weight"])


@pytest.mark.parametrize("tool", ["generate", "to-hf"])
def test_tools_on_a_live_run_read_the_newest_remaining_checkpoint(tool, tmp_path, toks, weights, plain_run,
                                                                   monkeypatch, capsys):
    """The tools themselves on a run directory whose retention deletes the newest checkpoint
    right after the tool resolved it (done at the tool's first read of its trainer state):
    exit 0 with the older checkpoint's weights, where they once said 'has no manifest.json:
    unfinished save'."""
    run_dir = str(tmp_path / "run")
    older = save_run(run_dir, weights, toks["run"], iteration=2)                # = plain_run's weights
    other = {k: v.detach().clone() for k, v in build_model(tiny_model_config(), seed=11).state_dict().items()}
    newest = save_run(run_dir, other, toks["run"], iteration=4)
    real_read, seen = ckpt.read_trainer_state, []

    def read_trainer_state(path: str) -> dict:
        seen.append(os.path.abspath(path))
        if seen[-1] == newest:
            discovery.remove(newest)                                           # retention, mid-read
        return real_read(path)

    monkeypatch.setattr(ckpt, "read_trainer_state", read_trainer_state)
    if tool == "generate":
        args = ["--prompt", PROMPT, "--max-new-tokens", "8"]
        code, out, err = run_main(capsys, generate_main, run_dir, *args)
        assert (code, err) == (0, "") and out == run_main(capsys, generate_main, plain_run, *args)[1]
    else:
        from safetensors.torch import load_file
        code, out, err = run_main(capsys, convert_main, "to-hf", run_dir, str(tmp_path / "hf"))
        assert code == 0 and "Traceback" not in err, err
        hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
        assert torch.equal(hf["model.embed_tokens.weight"], weights["tok_embeddings.weight"])
    assert seen[0] == newest and older in seen and not os.path.exists(newest)


def test_named_checkpoint_removed_while_reading_says_so(tmp_path, weights):
    newest = save_run(str(tmp_path / "run"), weights, "tok.model", iteration=4)

    def read(path: str):
        discovery.remove(path)
        return ckpt.load_tensors(path)

    with pytest.raises(ckpt.CheckpointError, match=r"was removed while it was being read \(retention"):
        discovery.read_newest(newest, read)
    run_dir = str(tmp_path / "run2")
    for it in (2, 4, 6, 8):
        save_run(run_dir, weights, "tok.model", iteration=it)
    with pytest.raises(ckpt.CheckpointError, match="3 checkpoints of .* removed while being read in a row"):
        discovery.read_newest(run_dir, read)
    assert ckpt.scan(os.path.join(run_dir, "checkpoints")).complete == ["iter_0000002"]


def test_from_hf_records_the_tokenizer_and_sets_aside_an_earlier_run(tmp_path):
    """from-hf into a DST whose earlier conversion was already trained on: the old DST/run is
    renamed (it would resume instead of the new checkpoint), and the new checkpoint records
    the HF tokenizer's fingerprint, so a resume or load checks it."""
    from polytron.data.tokenizer import fingerprint_of
    from polytron.pretrain import checkpoint as ckpt
    from polytron.tools.convert_checkpoint import main as convert
    from tests.checkpoint.helpers import hf_llama
    src, dst = str(tmp_path / "hf"), str(tmp_path / "dst")
    hf_llama(src, tokenizer=train_spm(str(tmp_path)))
    assert convert(["from-hf", src, dst]) == 0
    os.makedirs(os.path.join(dst, "run", "checkpoints"))
    assert convert(["from-hf", src, dst, "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(dst, "run"))
    assert len(glob.glob(os.path.join(dst, "run.superseded-*"))) == 1
    state = ckpt.read_trainer_state(os.path.join(dst, "checkpoint"))
    assert state["tokenizer_fingerprint"] == fingerprint_of(src)
