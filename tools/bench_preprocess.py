#!/usr/bin/env python3
"""Time tools/preprocess_data.py against Megatron-LM's tools/preprocess_data.py on the same JSONL.

    python tools/bench_preprocess.py --input corpus.jsonl --tokenizer tok.model \\
        --megatron /path/Megatron-LM/tools/preprocess_data.py [--workers 1 2] [--repeats 3]

Runs alternate between the tools (the order flips every repeat) so that a change in
machine load hits both alike. Per run: wall time, CPU seconds of the whole process tree
(``getrusage`` of waited-for children), peak memory (the process tree's summed PSS,
sampled every 0.2 s) and the CPU seconds other processes used meanwhile (``/proc/stat``
busy time minus ours: how quiet the machine was). Start-up is the wall time of a run on
a one-document copy of the input. Medians go into a Markdown table; ``--json`` keeps
every run. Without ``--megatron`` only our tool is measured. Both tools write
document-level datasets with an end-of-document token (Megatron: ``--append-eod``,
``GPTSentencePieceTokenizer``); their ``.bin/.idx`` are compared byte for byte.

``--formats jsonl parquet arrow`` also times our tool on the same documents converted
(before timing) to a Parquet file (``--row-group-rows`` rows per row group, snappy, with
an ``id`` column beside ``text``) and to a ``datasets`` ``save_to_disk`` directory (Arrow
stream file of 1,000-row batches), adds MB/s of document text (UTF-8 bytes of the ``text``
fields, the same for every format) and its ratio to JSONL, and checks every output equals
the JSONL one byte for byte.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from polytron.model.errors import BadInput
from polytron.tools import cli

OURS = Path(__file__).resolve().parent / "preprocess_data.py"
TOOLS = ("ours", "ours-parquet", "ours-arrow", "megatron")
FORMATS = ("jsonl", "parquet", "arrow")
LABELS = {"ours": "polytron JSONL", "ours-parquet": "polytron Parquet", "ours-arrow": "polytron datasets dir",
          "megatron": "Megatron-LM"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSONL file with a 'text' field (both tools read it)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    p.add_argument("--megatron", default="", help="Megatron-LM's tools/preprocess_data.py (omit: ours only)")
    p.add_argument("--megatron-pythonpath", default="", help="PYTHONPATH for Megatron-LM's tool")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=["jsonl"],
                   help="input formats for our tool: the JSONL input, and it converted to Parquet / a "
                        "datasets directory (jsonl is always run)")
    p.add_argument("--row-group-rows", type=int, default=10_000, help="rows per Parquet row group")
    p.add_argument("--ours-args", default="", help="extra arguments for our tool, e.g. '--encoder plain'")
    p.add_argument("--work-dir", default="/tmp/bench_preprocess", help="outputs (removed between runs)")
    p.add_argument("--json", default="", help="write every run here")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="before each run wait up to this many seconds for other processes to use under "
                        "0.1 core for 2 s in a row (0: do not wait)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measuring

def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _pss_mb(pid: int) -> float:
    """Proportional set size of one process in MB (RSS where smaps_rollup is missing)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process and its descendants; ``peak_mb`` is the largest sum."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_mb = pid, interval, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            todo, total = [self.pid], 0.0
            while todo:
                p = todo.pop()
                total += _pss_mb(p)
                todo += _children(p)
            self.peak_mb = max(self.peak_mb, total)
            self.stop.wait(self.interval)


def _busy_seconds() -> float:
    """CPU seconds all processors spent busy since boot (/proc/stat, not idle or iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, window_s: float = 2.0, cores: float = 0.1) -> float:
    """Wait until the machine's busy CPU stays under ``cores`` for ``window_s``; seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        busy = _busy_seconds()
        time.sleep(window_s)
        if _busy_seconds() - busy < cores * window_s:
            break
    return time.monotonic() - t0


def run_once(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; wall and CPU seconds, peak memory, other processes' CPU meanwhile, status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = _busy_seconds(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: stopped as a whole below
    mem = TreeMemory(proc.pid)
    mem.start()
    try:
        err = proc.communicate()[1]
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    mem.stop.set()
    mem.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    foreign = max(0.0, _busy_seconds() - busy0 - cpu)
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": mem.peak_mb, "foreign_cpu_s": foreign,
            "rc": proc.returncode, "stderr_tail": err.strip().splitlines()[-3:]}


# ----------------------------------------------------------------------------- the two tools

def command(tool: str, a: argparse.Namespace, src: str, prefix: str, workers: int) -> list[str]:
    """Command line of one run."""
    if tool.startswith("ours"):
        return [sys.executable, str(OURS), "--input", src, "--output-prefix", prefix, "--tokenizer",
                a.tokenizer, "--workers", str(workers), "--no-progress", *a.ours_args.split()]
    return [sys.executable, a.megatron, "--input", src, "--output-prefix", prefix, "--tokenizer-type",
            "GPTSentencePieceTokenizer", "--tokenizer-model", a.tokenizer, "--append-eod", "--workers",
            str(workers), "--log-interval", "1000000000"]


def outputs(tool: str, prefix: str) -> tuple[Path, Path]:
    """The ``.bin``/``.idx`` a run writes (Megatron appends ``_text_document``)."""
    base = f"{prefix}_text_document" if tool == "megatron" else prefix
    return Path(base + ".bin"), Path(base + ".idx")


def environment(tool: str, a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if tool == "megatron" and a.megatron_pythonpath:
        env["PYTHONPATH"] = a.megatron_pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return env


def one_document(src: str, work: Path) -> str:
    """A copy of the input's first line: a run on it times the fixed start-up cost."""
    path = work / "one_document.jsonl"
    with open(src, "rb") as f:
        path.write_bytes(f.readline())
    return str(path)


def read_texts(src: str) -> list[str]:
    """The ``text`` field of every JSONL line."""
    with open(src, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def convert(texts: list[str], fmt: str, path: Path, row_group_rows: int) -> str:
    """Write ``texts`` as a Parquet file or a ``datasets`` save_to_disk directory; its path."""
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": texts})
    if fmt == "parquet":
        pq.write_table(table, str(path) + ".parquet", row_group_size=row_group_rows)
        return str(path) + ".parquet"
    path.mkdir()
    with pa.ipc.new_stream(str(path / "data-00000-of-00001.arrow"), table.schema) as w:
        for batch in table.to_batches(max_chunksize=1000):
            w.write_batch(batch)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return str(path)


def sources(a: argparse.Namespace, work: Path, single: str) -> dict[str, tuple[str, str]]:
    """(full input, one-document input) of each of our formats, converted from the JSONL input."""
    out = {"ours": (a.input, single)}
    for fmt in a.formats:
        if fmt != "jsonl":
            out[f"ours-{fmt}"] = (convert(read_texts(a.input), fmt, work / f"input_{fmt}", a.row_group_rows),
                                  convert(read_texts(single), fmt, work / f"one_{fmt}", a.row_group_rows))
    return out


def machine() -> dict:
    """Where the numbers come from."""
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- the benchmark

def bench(a: argparse.Namespace) -> dict:
    """All runs, alternating tools; returns {"runs": [...], "identical": {...}, "input_mb": ...}."""
    work = Path(a.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    single = one_document(a.input, work)
    inputs = sources(a, work, single)
    tools = [t for t in TOOLS if t in inputs or (t == "megatron" and a.megatron)]
    if a.megatron:
        inputs["megatron"] = (a.input, single)
    runs: list[dict] = []
    identical: dict[str, bool] = {}
    for r in range(a.repeats):
        order = tools if r % 2 == 0 else tools[::-1]
        for workers in [0] + list(a.workers):  # 0: the start-up run (one document, one worker)
            made = {}
            for tool in order:
                prefix = str(work / f"{tool}_w{workers}")
                src, w = (inputs[tool][1], 1) if workers == 0 else (inputs[tool][0], workers)
                waited = wait_quiet(a.wait_quiet) if a.wait_quiet else 0.0
                res = run_once(command(tool, a, src, prefix, w), environment(tool, a))
                res.update(tool=tool, workers=workers, repeat=r, load1=os.getloadavg()[0], waited_s=waited)
                runs.append(res)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}),
                      file=sys.stderr, flush=True)
                made[tool] = outputs(tool, prefix)
            for tool in (t for t in tools if t != "ours" and workers):  # each against our JSONL output
                same = all(x.is_file() and x.read_bytes() == y.read_bytes() for x, y in zip(made["ours"], made[tool]))
                key = f"w{workers}" if len(tools) == 2 and tool == "megatron" else f"{LABELS[tool]} w{workers}"
                identical[key] = identical.get(key, True) and same
            for paths in made.values():
                for p in paths:
                    p.unlink(missing_ok=True)
    text_mb = sum(len(t.encode("utf-8")) for t in read_texts(a.input)) / 1e6 if len(a.formats) > 1 else 0.0
    return {"runs": runs, "identical": identical, "input_mb": os.path.getsize(a.input) / 1e6, "text_mb": text_mb,
            "machine": machine(), "args": vars(a)}


def _median(runs: list[dict], tool: str, workers: int, key: str) -> float:
    vals = [r[key] for r in runs if r["tool"] == tool and r["workers"] == workers and r["rc"] == 0]
    return statistics.median(vals) if vals else float("nan")


def table(result: dict) -> str:
    """Markdown table of medians: start-up, MB/s, CPU-s/MB, peak memory per worker count."""
    runs, mb, text_mb = result["runs"], result["input_mb"], result.get("text_mb", 0.0)
    tools = sorted({r["tool"] for r in runs}, key=TOOLS.index)
    workers = sorted({r["workers"] for r in runs} - {0})
    # (row label, the row's value for a tool name, its format). Called with the tool name only; typed
    # ``...`` because the per-worker lambdas bind ``w`` as a default, which mypy cannot match to [str]
    rows: list[tuple[str, Callable[..., float], str]] = [
        ("start-up, s (one-document run)", lambda t: _median(runs, t, 0, "wall_s"), "{:.2f}")]
    for w in workers:
        rows += [(f"MB/s end to end, {w} worker{'s' if w > 1 else ''}",
                  lambda t, w=w: mb / _median(runs, t, w, "wall_s"), "{:.2f}"),
                 *([(f"MB/s of text, {w} worker{'s' if w > 1 else ''}",
                     lambda t, w=w: text_mb / _median(runs, t, w, "wall_s"), "{:.2f}"),
                    (f"text MB/s vs JSONL, {w} worker{'s' if w > 1 else ''}",
                     lambda t, w=w: _median(runs, "ours", w, "wall_s") / _median(runs, t, w, "wall_s"), "{:.2f}x")]
                   if text_mb else []),
                 (f"CPU-s per MB, {w} worker{'s' if w > 1 else ''}",
                  lambda t, w=w: _median(runs, t, w, "cpu_s") / mb, "{:.3f}"),
                 (f"peak memory (PSS), MB, {w} worker{'s' if w > 1 else ''}",
                  lambda t, w=w: _median(runs, t, w, "peak_mb"), "{:.0f}")]
    if len(workers) >= 2:
        lo, hi = workers[0], workers[-1]
        rows.append((f"scaling {lo} -> {hi} workers",
                     lambda t: _median(runs, t, lo, "wall_s") / _median(runs, t, hi, "wall_s"), "{:.2f}x"))
    rows.append(("other processes' CPU-s per run (median)",
                 lambda t: statistics.median(r["foreign_cpu_s"] for r in runs if r["tool"] == t), "{:.1f}"))
    names = {"ours": "polytron", "megatron": "Megatron-LM"} if set(tools) <= {"ours", "megatron"} else LABELS
    head = "| | " + " | ".join(names[t] for t in tools)
    head += " | ratio |" if len(tools) == 2 else " |"
    lines = [head, "|---" * (len(tools) + 1 + (len(tools) == 2)) + "|"]
    for name, fn, fmt in rows:
        vals = [fn(t) for t in tools]
        cells = [fmt.format(v) for v in vals]
        if len(tools) == 2:
            cells.append(f"{vals[0] / vals[1]:.2f}x" if vals[1] else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result["identical"]:
        lines.append("")
        lines.append("Identical `.bin/.idx`: " + ", ".join(f"{k}: {'yes' if v else 'NO'}"
                                                          for k, v in result["identical"].items()))
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill: the running tool's group goes too
    for path, what in ((a.input, "--input"), (a.tokenizer, "--tokenizer"), (a.megatron or a.input, "--megatron")):
        if not os.path.isfile(path):
            raise BadInput(f"{what} {path}: no such file")
    if a.row_group_rows < 1:
        raise BadInput(f"--row-group-rows {a.row_group_rows}: must be >= 1")
    result = bench(a)
    failed = [r for r in result["runs"] if r["rc"] != 0]
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    m = result["machine"]
    print(f"input: {a.input} ({result['input_mb']:.2f} MB); {a.repeats} alternating repeats; "
          f"{m['cores']} cores ({m['cpu']}), Python {m['python']}\n")
    print(table(result))
    for r in failed:
        print(f"error: {r['tool']} run (workers {r['workers']}) exited {r['rc']}: {' / '.join(r['stderr_tail'])}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
