"""Preprocessing as a SLURM array job: ``python -m launch.submit preprocess`` on a real cluster.

The array tokenizes four inputs (JSONL, paragraphs, .gz, .zst) in two tasks; one task is
killed and requeued in the middle of its big file. The merged dataset must equal one
process over the same files, byte for byte, the requeued task must skip the file it had
finished, and nothing the killed run left half-written may reach the merge.
The dry-run test needs no cluster.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polytron.data.builtin import iter_builtin_documents
from polytron.data.preprocess import preprocess
from polytron.data.tokenizer import train_sentencepiece
from tests.integration.slurm_cluster import SlurmCluster, missing_requirements

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"
MISSING = missing_requirements()


def submit(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), "preprocess", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, str, list[str]]:
    """Four inputs (sizes chosen so task 1 gets a small file, then a big one) and a tokenizer."""
    root = tmp_path_factory.mktemp("pre")
    docs = list(iter_builtin_documents())
    tok = train_sentencepiece(docs[:200], str(root / "tok"), 512, threads=2)
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:  # small
        f.writelines(lines[:300])
    big = [lines[(i * 7) % len(lines)] for i in range(len(lines) * 9 // 2)]  # ~10 MB, order varied
    (root / "b.jsonl").write_text("".join(big), encoding="utf-8")
    (root / "c.txt").write_text("\n\n".join(docs * 5), encoding="utf-8")  # ~11 MB
    import zstandard

    (root / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("\n\n".join(docs[:200]).encode()))
    files = [str(root / n) for n in ("a.jsonl.gz", "b.jsonl", "c.txt", "d.txt.zst")]
    return root, tok, files


def test_dry_run_renders_array_and_merge_and_writes_nothing(tmp_path, corpus):
    root, tok, files = corpus
    r = submit("--input", str(root / "*.jsonl*"), str(root / "c.txt"), "--output-prefix", str(tmp_path / "out"),
               "--tokenizer", tok, "--tasks", "8", "--cpus-per-task", "4", "--max-parallel", "2",
               "--partition", "cpu", "--time", "2:00:00", "--dry-run")
    assert r.returncode == 0, r.stderr
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --cpus-per-task=4", "#SBATCH --requeue",
                 "#SBATCH --partition=cpu", "#SBATCH --time=2:00:00", "%x-%A_%a.out", "--workers 4",
                 f"--plan {tmp_path / 'out.parts' / 'plan.json'}", "merge_datasets.py --plan",
                 "#SBATCH --kill-on-invalid-dep=yes", "3 files, 3 tasks"):
        assert line in r.stdout, line
    assert "{{" not in r.stdout and not os.listdir(tmp_path)
    for args, message in ((["--input", str(root / "none*")], "matches no file"),
                          (["--input", files[0], "--tasks", "0"], "--tasks must be >= 1"),
                          (["--input", files[0], "--time", "soon"], "not a positive SLURM time limit")):
        r = submit(*args, "--output-prefix", str(tmp_path / "o"), "--tokenizer", tok, "--dry-run")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.skipif(MISSING is not None, reason=f"skipped: {MISSING}")
def test_array_with_a_killed_and_requeued_task_equals_one_process(tmp_path, corpus):
    root, tok, files = corpus
    with SlurmCluster(tmp_path / "slurm") as cluster:
        run = tmp_path / "run"
        run.mkdir()
        r = submit("--input", *files, "--output-prefix", str(run / "web"), "--tokenizer", tok, "--tasks", "2",
                   "--cpus-per-task", "1", "--time", "10", "--encoder", "plain", env=cluster.env, cwd=run)
        assert r.returncode == 0, r.stdout + r.stderr
        array_id = re.search(r"submitted array job (\d+)", r.stdout).group(1)
        merge_id = re.search(r"submitted merge job (\d+)", r.stdout).group(1)
        work = run / "web.parts"
        plan = json.loads((work / "plan.json").read_text())
        victim = next(t for t, a in enumerate(plan["assignment"]) if a[0] == 0)
        assert plan["assignment"][victim][:2] == [0, 1], plan["assignment"]  # a small file, then the big one
        shards = work / "shards"
        # Kill the victim inside its big file: the small file's shard is finished, the big one half-written.
        _wait_for(lambda: (shards / "000000.done.json").exists() and list(shards.glob("000001.*tmp*")),
                  240, "task to start its second file")
        cluster.scontrol("requeue", f"{array_id}_{victim}")
        first = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in shards.glob("000000.*")}
        info = cluster.wait_job(merge_id, 300)
        logs = {t: (work / "logs" / f"preprocess-web-{array_id}_{t}.out").read_text() for t in range(2)}
        merge_log = (work / "logs" / f"preprocess-web-merge-{merge_id}.out").read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{merge_log}\n{logs}"
        assert cluster.job_info(f"{array_id}_{victim}")["Restarts"] == "1"

    log, n = logs[victim], len(plan["assignment"][victim])
    killed_run, requeued_run = log.split(f"task {victim} restart 1", 1)
    assert f"restart 0: {n} files, 0 already finished" in killed_run and "done:" not in killed_run, log
    assert f"restart 1: {n} files, 1 already finished" in log and "finished earlier, skipped" in requeued_run, log
    assert "Traceback" not in "".join(logs.values()) + merge_log
    # Not redone: the finished shard's files are the very files the killed run published.
    assert first == {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in shards.glob("000000.*")}
    assert not list(shards.glob("*tmp*"))
    ref = preprocess(files, str(tmp_path / "ref"), tok, workers=2)
    for ext in (".bin", ".idx"):
        assert (run / f"web{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    merged = json.loads((run / "web.summary.json").read_text())
    assert merged["documents"] == ref.documents and [f["path"] for f in merged["files"]] == ref.input_files
    tasks = [json.loads((work / "tasks" / f"{t:05d}.summary.json").read_text()) for t in range(2)]
    assert tasks[victim]["skipped_finished"] == [0] and tasks[victim]["processed"] == plan["assignment"][victim][1:]
