"""tools/benchmark.py runs on a tiny config and writes its JSON keys (not a timed test)."""
import json

import pytest

from polytron.tools import benchmark as bench

TINY = """
model: {vocab_size: 128, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2,
        ffn_hidden_size: 64, max_seq_len: 16}
data: {builtin_corpus: true, seq_len: 16}
training: {micro_batch_size: 2, iterations: 10, device: cpu}
schedule: {warmup_iters: 1}
logging: {wandb: false}
precision: {dtype: fp32}
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def test_compare_hf_writes_json(tiny_config, tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main(["--config", tiny_config, "--compare-hf", "--json", str(out),
                     "--steps", "1", "--warmup", "0", "--repeats", "2"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("tokens_per_s", "mfu", "peak_memory_bytes", "hf_tokens_per_s", "ratio",
                "peak_tflops", "peak_source"):
        assert key in res, key
    assert res["tokens_per_s"] > 0 and res["hf_tokens_per_s"] > 0 and res["mfu"] > 0
    assert res["ratio"] == pytest.approx(res["tokens_per_s"] / res["hf_tokens_per_s"])
    assert len(res["runs_tokens_per_s"]) == len(res["hf_runs_tokens_per_s"]) == 2


def test_override_and_configured_peak(tiny_config, tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main(["--config", tiny_config, "--json", str(out), "--steps", "1",
                     "--warmup", "0", "--repeats", "1", "logging.peak_tflops=0.5",
                     "training.micro_batch_size=1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["peak_tflops"] == 0.5 and res["peak_source"] == "logging.peak_tflops"
    assert res["micro_batch_size"] == 1 and "ratio" not in res


def test_measure_returns_metrics(tiny_config):
    cfg = bench.load_config(tiny_config)
    res = bench.measure(cfg, steps=1, warmup=0)
    assert {"tokens_per_s", "mfu", "peak_memory_bytes"} <= set(res)


@pytest.mark.parametrize("args, needle", [
    (["--config", "/nonexistent/x.yaml"], "not found"),
    (["model.bogus_key=1"], "bogus_key"),
])
def test_bad_config_exits_2(tiny_config, capsys, args, needle):
    if args[0] != "--config":
        args = ["--config", tiny_config] + args
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err


def test_layouts_each_run_under_torchrun(tiny_config):
    """--layouts: each layout is its own torchrun job (free port via --standalone, timeout);
    an unknown layout reports an error row instead of stopping the others."""
    from polytron.tools.bench_layout import measure_layouts
    res = measure_layouts(tiny_config, ["single", "fsdp2", "nosuch3"], steps=1, warmup=0,
                          timeout_s=300)
    by = {r["layout"]: r for r in res}
    assert by["single"]["world_size"] == 1 and by["single"]["tokens_per_s"] > 0
    assert by["fsdp2"]["world_size"] == 2 and by["fsdp2"]["tokens_per_s"] > 0
    assert "error" in by["nosuch3"] and "nosuch3" in by["nosuch3"]["error"]


TINY_CP = ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=64",
           "model.vocab_size=128", "model.num_layers=2", "model.yoco.sliding_window=8"]


@pytest.mark.parametrize("args, needle", [
    (["--models", "dense,nosuch"], "--models: unknown model 'nosuch'"),
    (["--cps", "1,x"], "--cps: expected comma-separated integers"),
    (["--cps", "1,4", "--lengths", "36"], "--lengths: 36 is not divisible by 2 x max(--cps) = 8"),
])
def test_bench_context_bad_arguments(args, needle, capsys):
    from polytron.tools import bench_context
    assert bench_context.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_bench_context_tiny_cp1(tmp_path):
    """cp=1 in process on a tiny dense and YOCO retention model: saved-activation bytes grow with the
    sequence, no K/V gather without cp, and the budget picks the longest length that fits."""
    from polytron.tools import bench_context
    out = tmp_path / "ctx.json"
    assert bench_context.main(["--models", "dense,yoco_retention", "--cps", "1", "--lengths", "16,64",
                               "--repeats", "1", "--budget-mib", "0.3", "--json", str(out), *TINY_CP]) == 0
    res = json.loads(out.read_text())
    by = {(r["model"], r["seq_len"]): r for r in res["rows"]}
    for model in ("dense", "yoco_retention"):
        short, long = by[model, 16], by[model, 64]
        assert 2 * short["act_bytes"] < long["act_bytes"] < 8 * short["act_bytes"]     # ~linear in T
        assert short["kv_gathers"] == long["kv_gathers"] == 0 and long["step_s"] > 0 and long["vs_cp1"] == 1
        fits = [T for T in (16, 64) if by[model, T]["act_bytes"] <= 0.3 * 2 ** 20]
        assert res["longest_within_budget"][model]["1"] == (max(fits) if fits else None)
