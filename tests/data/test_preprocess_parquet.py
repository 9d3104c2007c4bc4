"""Parquet, Arrow and ``datasets`` directory inputs of tools/preprocess_data.py, against JSONL.

The same documents held as JSONL, as Parquet (several row groups, several files, extra
columns), as Arrow IPC files and as a ``save_to_disk`` directory (written here with
pyarrow in the layout ``datasets`` writes: ``data-XXXXX-of-NNNNN.arrow`` stream files,
``state.json``, ``dataset_info.json``) must give byte-identical ``.bin/.idx``, for one or
two workers, sharded, merged and through plan tasks. Bad tables fail in one line and
write nothing.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from polytron.data.errors import DataError
from polytron.data.inputs import expand_inputs, input_size
from polytron.data.preprocess import preprocess
from polytron.data.shard_plan import make_plan, merge_plan, run_plan_task, write_plan
from polytron.tools import merge_datasets, preprocess_data
from tests.data.conftest import write_jsonl

#: Texts that are easy to get wrong between formats (non-ASCII, whitespace, CRLF).
ODD = ["caf\u00e9 \u65e5\u672c\u8a9e \U0001f600", "  leading and trailing  ", "crlf\r\nline\r\n", "tab\there"]


def _bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def write_parquet(path, texts, row_group_size: int, **columns) -> str:
    table = pa.table({"id": list(range(len(texts))), "text": list(texts), **columns})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def write_dataset_dir(path, texts, files: int = 2, batch: int = 7) -> str:
    """What ``Dataset.save_to_disk`` writes: Arrow stream files, state.json, dataset_info.json."""
    os.makedirs(path)
    table = pa.table({"text": list(texts), "n": list(range(len(texts)))})
    per = -(-len(texts) // files)
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    for i, name in enumerate(names):
        part = table.slice(i * per, per)
        with pa.ipc.new_stream(os.path.join(path, name), part.schema) as w:
            for b in part.to_batches(max_chunksize=batch):
                w.write_batch(b)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": None}, f)
    with open(os.path.join(path, "dataset_info.json"), "w") as f:
        json.dump({"features": {"text": {"dtype": "string", "_type": "Value"}}}, f)
    return str(path)


@pytest.fixture(scope="module")
def docs(corpus) -> list[str]:
    return [d if i % 9 else ODD[(i // 9) % len(ODD)] + d for i, d in enumerate(corpus.docs[:90])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, docs) -> str:
    """The JSONL path over ``docs``: the bytes every other format must give."""
    d = tmp_path_factory.mktemp("ref")
    src = write_jsonl(str(d / "all.jsonl"), docs)
    preprocess([src], str(d / "ref"), corpus.tokenizer)
    return str(d / "ref")


# ----------------------------------------------------------------------------- same bytes as JSONL

@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_files_and_mixed_glob_give_the_jsonl_bytes(tmp_path, corpus, docs, reference, workers):
    one = write_parquet(tmp_path / "one.parquet", docs, row_group_size=13)
    assert pq.ParquetFile(one).num_row_groups == 7
    summ = preprocess([one], str(tmp_path / "p"), corpus.tokenizer, workers=workers, chunk_bytes=3000)
    assert _bytes(tmp_path / "p") == _bytes(reference)
    assert summ.files[0]["disk_bytes"] == os.path.getsize(one) == input_size(one)
    # A glob over two Parquet files and a JSONL file between them, in sorted order.
    (tmp_path / "m").mkdir()
    write_parquet(tmp_path / "m" / "a.parquet", docs[:30], 8)
    write_jsonl(str(tmp_path / "m" / "b.jsonl"), docs[30:55])
    write_parquet(tmp_path / "m" / "c.pq", docs[55:], 100)
    summ = preprocess([str(tmp_path / "m" / "*")], str(tmp_path / "g"), corpus.tokenizer, workers=workers,
                      chunk_bytes=2000)
    assert [os.path.basename(p) for p in summ.input_files] == ["a.parquet", "b.jsonl", "c.pq"]
    assert [f["documents"] for f in summ.files] == [30, 25, len(docs) - 55]
    assert _bytes(tmp_path / "g") == _bytes(reference)


def test_datasets_directory_and_arrow_files_give_the_jsonl_bytes(tmp_path, corpus, docs, reference):
    ds = write_dataset_dir(tmp_path / "ds", docs)
    # A glob that matches the directory reads it once, never its state.json or .arrow files as text.
    assert expand_inputs([str(tmp_path / "**")]) == [ds]
    for workers in (1, 2):
        summ = preprocess([ds], str(tmp_path / f"d{workers}"), corpus.tokenizer, workers=workers, chunk_bytes=2500)
        assert _bytes(tmp_path / f"d{workers}") == _bytes(reference)
    assert summ.documents == len(docs) and summ.files[0]["disk_bytes"] == input_size(ds)
    # A single .arrow file in IPC file format (random access) and one in stream format.
    table = pa.table({"text": docs})
    with pa.ipc.new_file(str(tmp_path / "f.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=11)
    preprocess([str(tmp_path / "f.arrow")], str(tmp_path / "f"), corpus.tokenizer, chunk_bytes=4000)
    assert _bytes(tmp_path / "f") == _bytes(reference)
    preprocess([os.path.join(ds, "data-00000-of-00002.arrow"), os.path.join(ds, "data-00001-of-00002.arrow")],
               str(tmp_path / "s"), corpus.tokenizer)
    assert _bytes(tmp_path / "s") == _bytes(reference)


def test_progress_bar_counts_table_bytes_to_the_end(tmp_path, corpus, docs, capsys):
    inputs = [write_parquet(tmp_path / "a.parquet", docs[:40], 9), write_dataset_dir(tmp_path / "b", docs[40:])]
    rc = preprocess_data.main(["--input", *inputs, "--output-prefix", str(tmp_path / "p"), "--tokenizer",
                               corpus.tokenizer, "--workers", "1", "--chunk-mb", "0.002"])
    captured = capsys.readouterr()
    last = captured.err.strip().split("\r")[-1]
    assert rc == 0 and "100%" in last and "B/s" in last and "docs/s" in last, captured.err[-300:]
    assert re.search(r" (\S+)/\1 \[", last), last  # the bar's count reached its total
    summ = json.loads((tmp_path / "p.summary.json").read_text())
    assert [f["disk_bytes"] for f in summ["files"]] == [input_size(p) for p in inputs]
    assert summ["input_bytes"] == sum(len(t.encode()) for t in docs)  # MB of text, as for JSONL


def test_null_empty_and_non_text_values(tmp_path, corpus, docs, capsys):
    texts = [docs[0], None, "", "   ", docs[1]]
    src = str(tmp_path / "n.parquet")
    pq.write_table(pa.table({"text": pa.array(texts, pa.large_string())}), src, row_group_size=2)
    summ = preprocess([src], str(tmp_path / "n"), corpus.tokenizer)
    preprocess([write_jsonl(str(tmp_path / "n.jsonl"), [docs[0], docs[1]])], str(tmp_path / "j"), corpus.tokenizer)
    assert _bytes(tmp_path / "n") == _bytes(tmp_path / "j")
    assert [(s["line"], s["reason"]) for s in summ.skipped_lines] == [
        (2, "field 'text' is null"), (3, "empty document"), (4, "empty document")]
    rc = preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                               corpus.tokenizer, "--strict", "--no-progress"])
    assert rc == 2 and f"{src}:2: field 'text' is null" in _one_error_line(capsys.readouterr().err)
    # Dictionary-encoded text is read as its values; a column that is not text is refused.
    pq.write_table(pa.table({"text": pa.array(docs[:2]).dictionary_encode()}), str(tmp_path / "dict.parquet"))
    preprocess([str(tmp_path / "dict.parquet")], str(tmp_path / "dict"), corpus.tokenizer)
    assert _bytes(tmp_path / "dict") == _bytes(tmp_path / "j")
    write_parquet(tmp_path / "num.parquet", docs[:3], 2)
    rc = preprocess_data.main(["--input", str(tmp_path / "num.parquet"), "--output-prefix", str(tmp_path / "o"),
                               "--tokenizer", corpus.tokenizer, "--json-key", "id", "--no-progress"])
    assert rc == 2 and "column 'id' holds int64, not text" in _one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.glob("o.*"))


# ----------------------------------------------------------------------------- errors: one line, nothing written

@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_missing_column_is_one_line_naming_file_and_column(tmp_path, corpus, docs, capsys, kind):
    src = (write_parquet(tmp_path / "in.parquet", docs[:20], 5) if kind == "parquet"
           else write_dataset_dir(tmp_path / "in", docs[:20]))
    before = sorted(os.listdir(tmp_path))
    rc = preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                               corpus.tokenizer, "--json-key", "content", "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    named = src if kind == "parquet" else os.path.join(src, "data-00000-of-00002.arrow")
    assert rc == 2 and f"input {named}: no column 'content' (columns: " in line and "text" in line, line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_or_corrupt_parquet_is_one_line_and_writes_nothing(tmp_path, corpus, docs, capsys, workers):
    good = write_jsonl(str(tmp_path / "a.jsonl"), docs[:30])  # read (and tokenized) before the bad file
    src = write_parquet(tmp_path / "b.parquet", docs, row_group_size=20)
    raw = Path(src).read_bytes()
    col = pq.ParquetFile(src).metadata.row_group(2).column(1)  # the text column of row group 2
    assert col.path_in_schema == "text"
    start = col.dictionary_page_offset or col.data_page_offset
    corrupt = bytearray(raw)
    corrupt[start + 8:start + col.total_compressed_size - 8] = b"\xa5" * (col.total_compressed_size - 16)
    cases = {"truncated": (raw[:len(raw) * 2 // 3], "not a readable Parquet file (truncated"),
             "corrupt": (bytes(corrupt), "row group 2 of 5 (rows 41-60) cannot be read (corrupt or truncated")}
    for name, (content, message) in cases.items():
        Path(src).write_bytes(content)
        rc = preprocess_data.main(["--input", good, src, "--output-prefix", str(tmp_path / "out" / "o"),
                                   "--tokenizer", corpus.tokenizer, "--workers", str(workers), "--chunk-mb", "0.002",
                                   "--no-progress"])
        line = _one_error_line(capsys.readouterr().err)
        assert rc == 2 and line.startswith(f"error: input {src}: {message}"), (name, line)
        assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.parquet"], name  # not even out/


def test_datasets_dict_and_bad_state_are_one_line(tmp_path, corpus, docs, capsys):
    write_dataset_dir(tmp_path / "dd" / "train", docs[:10])
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    ds = write_dataset_dir(tmp_path / "ds", docs[:10])
    os.remove(os.path.join(ds, "data-00001-of-00002.arrow"))
    cut = write_dataset_dir(tmp_path / "cut", docs[:10], batch=2)
    data = Path(cut) / "data-00001-of-00002.arrow"
    data.write_bytes(data.read_bytes()[:-300])  # the stream ends inside a record batch
    cases = [(str(tmp_path / "dd"), f"{tmp_path / 'dd'}: is a datasets DatasetDict (splits: train); give one "
                                    f"split's directory, e.g. {tmp_path / 'dd' / 'train'}"),
             (ds, f"{ds}: data file {ds}/data-00001-of-00002.arrow named in state.json: no such file"),
             (cut, f"{data}: cannot read record batches after row ")]
    for src, message in cases:
        rc = preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                                   corpus.tokenizer, "--no-progress"])
        line = _one_error_line(capsys.readouterr().err)
        assert rc == 2 and line.startswith(f"error: input {message}"), line
        assert src != cut or "(corrupt or truncated Arrow file?): " in line, line
    assert not list(tmp_path.glob("o.*"))


# ----------------------------------------------------------------------------- shards, merge, plan tasks

def test_shards_merge_and_plan_tasks_give_the_jsonl_bytes(tmp_path, corpus, docs, reference, capsys):
    inputs = [write_parquet(tmp_path / "a.parquet", docs[:40], 9), write_jsonl(str(tmp_path / "b.jsonl"), docs[40:60]),
              write_dataset_dir(tmp_path / "c", docs[60:])]
    by_file = preprocess(inputs, str(tmp_path / "bf"), corpus.tokenizer, workers=2, shard_by_file=True)
    assert [s["documents"] for s in by_file.shards] == [40, 20, len(docs) - 60]
    size = preprocess(inputs, str(tmp_path / "sz"), corpus.tokenizer, shard_mb=0.01, chunk_bytes=3000)
    assert len(size.shards) > 3
    for name in ("bf", "sz"):
        assert merge_datasets.main(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / f"m{name}")]) \
            == 0, capsys.readouterr().err
        assert _bytes(tmp_path / f"m{name}") == _bytes(reference), name
    plan = make_plan(inputs, str(tmp_path / "out"), corpus.tokenizer, tasks=2)
    assert plan.sizes == [input_size(p) for p in inputs] and plan.sizes[2] > 4096  # the directory's data files
    path = write_plan(plan)
    for task in range(plan.tasks):
        run_plan_task(path, task)
    merge_plan(path)
    assert _bytes(tmp_path / "out") == _bytes(reference)
    # A rewritten data file of the directory makes its shard stale: its task redoes just that input.
    owner = next(t for t, files in enumerate(plan.assignment) if 2 in files)
    assert run_plan_task(path, owner)["processed"] == []
    data_file = os.path.join(inputs[2], "data-00001-of-00002.arrow")
    os.utime(data_file, ns=(os.stat(data_file).st_atime_ns, os.stat(data_file).st_mtime_ns + 10**9))
    assert run_plan_task(path, owner)["processed"] == [2]



def test_plan_splits_big_tables_into_row_group_and_data_file_parts(tmp_path, corpus, docs, reference):
    texts = [*docs[:44], "", *docs[44:60]]  # row 45: an empty document, in a later part
    inputs = [write_parquet(tmp_path / "a.parquet", texts, 6), write_jsonl(str(tmp_path / "b.jsonl"), docs[60:64]),
              write_dataset_dir(tmp_path / "c", docs[64:], files=4, batch=3)]
    one = preprocess(inputs, str(tmp_path / "one"), corpus.tokenizer)
    plan = make_plan(inputs, str(tmp_path / "out"), corpus.tokenizer, tasks=4)
    by_input = {i: [(a, b) for j, a, b in plan.parts if j == i] for i in range(3)}
    assert len(by_input[0]) >= 2 and len(by_input[2]) >= 2 and by_input[1] == [(0, -1)]
    for i, units in ((0, 11), (2, 4)):  # consecutive parts covering every row group / data file once
        assert by_input[i][0][0] == 0 and by_input[i][-1][1] == units
        assert all(x[1] == y[0] for x, y in zip(by_input[i], by_input[i][1:]))
    assert sorted(s for a in plan.assignment for s in a) == list(range(len(plan.parts))) and plan.tasks == 4
    path = write_plan(plan)
    run_plan_task(path, 0)
    with pytest.raises(DataError, match=r"shards are not finished: .*(row groups|data files) \d+\.\.\d+\) \(task "):
        merge_plan(path)
    for task in range(1, plan.tasks):
        run_plan_task(path, task)
    assert run_plan_task(path, 1)["processed"] == []  # a requeued task finds its parts done
    summ = merge_plan(path)
    assert _bytes(tmp_path / "out") == _bytes(reference) == _bytes(tmp_path / "one")
    assert summ["input_files"] == one.input_files and summ["skipped_lines"] == one.skipped_lines
    assert [(f["path"], f["documents"], f["skipped"], f["disk_bytes"]) for f in summ["files"]] == \
        [(f["path"], f["documents"], f["skipped"], f["disk_bytes"]) for f in one.files]


@pytest.mark.timeout(180)
def test_benchmark_compares_formats_on_the_same_documents(tmp_path, corpus, docs):
    src = write_jsonl(str(tmp_path / "d.jsonl"), docs[:40])
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "tools" / "bench_preprocess.py"), "--input", src, "--tokenizer",
                        corpus.tokenizer, "--workers", "1", "--repeats", "1", "--formats", "jsonl", "parquet", "arrow",
                        "--row-group-rows", "7", "--work-dir", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr
    assert "| | polytron JSONL | polytron Parquet | polytron datasets dir |" in r.stdout
    assert "| MB/s of text, 1 worker |" in r.stdout and "| text MB/s vs JSONL, 1 worker | 1.00x |" in r.stdout
    assert "Identical `.bin/.idx`: polytron Parquet w1: yes, polytron datasets dir w1: yes" in r.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["text_mb"] == sum(len(t.encode()) for t in docs[:40]) / 1e6
    assert pq.ParquetFile(str(tmp_path / "w" / "input_parquet.parquet")).num_row_groups == 6
    assert sorted((x["tool"], x["workers"], x["rc"]) for x in result["runs"]) == [
        (t, w, 0) for t in ("ours", "ours-arrow", "ours-parquet") for w in (0, 1)]
