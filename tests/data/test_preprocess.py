"""tools/preprocess_data.py and data.preprocess on real text with a real tokenizer."""
from __future__ import annotations

import contextlib
import filecmp
import gzip
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

from polytron.data._megatron import IndexedDataset
from polytron.data.errors import DataError
from polytron.data.preprocess import preprocess
from polytron.data.tokenizer import load_tokenizer
from polytron.tools import preprocess_data
from tests.data.conftest import write_jsonl

BAD_JSONL = (b'{"text": "Hello world."}\n'
             b'{"text": ""}\n'
             b'not json at all\n'
             b'{"body": "no text field"}\n'
             b'{"text": "caf\xe9 in latin-1"}\n'
             b'{"text": 42}\n'
             b'\n'
             b'{"text": "Second valid\\nwith two lines."}\n')


def _docs(prefix: str) -> list[np.ndarray]:
    ds = IndexedDataset(prefix)
    return [np.array(ds[i]) for i in range(len(ds))]  # copy: the mmap closes with ds


def test_malformed_lines_are_counted_with_file_and_line(tmp_path, corpus):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(BAD_JSONL)
    summ = preprocess([str(src)], str(tmp_path / "out"), corpus.tokenizer)
    assert summ.documents == 2 and summ.skipped == 6
    got = {(s["line"], s["reason"]) for s in summ.skipped_lines}
    assert got == {(2, "empty document"), (3, "invalid JSON"), (4, "missing field 'text'"),
                   (5, "invalid UTF-8"), (6, "field 'text' is not a string"), (7, "empty line")}
    assert all(s["file"] == str(src) for s in summ.skipped_lines)
    on_disk = json.loads((tmp_path / "out.summary.json").read_text())
    assert (on_disk["documents"], on_disk["skipped"]) == (2, 6) and on_disk["tokens"] == summ.tokens
    tok = load_tokenizer(corpus.tokenizer)
    docs = _docs(str(tmp_path / "out"))
    assert len(docs) == 2 and all(d[-1] == tok.eod_id for d in docs)
    assert tok.decode(docs[1][:-1].tolist()) == "Second valid\nwith two lines."
    assert sum(len(d) for d in docs) == summ.tokens


def test_strict_stops_with_one_line_error_and_no_output(tmp_path, corpus, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(BAD_JSONL)
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                               "--tokenizer", corpus.tokenizer, "--strict", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and f"{src}:2: empty document" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not list(tmp_path.glob("o.*"))


def test_bad_tokenizer_and_missing_input_exit_2(tmp_path, corpus, capsys):
    assert preprocess_data.main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix",
                                 str(tmp_path / "o"), "--tokenizer", corpus.tokenizer]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    src = write_jsonl(str(tmp_path / "x.jsonl"), ["hi"])
    assert preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "o"),
                                 "--tokenizer", str(tmp_path / "missing.model")]) == 2
    assert "missing.model" in capsys.readouterr().err


def test_workers_give_identical_output_and_gzip_text_paragraphs(tmp_path, corpus):
    text = "\n\n".join(corpus.docs[:40])
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "t.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    jl = write_jsonl(str(tmp_path / "d.jsonl"), corpus.docs[40:80])
    inputs = [str(tmp_path / "t.txt"), str(tmp_path / "t.txt.gz"), jl]
    s1 = preprocess(inputs, str(tmp_path / "w1"), corpus.tokenizer, workers=1, chunk_bytes=4096)
    s2 = preprocess(inputs, str(tmp_path / "w2"), corpus.tokenizer, workers=2, chunk_bytes=4096)
    assert filecmp.cmp(tmp_path / "w1.bin", tmp_path / "w2.bin", shallow=False)
    assert filecmp.cmp(tmp_path / "w1.idx", tmp_path / "w2.idx", shallow=False)
    n_par = sum(1 for p in text.split("\n\n") if p.strip())
    assert s1.documents == s2.documents == 2 * n_par + 40 and s1.skipped == 0
    docs = _docs(str(tmp_path / "w1"))
    ds = IndexedDataset(str(tmp_path / "w1"))
    assert len(ds.document_indices) == s1.documents + 1 and len(ds) == s1.documents
    assert ds.document_indices.tolist() == list(range(s1.documents + 1))
    del ds
    assert [d.tolist() for d in docs[:n_par]] == [d.tolist() for d in docs[n_par:2 * n_par]]


def test_hugging_face_tokenizer_directory(tmp_path, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus.docs[:50], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "hf")
    src = write_jsonl(str(tmp_path / "d.jsonl"), ["One document.", "Another one here."])
    summ = preprocess([src], str(tmp_path / "hfout"), str(tmp_path / "hf"), workers=2)
    tok = load_tokenizer(str(tmp_path / "hf"))
    docs = _docs(str(tmp_path / "hfout"))
    assert summ.documents == 2 and docs[0][-1] == tok.eod_id == tk.token_to_id("</s>")
    assert tok.decode(docs[1][:-1].tolist()) == "Another one here."


def test_strict_error_type(tmp_path, corpus):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        preprocess([str(src)], str(tmp_path / "o"), corpus.tokenizer, strict=True)
    assert not os.path.exists(tmp_path / "o.bin")


@pytest.mark.parametrize("unit", ["paragraph", "line", "file"])
def test_chunks_cut_only_at_document_boundaries(tmp_path, corpus, unit):
    from polytron.data.preprocess import iter_chunks

    raw = "\n\n".join(corpus.docs[:10]).replace("\n\n\n", "\n\r\n\n").encode()
    (tmp_path / "t.txt").write_bytes(raw)
    for size in (5, 300, 1 << 20):
        chunks = list(iter_chunks(str(tmp_path / "t.txt"), 0, "text", unit, size))
        assert b"".join(c.data for c in chunks) == raw
        line = 1
        for c in chunks:
            assert c.first_line == line
            line += c.data.count(b"\n")
        for c in chunks[:-1]:
            assert c.data.endswith(b"\n\n" if unit == "paragraph" else b"\n") or c.data.endswith(b"\n\r\n")
        assert unit != "file" or len(chunks) == 1


def _run_tool(capsys, src: str, out: str, tokenizer: str) -> tuple[int, str]:
    """Exit status and stderr of tools/preprocess_data.py."""
    rc = preprocess_data.main(["--input", src, "--output-prefix", out, "--tokenizer", tokenizer,
                               "--no-progress", "--workers", "1"])
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_unwritable_output_is_one_line_and_writes_nothing(tmp_path, corpus, capsys):
    src = write_jsonl(str(tmp_path / "x.jsonl"), ["Some text."])
    (tmp_path / "plain").write_text("a file, not a directory")
    for out in ("/proc/no/such/prefix", str(tmp_path / "plain" / "sub" / "prefix")):
        rc, err = _run_tool(capsys, src, out, corpus.tokenizer)
        line = _one_error_line(err)
        assert rc == 2 and out in line, line
    assert "is a file, not a directory" in line
    assert not os.path.exists("/proc/no") and sorted(os.listdir(tmp_path)) == ["plain", "x.jsonl"]


@contextlib.contextmanager
def read_only_directory(path):
    """An empty directory nobody can write into: mode 0500, or for root (whom modes do not
    stop) a read-only tmpfs mounted there, or where mounting is not permitted, sysfs."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                        capture_output=True).returncode == 0:
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], capture_output=True)
    else:
        yield pathlib.Path("/sys/kernel")       # EACCES for root too


def test_read_only_output_directory(tmp_path, corpus, capsys):
    src = write_jsonl(str(tmp_path / "x.jsonl"), ["Some text."])
    with read_only_directory(tmp_path / "ro") as ro:
        before = sorted(os.listdir(ro))
        rc, err = _run_tool(capsys, src, str(ro / "o"), corpus.tokenizer)
        assert rc == 2 and str(ro) in _one_error_line(err) and sorted(os.listdir(ro)) == before


@pytest.mark.parametrize("content", [b"", b"\n\n", BAD_JSONL.replace(b'"Hello world."', b'""')
                                     .replace(b'"Second valid\\nwith two lines."', b'7')],
                         ids=["empty-file", "blank-lines", "all-malformed"])
def test_no_valid_document_fails_and_leaves_no_dataset(tmp_path, corpus, capsys, content):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    out = tmp_path / "new" / "dir" / "o"
    rc, err = _run_tool(capsys, str(src), str(out), corpus.tokenizer)
    line = _one_error_line(err)
    assert rc == 2 and "no documents written" in line and str(src) in line
    assert not (tmp_path / "new").exists()  # neither files nor the directories made for them
    with pytest.raises(DataError, match="no documents written"):
        preprocess([str(src)], str(tmp_path / "o"), corpus.tokenizer, workers=2)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_directory_input_is_named_as_directory(tmp_path, corpus, capsys):
    rc, err = _run_tool(capsys, str(tmp_path), str(tmp_path / "o"), corpus.tokenizer)
    assert rc == 2 and _one_error_line(err) == f"error: input {tmp_path}: is a directory; give files"
