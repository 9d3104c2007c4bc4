"""Bad input to the conversion tools (tools/convert_mha_to_dha.py, tools/upcycle.py) is one
``error:`` line and exit 2, a failed write one line and exit 1 (issue 25): the DHA conversion
of a Hugging Face directory exactly as its docstring shows it, a ``config.json`` that is a JSON
list, a full disk, sparse upcycling without data, NaN/infinite numbers, and UpIT sources
trained with different tokenizers (recorded fingerprints, and the run configs' tokenizers for
checkpoints that record none)."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
from typing import Iterator, Optional

import pytest

from polytron.model.transformer import build_model
from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.config import RunConfig, load_config
from polytron.tools import convert_mha_to_dha as dha
from polytron.tools import upcycle
from tests.checkpoint.helpers import hf_llama, tiny_model_config, train_spm


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A SentencePiece tokenizer, a Hugging Face Llama directory (MHA, 4 KV heads) carrying it,
    a small corpus tokenized with that directory's tokenizer, and a directory whose
    config.json is a JSON list."""
    import pydoc_data.topics as topics

    from polytron.data.preprocess import preprocess
    root = tmp_path_factory.mktemp("converters")
    tok = train_spm(str(root))
    hf = str(root / "hf")
    hf_llama(hf, kv_heads=4, tokenizer=tok)
    text = root / "docs.txt"
    text.write_text("\n\n".join(list(topics.topics.values())[:300]) + "\n")
    prefix = str(root / "corpus")
    preprocess([str(text)], prefix, hf)
    listed = root / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    return {"root": root, "tok": tok, "hf": hf, "prefix": prefix, "listed": str(listed)}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_dha_from_a_hugging_face_directory_as_its_docstring_shows(inputs, tmp_path, capsys):
    """``convert_mha_to_dha.py SRC DST --budget 0.25 data.paths=[PREFIX]`` (fewer calibration
    samples and fusion steps, for time): the fresh run config has global_batch_size 0 (auto),
    which divided by zero; it converts, and the written config loads."""
    dst = str(tmp_path / "dha")
    assert dha.main([inputs["hf"], dst, "--budget", "0.25", "--calib-samples", "16", "--fusion-steps", "8",
                     f"data.paths=[{inputs['prefix']}]"]) == 0, capsys.readouterr().err
    report = json.load(open(os.path.join(dst, "dha_report.json")))
    assert report["kv_cache_bytes_per_token"]["ratio"] == 0.25 and report["calib_samples"] >= 16
    assert report["loss_source"] is not None and report["loss_fused"] is not None
    run = load_config(os.path.join(dst, "config.yaml"))
    assert run.model.attention == "dha" and run.data.paths == [inputs["prefix"]]


@pytest.mark.parametrize("argv", [["sparse", "{src}", "{dst}", "--experts", "2"],
                                  ["upit", "{src}", "{src}", "{dst}", "--experts", "2"]])
def test_upcycle_config_json_that_is_a_list(inputs, tmp_path, capsys, argv):
    argv = [a.format(src=inputs["listed"], dst=tmp_path / "out") for a in argv]
    assert upcycle.main(argv) == 2
    assert "config.json: a JSON list" in one_error_line(capsys)
    assert not os.path.exists(tmp_path / "out")


def test_dha_config_json_that_is_a_list(inputs, tmp_path, capsys):
    assert dha.main([inputs["listed"], str(tmp_path / "out"), "--budget", "0.5"]) == 2
    assert "config.json: a JSON list" in one_error_line(capsys)


@pytest.mark.parametrize("argv,needle", [
    (["--budget", "nan"], "--budget nan"),
    (["--budget", "inf"], "--budget inf"),
    (["--layer-budget", "nan,2", "--grouping", "contiguous"], "--layer-budget entry 0 = nan"),
    (["--budget", "0.5", "--fusion-lr", "nan"], "--fusion-lr nan"),
])
def test_dha_non_finite_numbers_name_the_option(inputs, tmp_path, capsys, argv, needle):
    assert dha.main([inputs["hf"], str(tmp_path / "out"), *argv, f"data.paths=[{inputs['prefix']}]"]) == 2
    assert needle in one_error_line(capsys)


@pytest.mark.parametrize("argv,needle", [
    (["sparse", "{hf}", "{dst}", "--experts", "2", "--noise", "nan"], "--noise nan"),
    (["upit", "{hf}", "{hf}", "{dst}", "--experts", "2", "--router-lr", "inf"], "--router-lr inf"),
])
def test_upcycle_non_finite_numbers_name_the_option(inputs, tmp_path, capsys, argv, needle):
    argv = [a.format(hf=inputs["hf"], dst=tmp_path / "out") for a in argv]
    assert upcycle.main(argv) == 2
    assert needle in one_error_line(capsys)


def test_sparse_upcycling_of_a_hugging_face_directory_needs_no_data(inputs, tmp_path, capsys):
    """Sparse upcycling reads no data: no data.paths demanded; the written config names none
    and the tool says how to give them when training."""
    dst = str(tmp_path / "moe")
    assert upcycle.main(["sparse", inputs["hf"], dst, "--experts", "2", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "data.paths=[PREFIX]" in out
    cfg = load_config(os.path.join(dst, "config.yaml"), [f"data.paths=[{inputs['prefix']}]"])
    assert cfg.model.moe.num_experts == 2 and cfg.data.tokenizer == inputs["hf"]


def test_sparse_overwrite_sets_aside_the_earlier_run_under_dst(inputs, tmp_path, capsys):
    """``upcycle.py sparse ... --overwrite`` into a DST whose earlier conversion was trained
    on (DST/run holds its checkpoint): DST/run, which ``training.resume=auto`` would resume
    instead of the new DST/checkpoint, is renamed aside (kept, named on stdout and in the
    report); the new config's output directory is empty."""
    dst = str(tmp_path / "moe")
    argv = ["sparse", inputs["hf"], dst, "--experts", "2", "--top-k", "1"]
    assert upcycle.main(argv) == 0
    trained = os.path.join(dst, "run", "checkpoints", "iter_0000003")
    first = ckpt.read_trainer_state(os.path.join(dst, "checkpoint"))
    ckpt.save_tensors(trained, ckpt.load_tensors(os.path.join(dst, "checkpoint")), dict(first, iteration=3))
    capsys.readouterr()
    assert upcycle.main([*argv, "--noise", "0.5", "--overwrite"]) == 0
    out = capsys.readouterr().out
    superseded = json.load(open(os.path.join(dst, "upcycle_report.json")))["superseded_run"]
    assert superseded.startswith(os.path.join(dst, "run.superseded-")) and superseded in out
    assert os.path.isdir(os.path.join(superseded, "checkpoints", "iter_0000003"))
    assert not os.path.exists(os.path.join(dst, "run"))
    cfg = load_config(os.path.join(dst, "config.yaml"), [f"data.paths=[{inputs['prefix']}]"])
    assert cfg.training.output_dir == os.path.join(dst, "run")


def test_relative_paths_on_the_command_line_are_stored_absolute(inputs, tmp_path, monkeypatch):
    """``data.paths=[corpus]`` given from the corpus's directory is written as its absolute
    path: the config and checkpoint mean the same files to whoever reads them, from wherever."""
    monkeypatch.chdir(inputs["root"])
    dst = str(tmp_path / "moe")
    assert upcycle.main(["sparse", "hf", dst, "--experts", "2", "data.paths=[corpus]"]) == 0
    monkeypatch.chdir(tmp_path)
    assert load_config(os.path.join(dst, "config.yaml")).data.paths == [inputs["prefix"]]
    stored = ckpt.read_trainer_state(os.path.join(dst, "checkpoint"))["config"]["data"]
    assert stored["paths"] == [inputs["prefix"]] and stored["tokenizer"] == inputs["hf"]


def test_relative_paths_stored_in_a_checkpoint_mean_its_run_directory(inputs, tmp_path, monkeypatch, capsys):
    """An older run stored ``data.tokenizer=tok.model`` and ``data.paths=[corpus]`` relative:
    they are looked up under its run directory, not under the tool's current directory (which
    holds a decoy of the same name); a stored relative path that is not there is one line."""
    import shutil
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(inputs["tok"], run_dir / "tok.model")
    shutil.copy(inputs["prefix"] + ".idx", run_dir / "corpus.idx")
    here = tmp_path / "elsewhere"
    here.mkdir()
    (here / "tok.model").write_text("a decoy")
    monkeypatch.chdir(here)
    for name, stored in (("good", "tok.model"), ("gone", "missing.model")):
        src = _checkpoint(str(run_dir / "checkpoints" / f"iter_000000{len(name)}"), stored, None, 0,
                          paths=["corpus"])
        rc = upcycle.main(["sparse", src, str(tmp_path / name), "--experts", "2"])
        if name == "good":
            assert rc == 0
            data = load_config(str(tmp_path / "good" / "config.yaml")).data
            assert data.tokenizer == str(run_dir / "tok.model") and data.paths == [str(run_dir / "corpus")]
            capsys.readouterr()
        else:
            assert rc == 2
            line = one_error_line(capsys)
            assert "data.tokenizer='missing.model'" in line and str(run_dir) in line, line


# ---------------------------------------------------------------- a full disk

@contextlib.contextmanager
def small_disk(path: str) -> Iterator[None]:
    """``path``: a 256 KiB tmpfs (root); where mounting is not permitted, a 256 KiB limit on
    the size of any file this process writes (EFBIG instead of ENOSPC)."""
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", path],
                             capture_output=True).returncode == 0
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    if not mounted:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, old[1]))
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", path], check=True)
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)


@pytest.mark.parametrize("tool", ["upcycle", "dha"])
def test_full_disk_is_one_line_and_exit_1(inputs, tmp_path, capsys, tool):
    disk = str(tmp_path / "disk")
    dst = os.path.join(disk, "out")
    if tool == "upcycle":
        argv, main = ["sparse", inputs["hf"], dst, "--experts", "4"], upcycle.main
    else:
        argv, main = [inputs["hf"], dst, "--budget", "0.5", "--calib-samples", "8", "--fusion-steps", "2",
                      f"data.paths=[{inputs['prefix']}]"], dha.main
    with small_disk(disk):
        rc = main(argv)
        left = os.listdir(disk)
    assert rc == 1
    line = one_error_line(capsys)
    assert f"cannot write {dst}" in line, line
    assert left == [], left                                    # no partial DST, no staging directory


# ---------------------------------------------------------------- UpIT: one tokenizer

def _checkpoint(path: str, tokenizer: Optional[str], fingerprint: Optional[str], seed: int,
                paths: tuple[str, ...] = ()) -> str:
    """A weights-only checkpoint of the tiny model whose run config names ``tokenizer`` (and
    data ``paths``) and whose trainer state records ``fingerprint`` (None: an older checkpoint
    without one)."""
    import torch
    torch.manual_seed(seed)
    model = build_model(tiny_model_config())
    run = RunConfig(model=model.cfg)
    run.data.tokenizer, run.data.seq_len, run.data.paths = tokenizer or "", model.cfg.max_seq_len, list(paths)
    state = {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0, "extra": {},
             "format_version": ckpt.FORMAT_VERSION, "config": run.to_dict()}
    if fingerprint:
        state["tokenizer_fingerprint"] = fingerprint
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ckpt.save_tensors(path, tensors, state)


@pytest.fixture(scope="module")
def tokenizers(inputs) -> tuple[str, str]:
    """Two SentencePiece tokenizers of the same vocabulary size, trained on different text."""
    import pydoc_data.topics as topics

    from polytron.data.tokenizer import fingerprint_of, train_sentencepiece
    docs = list(topics.topics.values())
    other = train_sentencepiece(docs[::-1][:80], str(inputs["root"] / "other"), 384, threads=1)
    assert fingerprint_of(other) != fingerprint_of(inputs["tok"])
    return inputs["tok"], other


UPIT = ["--experts", "3", "--top-k", "1", "--router-steps", "0", "--candidates", "2"]


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-fingerprints", "run-config-tokenizers"])
def test_upit_refuses_checkpoints_of_different_tokenizers(tokenizers, tmp_path, capsys, recorded):
    from polytron.data.tokenizer import fingerprint_of
    fps = [fingerprint_of(t) if recorded else None for t in tokenizers]
    a = _checkpoint(str(tmp_path / "a"), tokenizers[0], fps[0], 0)
    b = _checkpoint(str(tmp_path / "b"), tokenizers[1], fps[1], 1)
    assert upcycle.main(["upit", a, b, str(tmp_path / "out"), *UPIT]) == 2
    line = one_error_line(capsys)
    assert "tokenizer mismatch" in line and a in line and b in line, line
    assert fingerprint_of(tokenizers[0]) in line and fingerprint_of(tokenizers[1]) in line, line
    assert not os.path.exists(tmp_path / "out")
    assert upcycle.main(["upit", a, b, str(tmp_path / "out"), *UPIT, "--allow-tokenizer-change"]) == 0
    assert "note: tokenizer mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["sparse", "dha"])
def test_source_trained_with_another_tokenizer_than_its_config_names(tokenizers, tmp_path, capsys, tool):
    """A checkpoint records the fingerprint of tokenizer A but its run config now names B (the
    same size: the file was replaced, or data re-tokenized): converting would write a checkpoint
    recording B, which training with B then accepts. Refused naming both; a data.tokenizer
    given on the command line is used with a note and recorded."""
    from polytron.data.tokenizer import fingerprint_of
    fp_a, fp_b = fingerprint_of(tokenizers[0]), fingerprint_of(tokenizers[1])
    src = _checkpoint(str(tmp_path / "src"), tokenizers[1], fp_a, 0)
    dst = str(tmp_path / "out")
    argv = ["sparse", src, dst, "--experts", "2", "--top-k", "1"] if tool == "sparse" else [src, dst, "--budget", "0.5"]
    main = upcycle.main if tool == "sparse" else dha.main
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "tokenizer mismatch" in line and src in line and fp_a in line and fp_b in line, line
    assert "data.tokenizer=" in line and not os.path.exists(dst)
    if tool == "dha":
        return
    for tok, fp in ((tokenizers[0], fp_a), (tokenizers[1], fp_b)):
        assert main([*argv, f"data.tokenizer={tok}", "--overwrite"]) == 0
        err = capsys.readouterr().err
        assert (fp_a in err and fp_b in err and err.startswith("note: ")) == (fp == fp_b), err
        assert ckpt.read_trainer_state(os.path.join(dst, "checkpoint"))["tokenizer_fingerprint"] == fp


def test_upit_merges_checkpoints_of_one_tokenizer(tokenizers, tmp_path):
    """One checkpoint records the fingerprint, the other (older) only names the same tokenizer."""
    from polytron.data.tokenizer import fingerprint_of
    fp = fingerprint_of(tokenizers[0])
    a = _checkpoint(str(tmp_path / "a"), tokenizers[0], fp, 0)
    b = _checkpoint(str(tmp_path / "b"), tokenizers[0], None, 1)
    dst = str(tmp_path / "out")
    assert upcycle.main(["upit", a, b, dst, *UPIT]) == 0
    assert json.load(open(os.path.join(dst, "upcycle_report.json")))["tokenizer_fingerprints"] == [fp, fp]
