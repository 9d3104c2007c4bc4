"""tools/train_tokenizer.py: BPE/unigram, byte fallback, special tokens, errors."""
from __future__ import annotations

import gzip
import json
import os

import pytest

from polytron.data.tokenizer import INSTRUCTION_MARKERS, load_tokenizer
from polytron.tools import train_tokenizer


@pytest.fixture(scope="module")
def text_files(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("tok")
    jl = d / "a.jsonl"
    jl.write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus.docs[:60]) + "broken\n")
    with gzip.open(d / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(corpus.docs[60:120]))
    return d, str(jl), str(d / "b.txt.gz")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_with_special_tokens_and_byte_fallback(text_files, model_type, capsys):
    d, jl, gz = text_files
    out = str(d / model_type)
    rc = train_tokenizer.main(["--input", jl, gz, "--output", out, "--vocab-size", "400",
                               "--model-type", model_type, "--json-key", "body",
                               "--special-tokens", "<doc>,<sep>", "--instruction-markers", "--no-progress"])
    assert rc == 0 and "skipped 1 malformed" in capsys.readouterr().out
    tok = load_tokenizer(out + ".model")
    assert tok.vocab_size == 400 and tok.eod_id == 2
    for marker in ("<doc>", "<sep>", *INSTRUCTION_MARKERS):
        assert len(tok.encode(marker)) <= 2 and marker in [tok.decode([i]) for i in tok.encode(marker)]
    text = "Ünïcödé 漢字 and  spaces\nnew line <INST>q</INST>"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is lost


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert train_tokenizer.main(["--input", str(tmp_path / "none.txt"), "--output", str(tmp_path / "t"),
                                 "--vocab-size", "400"]) == 2
    assert "none.txt" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("tiny")
    assert train_tokenizer.main(["--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "t"),
                                 "--vocab-size", "100"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unwritable_output_directory_and_empty_input_exit_2(tmp_path, text_files, capsys):
    _, jl, _ = text_files
    (tmp_path / "plain").write_text("a file")
    for out in ("/proc/no/such/tok", str(tmp_path / "plain" / "tok")):
        rc = train_tokenizer.main(["--input", jl, "--output", out, "--vocab-size", "400", "--no-progress"])
        assert rc == 2
        assert out in _error_line(capsys)
    assert not os.path.exists("/proc/no")
    (tmp_path / "bad.jsonl").write_text("not json\n\n")
    out = tmp_path / "new" / "tok"
    assert train_tokenizer.main(["--input", str(tmp_path / "bad.jsonl"), "--output", str(out),
                                 "--vocab-size", "400", "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "no tokenizer written" in line and "bad.jsonl" in line and not (tmp_path / "new").exists()
    assert train_tokenizer.main(["--input", str(tmp_path), "--output", str(out), "--vocab-size", "400"]) == 2
    assert "is a directory; give files" in _error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "plain"]
