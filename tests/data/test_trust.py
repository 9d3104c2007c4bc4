"""What the data tools trust and verify (issue #25): tokenizer fingerprints in every
dataset summary, checked at training, merge and mixture time; index caches keyed on the
dataset's content; "output is also an input" compared as files; stale temporaries of
killed runs; glob inputs that would read the run's own outputs; bad numbers and prefixes.

Real tokenizers (trained here on the text shipped with Python), real preprocessing, the
real megatron-core loader.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from polytron.data import DataError, build_data
from polytron.data.config import DataConfig
from polytron.data.preprocess import preprocess
from polytron.data.tokenizer import load_tokenizer, train_sentencepiece
from polytron.data.validate import dataset_fingerprint
from polytron.tools import build_mixture, merge_datasets, preprocess_data
from tests.data.conftest import write_jsonl


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, str]:
    """SentencePiece models trained on pydoc topics: 1,000, 4,096 and 512 pieces (the last
    the same size as the corpus fixture's tokenizer, trained on other text)."""
    from pydoc_data import topics

    root = str(tmp_path_factory.mktemp("toks"))
    docs = list(topics.topics.values())
    return {v: train_sentencepiece(docs, os.path.join(root, f"spm{v}"), v, threads=1) for v in (1000, 4096, 512)}


def _cfg(prefix: str, tokenizer: str, cache_dir, **kw) -> DataConfig:
    return DataConfig(paths=[prefix], tokenizer=tokenizer, cache_dir=str(cache_dir), seq_len=32,
                      split="100,0,0", prefetch=0, **kw)


def _build(cfg: DataConfig, model_vocab: int):
    return build_data(cfg, model_vocab_size=model_vocab, seed=3, global_batch_size=4, micro_batch_size=2,
                      dp_rank=0, dp_size=1, train_iterations=4, eval_iterations=0, eval_interval=0)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _files(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, n))}


# ----------------------------------------------------------------------------- fingerprints


def test_dataset_of_a_smaller_tokenizer_is_refused_by_fingerprint(corpus, toks, tmp_path):
    small, run = load_tokenizer(toks[1000]), load_tokenizer(toks[4096])
    prefix = str(tmp_path / "d1000")
    preprocess([os.path.join(corpus.root, "a.jsonl")], prefix, toks[1000])
    assert dataset_fingerprint(prefix) == small.fingerprint != run.fingerprint
    with pytest.raises(DataError) as e:        # 1000 < 4096: the vocabulary checks alone pass
        _build(_cfg(prefix, toks[4096], tmp_path / "cache"), 4096)
    msg = str(e.value)
    assert "\n" not in msg and prefix in msg and small.fingerprint in msg and run.fingerprint in msg
    assert "data.allow_tokenizer_mismatch=true" in msg
    bundle = _build(_cfg(prefix, toks[4096], tmp_path / "cache", allow_tokenizer_mismatch=True), 4096)
    assert len(bundle.train.dataset) > 0
    summary = prefix + ".summary.json"           # older data: no fingerprint recorded, still trains
    with open(summary) as f:
        old = {k: v for k, v in json.load(f).items() if k != "tokenizer_fingerprint"}
    with open(summary, "w") as f:
        json.dump(old, f)
    assert dataset_fingerprint(prefix) is None
    assert len(_build(_cfg(prefix, toks[4096], tmp_path / "cache"), 4096).train.dataset) > 0


def test_same_size_tokenizers_of_other_text_are_told_apart(corpus, toks, tmp_path):
    ours, other = load_tokenizer(corpus.tokenizer), load_tokenizer(toks[512])
    assert ours.vocab_size == other.vocab_size and ours.fingerprint != other.fingerprint
    assert load_tokenizer(corpus.tokenizer).fingerprint == ours.fingerprint  # stable across loads
    with pytest.raises(DataError, match="data.allow_tokenizer_mismatch") as e:
        _build(_cfg(corpus.a, toks[512], tmp_path / "cache"), 512)
    assert ours.fingerprint in str(e.value) and other.fingerprint in str(e.value)


def test_merge_refuses_two_tokenizers_and_records_the_one(corpus, toks, tmp_path, capsys):
    other = str(tmp_path / "b512")
    preprocess([os.path.join(corpus.root, "b.jsonl")], other, toks[512])
    out = str(tmp_path / "merged")
    assert merge_datasets.main(["--input", corpus.a, other, "--output-prefix", out]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert corpus.a in line and other in line and dataset_fingerprint(corpus.a) in line \
        and dataset_fingerprint(other) in line
    assert not [n for n in os.listdir(tmp_path) if n.startswith("merged")]
    assert merge_datasets.main(["--input", corpus.a, corpus.b, "--output-prefix", out]) == 0
    assert dataset_fingerprint(out) == load_tokenizer(corpus.tokenizer).fingerprint


def test_sharded_runs_and_instruction_sources_record_the_fingerprint(corpus, tmp_path):
    fp = load_tokenizer(corpus.tokenizer).fingerprint
    inputs = [os.path.join(corpus.root, n) for n in ("a.jsonl", "b.jsonl")]
    run = preprocess(inputs, str(tmp_path / "run"), corpus.tokenizer, shard_by_file=True)
    assert run.tokenizer_fingerprint == fp == dataset_fingerprint(run.output_prefix)
    assert merge_datasets.main(["--input", run.output_prefix, "--output-prefix", str(tmp_path / "all")]) == 0
    assert dataset_fingerprint(str(tmp_path / "all")) == fp
    qa = str(tmp_path / "qa.jsonl")
    with open(qa, "w") as f:
        f.writelines(json.dumps({"question": f"q{i}?", "response": f"r{i}"}) + "\n" for i in range(4))
    mix = _mixture_yaml(tmp_path, corpus, [{"name": "g", "kind": "instruction", "inputs": [qa], "ratio": 1}])
    assert build_mixture.main(["--config", mix]) == 0
    assert dataset_fingerprint(str(tmp_path / "mix" / "g")) == fp


def _mixture_yaml(tmp_path, corpus, sources: list[dict]) -> str:
    import yaml

    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "mix"), "tokenizer": corpus.tokenizer,
                                    "seq_len": 64, "sources": sources}))
    return str(path)


def test_mixture_refuses_a_raw_prefix_of_another_tokenizer(corpus, toks, tmp_path, capsys):
    other = str(tmp_path / "b512")
    preprocess([os.path.join(corpus.root, "b.jsonl")], other, toks[512])
    bad = _mixture_yaml(tmp_path, corpus, [{"name": "r", "kind": "raw", "prefix": other, "ratio": 1}])
    assert build_mixture.main(["--config", bad]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "source r" in line and other in line and dataset_fingerprint(other) in line
    good = _mixture_yaml(tmp_path, corpus, [{"name": "r", "kind": "raw", "prefix": corpus.a, "ratio": 1}])
    assert build_mixture.main(["--config", good]) == 0
    with open(tmp_path / "mix" / "mixture.json") as f:
        assert json.load(f)["tokenizer_fingerprint"] == load_tokenizer(corpus.tokenizer).fingerprint


def test_tokenizer_directory_with_custom_code_is_refused_unrun(corpus, tmp_path, capsys, monkeypatch):
    """A Hugging Face tokenizer directory whose auto_map names a module of its own (which
    writes a marker when imported), with "y" on stdin: preprocess_data.py --tokenizer DIR and
    a run's data.tokenizer=DIR stop with one line; nothing prompts, stdin stays unread, no
    marker."""
    from tests.checkpoint.helpers import plant_custom_tokenizer
    custom, marker = tmp_path / "custom_tok", str(tmp_path / "MARKER")
    plant_custom_tokenizer(corpus.tokenizer, str(custom), marker)
    stdin = io.StringIO("y\ny\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    src = write_jsonl(str(tmp_path / "x.jsonl"), corpus.docs[:2])
    rc = preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "d"), "--tokenizer", str(custom),
                               "--no-progress", "--workers", "1"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(custom) in line and "custom code" in line, line
    with pytest.raises(DataError, match="custom code"):
        _build(_cfg(corpus.a, str(custom), tmp_path / "cache"), 512)
    assert not os.path.exists(marker) and stdin.read() == "y\ny\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("d.")]


# ----------------------------------------------------------------------------- index cache


def _all_samples(prefix: str, tokenizer: str, cache_dir) -> list[torch.Tensor]:
    """Every training sample the loader draws (reads every index entry)."""
    ds = _build(_cfg(prefix, tokenizer, cache_dir), 512).train.dataset
    return [ds[i]["tokens"] for i in range(len(ds))]


@pytest.mark.parametrize("change", ["more", "fewer"])
def test_corpus_regenerated_under_the_same_prefix_rebuilds_its_index(corpus, tmp_path, change):
    prefix, cache = str(tmp_path / "data" / "c"), tmp_path / "cache"
    first = write_jsonl(str(tmp_path / "first.jsonl"), corpus.docs[:40])
    preprocess([first], prefix, corpus.tokenizer)
    _all_samples(prefix, corpus.tokenizer, cache)
    docs = corpus.docs[:120] if change == "more" else corpus.docs[:12]
    preprocess([write_jsonl(str(tmp_path / "second.jsonl"), docs)], prefix, corpus.tokenizer)
    got = _all_samples(prefix, corpus.tokenizer, cache)   # stale index: IndexError or old samples
    want = _all_samples(prefix, corpus.tokenizer, tmp_path / "fresh-cache")
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------- file identity


def test_merge_output_through_a_symlinked_directory_is_refused(corpus, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    for ext in (".bin", ".idx", ".summary.json"):
        with open(corpus.a + ext, "rb") as src, open(real / ("a" + ext), "wb") as dst:
            dst.write(src.read())
    os.symlink(real, tmp_path / "alias")
    before = _files(real)
    rc = merge_datasets.main(["--input", str(real / "a"), corpus.b, "--output-prefix", str(tmp_path / "alias" / "a")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "is also an input" in line
    assert _files(real) == before


def test_merge_output_hard_linked_to_an_input_is_refused(corpus, tmp_path, capsys):
    """--output-prefix out/m where out/m.bin and out/m.idx are hard links of input a's files
    (another name, another directory, the same files): refused, nothing written or removed."""
    real, out = tmp_path / "real", tmp_path / "out"
    real.mkdir(), out.mkdir()
    for ext in (".bin", ".idx", ".summary.json"):
        with open(corpus.a + ext, "rb") as src, open(real / ("a" + ext), "wb") as dst:
            dst.write(src.read())
    for ext in (".bin", ".idx"):
        os.link(real / ("a" + ext), out / ("m" + ext))
    before, before_out = _files(real), _files(out)
    rc = merge_datasets.main(["--input", str(real / "a"), corpus.b, "--output-prefix", str(out / "m")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "is also an input" in line and str(real / "a") in line
    assert _files(real) == before and _files(out) == before_out


def test_mixture_source_reading_another_sources_output_is_refused(corpus, tmp_path, capsys):
    raw = {"name": "r", "kind": "raw", "inputs": [os.path.join(corpus.root, "b.jsonl")], "ratio": 1}
    assert build_mixture.main(["--config", _mixture_yaml(tmp_path, corpus, [raw])]) == 0
    os.symlink(tmp_path / "mix", tmp_path / "alias")
    before = _files(tmp_path / "mix")
    reader = {"name": "p", "kind": "raw", "prefix": str(tmp_path / "alias" / "r"), "ratio": 1}
    assert build_mixture.main(["--config", _mixture_yaml(tmp_path, corpus, [raw, reader])]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "sources[1] (p)" in line and "is also an output" in line
    assert _files(tmp_path / "mix") == before


def test_preprocess_input_hard_linked_to_an_output_is_refused(corpus, tmp_path, capsys):
    src = write_jsonl(str(tmp_path / "x.jsonl"), corpus.docs[:3])
    os.makedirs(tmp_path / "out")
    os.link(src, tmp_path / "out" / "d.summary.json")
    before = open(src, "rb").read()
    rc = preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "out" / "d"),
                               "--tokenizer", corpus.tokenizer, "--no-progress", "--workers", "1"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "is also an output" in line and open(src, "rb").read() == before


# ----------------------------------------------------------------------------- cleanup, globs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_rerun_removes_stale_temporaries_of_killed_runs_only(corpus, tmp_path):
    src = write_jsonl(str(tmp_path / "x.jsonl"), corpus.docs[:3])
    out = tmp_path / "out"
    out.mkdir()
    dead, live = _dead_pid(), os.getppid()
    stale = [f"d.bin.tmp{dead}", f"d.idx.tmp{dead}", f"d.summary.json.tmp{dead}", f"d_00001.bin.tmp{dead}"]
    kept = [f"d.bin.tmp{live}", f"other.bin.tmp{dead}", f"d.binx.tmp{dead}"]
    for n in stale + kept:
        (out / n).write_bytes(b"partial")
    preprocess([src], str(out / "d"), corpus.tokenizer)
    assert sorted(os.listdir(out)) == sorted(kept + ["d.bin", "d.idx", "d.summary.json"])


def test_glob_inputs_skip_the_runs_own_outputs(corpus, tmp_path):
    directory = tmp_path / "in"
    directory.mkdir()
    write_jsonl(str(directory / "x.jsonl"), corpus.docs[:5])
    prefix = str(directory / "d")
    first = preprocess([str(directory / "*")], prefix, corpus.tokenizer)
    (directory / f"d.bin.tmp{os.getppid()}").write_bytes(b"a live run's partial output")
    second = preprocess([str(directory / "*")], prefix, corpus.tokenizer)
    assert second.input_files == first.input_files == [str(directory / "x.jsonl")]
    assert (second.documents, second.tokens, second.skipped) == (5, first.tokens, 0)


@pytest.mark.parametrize("args", [["--chunk-mb", "nan"], ["--chunk-mb", "inf"], ["--chunk-mb", "0"],
                                  ["--chunk-mb", "-1"], ["--shard-size-mb", "nan"], ["--shard-size-mb", "inf"]])
def test_non_finite_sizes_are_one_error_line(corpus, tmp_path, capsys, args):
    src = write_jsonl(str(tmp_path / "x.jsonl"), corpus.docs[:2])
    rc = preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "d"), "--tokenizer",
                               corpus.tokenizer, "--no-progress", "--workers", "1", *args])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and args[1] in line and sorted(os.listdir(tmp_path)) == ["x.jsonl"]


@pytest.mark.parametrize("tool", ["preprocess", "merge"])
def test_output_prefix_with_a_trailing_slash_is_refused(corpus, tmp_path, capsys, tool):
    src = write_jsonl(str(tmp_path / "x.jsonl"), corpus.docs[:2])
    out = str(tmp_path / "out") + "/"
    if tool == "preprocess":
        rc = preprocess_data.main(["--input", src, "--output-prefix", out, "--tokenizer", corpus.tokenizer,
                                   "--no-progress", "--workers", "1"])
    else:
        rc = merge_datasets.main(["--input", corpus.a, "--output-prefix", out])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "names a directory" in line and sorted(os.listdir(tmp_path)) == ["x.jsonl"]
