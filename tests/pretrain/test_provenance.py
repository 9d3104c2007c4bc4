"""What a run trusts in its own files (issue 25): the tokenizer a checkpoint was trained
with, the paths its config names, the checkpoint it was initialized from, and a resume
with nothing left to train.

One tiny run (2 iterations, in this process) is trained once for the module, from a
launch directory with relative paths; each test copies its run directory and goes on
from there through ``launch/pretrain.py``'s ``run(argv)``.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import zlib
from dataclasses import dataclass

import pytest
import yaml

from polytron.data.builtin import iter_builtin_documents
from polytron.data.preprocess import preprocess
from polytron.data.tokenizer import fingerprint_of, train_sentencepiece
from polytron.launch.pretrain import run as launch
from tests.checkpoint import runs

TINY_YAML = os.path.join(runs.ROOT, "launch", "configs", "tiny.yaml")
VOCAB = 384
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Base:
    root: str          # the launch directory of the first run
    run: str           # its run directory (trained 2 iterations)
    output: str        # its console output
    tok_a: str
    tok_b: str         # another tokenizer of the same vocabulary size
    data_a: str
    data_b: str        # the same documents tokenized with tok_b


def _write_jsonl(path: str, docs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def _args(*extra: str) -> list[str]:
    """The tiny CPU run on our own datasets (builtin corpus off)."""
    return ["--config", TINY_YAML, *runs.TINY, "model.vocab_size=512", "data.builtin_corpus=false",
            "checkpoint.interval=0", *extra]


def _launch(argv: list[str]) -> tuple[int, str, str]:
    """launch/pretrain.py's run(argv) in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = launch(argv)
    finally:
        os.environ.update(saved)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = str(tmp_path_factory.mktemp("launch-dir"))
    docs = [d for d in itertools.islice(iter_builtin_documents(), 240) if len(d) > 200]
    tok_a = train_sentencepiece(docs[0::2], os.path.join(root, "tok_a"), VOCAB, threads=1)
    tok_b = train_sentencepiece(docs[1::2], os.path.join(root, "tok_b"), VOCAB, threads=1)
    text = _write_jsonl(os.path.join(root, "docs.jsonl"), docs)
    preprocess([text], os.path.join(root, "a"), tok_a)
    preprocess([text], os.path.join(root, "b"), tok_b)
    cwd = os.getcwd()
    os.chdir(root)
    try:         # relative paths, as a user types them in the launch directory
        rc, out, err = _launch(_args("training.iterations=2", "training.output_dir=runs/base",
                                     "data.tokenizer=tok_a.model", "data.paths=[a]", "data.cache_dir=cache",
                                     "precision.fp8.pow2_scales=true", "precision.fp8.keep_first_blocks=1"))
    finally:
        os.chdir(cwd)
    assert rc == 0, err
    return Base(root, os.path.join(root, "runs", "base"), out, tok_a, tok_b, os.path.join(root, "a"),
                os.path.join(root, "b"))


def _copy_run(base: Base, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(base.run, dst)
    return dst


def _checkpoint(run: str, it: int) -> str:
    return os.path.join(run, "checkpoints", f"iter_{it:07d}")


def _state(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        return json.load(f)


def _snapshot(run: str) -> dict[str, tuple[float, int]]:
    """Every file under ``run`` with its mtime and CRC32."""
    out = {}
    for where, _, names in os.walk(run):
        for name in names:
            path = os.path.join(where, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run)] = (os.path.getmtime(path), zlib.crc32(f.read()))
    return out


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- paths

def test_relative_paths_are_stored_absolute(base):
    """config.yaml and the checkpoint's run config name the files the launch meant, absolute."""
    st = _state(_checkpoint(base.run, 2))
    for cfg in (st["config"], yaml.safe_load(open(os.path.join(base.run, "config.yaml")))):
        assert cfg["data"]["tokenizer"] == base.tok_a
        assert cfg["data"]["paths"] == [base.data_a]
        assert cfg["data"]["cache_dir"] == os.path.join(base.root, "cache")
        assert cfg["training"]["output_dir"] == base.run


def test_print_config_shows_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rc, out, err = _launch(["--config", TINY_YAML, "--print-config", "data.tokenizer=t/spm.model",
                            "data.paths=[d/a,../b]", "data.cache_dir=~/cache", "checkpoint.load=conv/checkpoint",
                            "checkpoint.dir=ck", "training.resume=old/run"])
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    t = str(tmp_path)
    assert cfg["data"]["tokenizer"] == f"{t}/t/spm.model"
    assert cfg["data"]["paths"] == [f"{t}/d/a", os.path.join(os.path.dirname(t), "b")]
    assert cfg["data"]["cache_dir"] == f"{t}/home/cache"
    assert cfg["checkpoint"]["load"] == f"{t}/conv/checkpoint" and cfg["checkpoint"]["dir"] == f"{t}/ck"
    assert cfg["training"]["resume"] == f"{t}/old/run"
    assert cfg["training"]["output_dir"] == f"{t}/runs/tiny"


# ---------------------------------------------------------------- tokenizer identity

def test_checkpoint_records_the_tokenizer_fingerprint(base):
    assert _state(_checkpoint(base.run, 2))["tokenizer_fingerprint"] == fingerprint_of(base.tok_a)


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(base, tmp_path):
    """The data and the tokenizer were replaced (same vocabulary size): refused, naming both
    fingerprints and the override; nothing is written. The override resumes."""
    run = _copy_run(base, tmp_path)
    before = _snapshot(run)
    other = ["training.iterations=3", f"training.output_dir={run}", f"data.tokenizer={base.tok_b}",
             f"data.paths=[{base.data_b}]", f"data.cache_dir={base.root}/cache"]
    rc, out, err = _launch(_args(*other))
    line = _one_error(err)
    assert rc == 2
    for needle in (fingerprint_of(base.tok_a), fingerprint_of(base.tok_b), "checkpoint.allow_tokenizer_change"):
        assert needle in line, line
    kept = lambda snap: {k: v for k, v in snap.items() if k not in ("config.yaml", ".polytron.lock")}  # noqa: E731
    assert kept(_snapshot(run)) == kept(before)
    rc, out, err = _launch(_args(*other, "checkpoint.allow_tokenizer_change=true"))
    assert rc == 0, err
    assert "warning: checkpoint" in out and "resumed from checkpoint" in out
    assert _state(_checkpoint(run, 3))["tokenizer_fingerprint"] == fingerprint_of(base.tok_b)


# ---------------------------------------------------------------- nothing to do

@pytest.mark.parametrize("iterations", [2, 1])
def test_resume_at_or_past_the_end_writes_nothing(base, tmp_path, iterations):
    run = _copy_run(base, tmp_path)
    before = _snapshot(run)
    rc, out, err = _launch(_args(f"training.iterations={iterations}", f"training.output_dir={run}",
                                 f"data.tokenizer={base.tok_a}", f"data.paths=[{base.data_a}]",
                                 f"data.cache_dir={base.root}/cache"))
    assert rc == 0 and not err.strip(), err
    assert (f"nothing to do: checkpoint {_checkpoint(run, 2)} is at iteration 2 >= "
            f"training.iterations={iterations}") in out
    after = _snapshot(run)
    after.pop(".polytron.lock"), before.pop(".polytron.lock")     # the lock is taken and released
    assert after == before


# ---------------------------------------------------------------- FP8 settings with FP8 off

def test_fp8_settings_without_fp8_are_named_in_a_note(base):
    notes = [line for line in base.output.splitlines() if line.startswith("note: ")]
    assert notes == ["note: precision.fp8.enabled is false: precision.fp8.pow2_scales, "
                     "precision.fp8.keep_first_blocks have no effect in this run"], notes


# ---------------------------------------------------------------- a stale run under DST

def _convert(base: Base, dst: str, scale: float) -> dict:
    """What upcycle.py / convert_mha_to_dha.py do at their end: write_converted_run of the
    base run's weights (scaled) into DST."""
    from polytron.pretrain import checkpoint as ckpt
    from polytron.pretrain.config import config_from_dict
    from polytron.tools.convert_checkpoint import write_converted_run
    src = _checkpoint(base.run, 2)
    tensors = {k: v * scale for k, v in ckpt.load_tensors(src).items()}
    run = config_from_dict(_state(src)["config"])
    report: dict = {"scale": scale}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        write_converted_run(dst, run, run.model, tensors, src, suffix="test", what="(test)",
                            report_name="report.json", report=report)
    return {"stdout": out.getvalue(), "report": json.load(open(os.path.join(dst, "report.json")))}


def test_conversion_sets_aside_the_earlier_run_and_training_refuses_a_shadowed_load(base, tmp_path):
    from polytron.pretrain import checkpoint as ckpt
    dst = str(tmp_path / "dst")
    _convert(base, dst, 1.0)
    rc, out, err = _launch(["--config", os.path.join(dst, "config.yaml"), "training.iterations=3"])
    assert rc == 0 and f"initialized model weights from {dst}/checkpoint" in out, err
    first = _state(_checkpoint(f"{dst}/run", 3))["initialized_from"]
    assert first == {"path": f"{dst}/checkpoint", "identity": ckpt.identity(f"{dst}/checkpoint")}

    # a tool that rewrites DST/checkpoint but leaves DST/run: training refuses to resume it
    aside = str(tmp_path / "aside")
    shutil.copytree(dst, aside)
    ckpt.save_tensors(f"{aside}/checkpoint", {k: v * 0.5 for k, v in ckpt.load_tensors(
        f"{aside}/checkpoint").items()}, _state(f"{aside}/checkpoint"))
    rc, out, err = _launch(["--config", os.path.join(dst, "config.yaml"), "training.iterations=4",
                            f"checkpoint.load={aside}/checkpoint", f"training.output_dir={aside}/run"])
    line = _one_error(err)
    assert rc == 2 and f"checkpoint.load={aside}/checkpoint is not the checkpoint this run started" in line
    assert f"would resume {aside}/run/checkpoints/iter_0000003" in line and "training.resume=none" in line

    # write_converted_run over it (--overwrite): DST/run is set aside, training starts anew
    result = _convert(base, dst, 0.5)
    superseded = result["report"]["superseded_run"]
    assert superseded.startswith(f"{dst}/run.superseded-") and not os.path.exists(f"{dst}/run")
    assert os.path.isdir(_checkpoint(superseded, 3)) and superseded in result["stdout"]
    rc, out, err = _launch(["--config", os.path.join(dst, "config.yaml"), "training.iterations=1"])
    assert rc == 0 and f"initialized model weights from {dst}/checkpoint" in out, err


# ---------------------------------------------------------------- ranks resolve alike

def test_ranks_started_in_different_directories_are_refused(tmp_path):
    """Two ranks (RANK/WORLD_SIZE as torchrun sets them) launched from different directories
    would resolve training.output_dir=run to two run directories: both stop with one line."""
    import subprocess
    import sys

    from polytron.launch.env import free_port
    env = {k: v for k, v in runs.env().items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WANDB_MODE="disabled")
    procs = []
    for rank in (0, 1):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, runs.LAUNCH, "--config", TINY_YAML, *runs.TINY, "training.output_dir=run"],
            cwd=cwd, env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        line = _one_error(err)
        assert p.returncode == 2 and "resolved another run config than rank 0" in line, (out, err)
        assert f"{tmp_path}/node1/run" in line and f"{tmp_path}/node0/run" in line, line


def test_older_run_checkpoint_without_a_record_is_refused_only_for_a_newer_load_target(base, tmp_path):
    """A run checkpoint saved before runs recorded initialized_from: refused when the load
    target was written after it; an older target lets the resume go on as before."""
    from polytron.pretrain import checkpoint as ckpt
    src = _checkpoint(base.run, 2)
    tensors, state = ckpt.load_tensors(src), _state(src)
    state.pop("initialized_from")
    run = str(tmp_path / "run")
    ckpt.save_tensors(_checkpoint(run, 2), tensors, state)         # the older run's checkpoint
    target = ckpt.save_tensors(str(tmp_path / "conv"), tensors, state)
    os.utime(os.path.join(_checkpoint(run, 2), "manifest.json"), (1e9, 1e9))
    argv = _args("training.iterations=3", f"training.output_dir={run}", f"checkpoint.load={target}",
                 f"data.tokenizer={base.tok_a}", f"data.paths=[{base.data_a}]", f"data.cache_dir={base.root}/cache")
    rc, out, err = _launch(argv)
    line = _one_error(err)
    assert rc == 2 and "saved before that checkpoint was written" in line, line
    os.utime(os.path.join(target, "manifest.json"), (1e8, 1e8))
    rc, out, err = _launch(argv)      # goes on to the resume, which needs optimizer state
    assert rc == 2 and "weights-only checkpoint" in _one_error(err), err
