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
