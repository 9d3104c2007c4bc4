"""Corpus-scale preprocessing on real text with real SentencePiece models and megatron-core's reader.

Covers: a start without torch or megatron-core, bytes equal to megatron-core's own writer,
the exact segment-cached encoder (and the models it must refuse), .gz/.zst inputs,
globs and input lists, shards and tools/merge_datasets.py, per-file accounting, the
progress bar, and resumable plan tasks (the SLURM array steps, run here without SLURM).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from polytron.data._megatron import DType, IndexedDataset, IndexedDatasetBuilder
from polytron.data.errors import DataError
from polytron.data.indexed import DatasetWriter, read_index
from polytron.data.preprocess import preprocess
from polytron.data.segment_cache import PlainEncoder, SegmentCachedEncoder, _load_proto, build_encoder
from polytron.data.shard_plan import load_plan, make_plan, merge_plan, run_plan_task, write_plan
from polytron.data.tokenizer import INSTRUCTION_MARKERS, load_tokenizer, train_sentencepiece
from polytron.tools import merge_datasets, preprocess_data
from tests.data.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_data.py"
MERGE = ROOT / "tools" / "merge_datasets.py"
#: Texts where segment boundaries are easy to get wrong.
AWKWARD = ["x", " ", "  two leading spaces", "trailing   ", "tab\there\t\t", "\n\nnewlines first",
           "a\u2581b \u2581\u2581c", "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 \u00a0nbsp", "crlf\r\nline\r\n",
           "many     spaces   between", "123 4567 89.0e-3", "<INST>not a marker here</INST>"]


def _bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def _same(a: tuple[bytes, np.ndarray], b: tuple[bytes, np.ndarray]) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1])


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus) -> list[str]:
    """Four inputs of different kinds: JSONL, paragraphs, gzip JSONL, and one without valid documents."""
    d = tmp_path_factory.mktemp("inputs")
    a = write_jsonl(str(d / "a.jsonl"), corpus.docs[:40])
    (d / "b.txt").write_text("\n\n".join(corpus.docs[40:70]), encoding="utf-8")
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in corpus.docs[70:110])
    (d / "d.jsonl").write_bytes(b'{"text": ""}\nnot json\n')
    return [a, str(d / "b.txt"), str(d / "c.jsonl.gz"), str(d / "d.jsonl")]


# ----------------------------------------------------------------------------- start-up

@pytest.mark.timeout(120)
def test_tools_start_without_torch_or_megatron(tmp_path, corpus):
    src = write_jsonl(str(tmp_path / "x.jsonl"), corpus.docs[:3])
    argv = [str(TOOL), "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer", corpus.tokenizer,
            "--workers", "1", "--no-progress"]
    probe = ("import json, runpy, sys, time\n"
             f"sys.argv = {argv!r}\n"
             f"try:\n    runpy.run_path({str(TOOL)!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    rc = e.code\n"
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'transformers'})\n"
             "print(json.dumps({'rc': rc, 'heavy': heavy, 'cpu_s': time.process_time()}))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0 and result["heavy"] == [], (result, r.stderr)
    # CPU seconds, not wall time, so that a busy machine does not matter: importing torch
    # and megatron-core alone costs ~8 CPU-seconds here, the whole run ~0.5.
    assert result["cpu_s"] < 3, result
    assert len(IndexedDataset(str(tmp_path / "o"))) == 3
    for tool in (TOOL, MERGE):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        assert r.returncode == 0 and "usage" in r.stdout and cpu < 2, (tool, cpu)


# ----------------------------------------------------------------------------- exact bytes

def test_bytes_equal_megatron_core_writer_and_reader(tmp_path, corpus):
    docs = list(corpus.docs[:60]) + [t for t in AWKWARD if t.strip()]
    src = write_jsonl(str(tmp_path / "d.jsonl"), docs)
    summ = preprocess([src], str(tmp_path / "ours"), corpus.tokenizer, workers=2, chunk_bytes=4096)
    assert summ.encoder == "segment cache" and summ.documents == len(docs)
    tok = load_tokenizer(corpus.tokenizer)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(tok.vocab_size))
    for d in docs:
        ids = tok.encode(d) + [tok.eod_id]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert _bytes(tmp_path / "ours") == _bytes(tmp_path / "ref")
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs) and ds[7].tolist() == tok.encode(docs[7]) + [tok.eod_id]


def test_segment_cache_equals_sentencepiece_cold_and_warm(corpus):
    tok = load_tokenizer(corpus.tokenizer)
    fast, plain = build_encoder(tok, np.uint16), PlainEncoder(tok, np.uint16)
    assert isinstance(fast, SegmentCachedEncoder)
    texts = list(corpus.docs) + AWKWARD
    for batch in (texts[:30], texts[30:], texts, AWKWARD[::-1]):  # cold, then warm cache
        assert _same(fast.encode_docs(batch), plain.encode_docs(batch))


def _train_raw(path, lines, **kw) -> str:
    """A SentencePiece model trained directly (settings our trainer never uses)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    settings = {"byte_fallback": True, "minloglevel": 2, "model_type": "bpe",
                "normalization_rule_name": "identity", "remove_extra_whitespaces": False, **kw}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **settings)
    Path(path).write_bytes(buf.getvalue())
    return str(path)


def test_markers_keep_the_cache_and_unsafe_models_are_refused(tmp_path, corpus):
    inst = train_sentencepiece(corpus.docs[:60], str(tmp_path / "inst"), 400,
                               special_tokens=INSTRUCTION_MARKERS, threads=2)
    tok = load_tokenizer(inst)
    texts = ["<INST>Say hi</INST><RESP> hi</RESP>", "a<INST>b", " <RESP>  x"] + list(corpus.docs[:20]) + AWKWARD
    fast = build_encoder(tok, np.uint16)
    assert isinstance(fast, SegmentCachedEncoder)
    assert _same(fast.encode_docs(texts), PlainEncoder(tok, np.uint16).encode_docs(texts))
    # Pieces that run across spaces ("▁of▁the"): caching would change the tokens, so it is refused.
    lines = [ln for d in corpus.docs[:60] for ln in d.split("\n") if ln.strip()]
    spanning = load_tokenizer(_train_raw(tmp_path / "span.model", lines, vocab_size=1500, split_by_whitespace=False))
    enc = build_encoder(spanning, np.uint16)
    assert isinstance(enc, PlainEncoder) and "span whitespace boundaries" in enc.description
    forced = SegmentCachedEncoder(_load_proto(spanning.path), spanning.eod_id, np.uint16)
    sample = [" ".join(corpus.docs[:5])]
    assert not _same(forced.encode_docs(sample), enc.encode_docs(sample))  # what the check prevents
    unigram = load_tokenizer(_train_raw(tmp_path / "uni.model", lines, vocab_size=400, model_type="unigram"))
    assert "not a BPE model" in build_encoder(unigram, np.uint16).description


# ----------------------------------------------------------------------------- inputs

def test_gz_and_zst_inputs_give_the_plain_dataset(tmp_path, corpus):
    import zstandard

    jl = "".join(json.dumps({"text": t}) + "\n" for t in corpus.docs[:50]).encode()
    txt = "\n\n".join(corpus.docs[50:90]).encode()
    (tmp_path / "d.jsonl").write_bytes(jl)
    (tmp_path / "t.txt").write_bytes(txt)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jl))
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(txt))
    z = zstandard.ZstdCompressor()
    half = len(jl) // 2
    (tmp_path / "d.jsonl.zst").write_bytes(z.compress(jl[:half]) + z.compress(jl[half:]))  # two frames
    (tmp_path / "t.txt.zst").write_bytes(z.compress(txt))
    plain = preprocess([str(tmp_path / "d.jsonl"), str(tmp_path / "t.txt")], str(tmp_path / "plain"),
                       corpus.tokenizer, chunk_bytes=4096)
    for ext in ("gz", "zst"):
        names = [str(tmp_path / f"d.jsonl.{ext}"), str(tmp_path / f"t.txt.{ext}")]
        summ = preprocess(names, str(tmp_path / ext), corpus.tokenizer, workers=2, chunk_bytes=4096)
        assert _bytes(tmp_path / ext) == _bytes(tmp_path / "plain")
        assert [f["documents"] for f in summ.files] == [f["documents"] for f in plain.files]
        assert summ.files[0]["documents"] == 50 and summ.skipped == 0
        assert [f["text_bytes"] for f in summ.files] == [len(jl), len(txt)]
        assert [f["disk_bytes"] for f in summ.files] == [os.path.getsize(n) for n in names]


@pytest.mark.parametrize("name, damage", [("x.jsonl.zst", lambda b: b[:len(b) // 2]),
                                          ("x.jsonl.zst", lambda b: b[:20] + b"\x00" * 40 + b[60:]),
                                          ("x.jsonl.gz", lambda b: b[:len(b) // 2])],
                         ids=["zst-truncated", "zst-corrupt", "gz-truncated"])
def test_damaged_compressed_input_is_one_error_line(tmp_path, corpus, capsys, name, damage):
    import zstandard

    raw = "".join(json.dumps({"text": t}) + "\n" for t in corpus.docs[:30]).encode()
    packed = zstandard.ZstdCompressor().compress(raw) if name.endswith(".zst") else gzip.compress(raw)
    (tmp_path / name).write_bytes(damage(packed))
    rc = preprocess_data.main(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "o"),
                               "--tokenizer", corpus.tokenizer, "--no-progress", "--workers", "1"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and name in line and "cannot read" in line
    assert sorted(os.listdir(tmp_path)) == [name]


def test_globs_and_input_lists(tmp_path, corpus, capsys, files):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# corpus\n{files[0]}\n\n{os.path.dirname(files[1])}/[bc].*\n")
    rc = preprocess_data.main(["--input-list", str(listing), "--output-prefix", str(tmp_path / "g"),
                               "--tokenizer", corpus.tokenizer, "--no-progress", "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    summ = json.loads((tmp_path / "g.summary.json").read_text())
    assert summ["input_files"] == [os.path.abspath(f) for f in files[:3]]
    rc = preprocess_data.main(["--input", str(tmp_path / "nothing" / "*.jsonl"), "--output-prefix",
                               str(tmp_path / "h"), "--tokenizer", corpus.tokenizer])
    assert rc == 2 and "matches no file" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- shards and merge

def test_shards_by_size_and_by_file_merge_to_the_single_pass(tmp_path, corpus, capsys, files):
    one = preprocess(files, str(tmp_path / "one"), corpus.tokenizer, workers=1)
    per_file = [f["documents"] for f in one.files]  # b.txt: a document per paragraph
    assert per_file[0] == per_file[2] == 40 and per_file[1] > 30 and per_file[3] == 0
    assert one.files[3]["skipped"] == 2 and sum(per_file) == one.documents
    assert sum(f["tokens"] for f in one.files) == one.tokens and one.shards == []
    limit_mb = 0.01
    size = preprocess(files, str(tmp_path / "sz"), corpus.tokenizer, workers=2, shard_mb=limit_mb,
                      chunk_bytes=4096)
    assert len(size.shards) > 3 and size.documents == one.documents
    for shard in size.shards[:-1]:  # each shard closes with the document that reaches the limit
        lengths = read_index(shard["prefix"] + ".idx").lengths
        assert lengths.sum() * 2 >= limit_mb * 1e6 > (lengths.sum() - lengths[-1]) * 2
    by_file = preprocess(files, str(tmp_path / "bf"), corpus.tokenizer, workers=2, shard_by_file=True)
    assert [s["documents"] for s in by_file.shards] == per_file[:3]  # the file without documents: no shard
    assert [s["files"] for s in by_file.shards] == [[0], [1], [2]]
    assert size.shards[0]["files"] == [0] and size.shards[-1]["files"][-1] == 2
    assert not os.path.exists(tmp_path / "sz.bin") and not os.path.exists(tmp_path / "bf_00003.bin")
    ways = {"run": [str(tmp_path / "sz")], "glob": [str(tmp_path / "bf_*")],
            "list": [s["prefix"] for s in size.shards]}
    for way, inputs in ways.items():
        assert merge_datasets.main(["--input", *inputs, "--output-prefix", str(tmp_path / way)]) == 0, \
            capsys.readouterr().err
        assert _bytes(tmp_path / way) == _bytes(tmp_path / "one"), way
        merged = json.loads((tmp_path / f"{way}.summary.json").read_text())
        assert (merged["documents"], merged["tokens"], merged["skipped"]) == (one.documents, one.tokens, 2)
        assert [f["documents"] for f in merged["files"]] == per_file, way
    assert len(IndexedDataset(str(tmp_path / "glob"))) == one.documents


def test_merge_refuses_bad_inputs_with_one_line(tmp_path, corpus, capsys, files):
    preprocess(files[:1], str(tmp_path / "a"), corpus.tokenizer)
    w = DatasetWriter(str(tmp_path / "wide.bin"), np.int32)  # what a >65,500-token vocabulary writes
    w.add(np.arange(5, dtype=np.int32).tobytes(), np.array([5], np.int32))
    w.finish(str(tmp_path / "wide.idx"))
    cases = [([str(tmp_path / "a"), str(tmp_path / "wide")], "differs from uint16"),
             ([str(tmp_path / "a"), str(tmp_path / "gone")], "no such dataset"),
             ([str(tmp_path / "a")], "is also an input")]
    for inputs, message in cases:
        out = str(tmp_path / "a") if "also" in message else str(tmp_path / "m")
        assert merge_datasets.main(["--input", *inputs, "--output-prefix", out]) == 2
        assert message in _one_error_line(capsys.readouterr().err)
    (tmp_path / "short.bin").write_bytes(Path(tmp_path / "a.bin").read_bytes()[:-2])
    (tmp_path / "short.idx").write_bytes(Path(tmp_path / "a.idx").read_bytes())
    assert merge_datasets.main(["--input", str(tmp_path / "short"), "--output-prefix", str(tmp_path / "m")]) == 2
    assert "its index says" in _one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.glob("m.*"))


def test_progress_bar_shows_mb_and_documents_per_second(tmp_path, corpus, capsys, files):
    rc = preprocess_data.main(["--input", *files[:3], "--output-prefix", str(tmp_path / "p"), "--tokenizer",
                               corpus.tokenizer, "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 0 and "B/s" in captured.err and "docs/s" in captured.err, captured.err[-500:]
    assert "docs/s" in captured.out and "3 files" in captured.out


# ----------------------------------------------------------------------------- plan tasks

def test_plan_tasks_resume_skip_finished_and_merge_to_the_single_pass(tmp_path, corpus, files):
    one = preprocess(files, str(tmp_path / "one"), corpus.tokenizer)
    plan = make_plan(files, str(tmp_path / "out"), corpus.tokenizer, tasks=2)
    path = write_plan(plan)
    assert sorted(i for a in load_plan(path).assignment for i in a) == [0, 1, 2, 3]
    first = run_plan_task(path, 0)
    assert first["processed"] == plan.assignment[0] and first["skipped_finished"] == []
    # Task 1 as a killed run leaves it: a half-written temporary file and no marker.
    victim = plan.shard(plan.assignment[1][0])
    Path(victim + ".bin.tmp99999").write_bytes(b"half written")
    with pytest.raises(DataError, match=r"shards are not finished: .*\(task 1\)"):
        merge_plan(path)
    run_plan_task(path, 1)
    assert not list((tmp_path / "out.parts" / "shards").glob("*tmp*"))
    stamps = {i: os.stat(plan.shard(i) + ".done.json").st_mtime_ns for i in plan.assignment[0]}
    again = run_plan_task(path, 0)  # a requeued task: nothing to redo
    assert again["processed"] == [] and again["skipped_finished"] == plan.assignment[0]
    assert stamps == {i: os.stat(plan.shard(i) + ".done.json").st_mtime_ns for i in plan.assignment[0]}
    summ = merge_plan(path)
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "one")
    assert (summ["documents"], summ["skipped"]) == (one.documents, one.skipped)
    assert [f["path"] for f in summ["files"]] == one.input_files
    # A changed input makes its shard stale: the task redoes exactly that file.
    changed = plan.assignment[0][0]
    os.utime(plan.inputs[changed], ns=(time.time_ns(), time.time_ns()))
    assert run_plan_task(path, 0)["processed"] == [changed]


@pytest.mark.timeout(120)
def test_benchmark_script_times_our_tool(tmp_path, corpus):
    src = write_jsonl(str(tmp_path / "d.jsonl"), corpus.docs[:50])
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_preprocess.py"), "--input", src, "--tokenizer",
                        corpus.tokenizer, "--workers", "1", "--repeats", "1", "--work-dir", str(tmp_path / "w"),
                        "--json", str(tmp_path / "runs.json")], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    assert "| start-up, s (one-document run) |" in r.stdout and "| MB/s end to end, 1 worker |" in r.stdout
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(x["tool"], x["workers"], x["rc"]) for x in runs] == [("ours", 0, 0), ("ours", 1, 0)]
    assert all(x["cpu_s"] > 0 and x["peak_mb"] > 0 for x in runs)
