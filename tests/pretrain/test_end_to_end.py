"""A short real pre-training run: 2 gloo ranks under torchrun on the built-in corpus."""
import json
import os
import subprocess
import sys

import pytest

from polytron.launch.env import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", os.path.join(ROOT, "launch", "pretrain.py"),
           "--config", os.path.join(ROOT, "launch", "configs", "tiny.yaml"),
           f"training.output_dir={out}", "training.iterations=20", "training.log_interval=5",
           "training.eval_interval=10", "training.eval_iters=2", "checkpoint.interval=10",
           "data.seq_len=128", "schedule.warmup_iters=5"]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res


def test_loss_falls_and_metrics_are_logged(short_run):
    out, res = short_run
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["iteration"] for r in records] == list(range(5, 25, 5))
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_tokens",
                "step_time_s", "peak_memory_bytes"):
        assert key in records[0]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, [r["loss"] for r in records]
    assert records[-1]["consumed_tokens"] == 20 * 16 * 128
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["iteration"] for r in evals] == [10, 20]
    assert "iter     20/20" in res.stdout and "resolved config:" in res.stdout


def test_run_writes_checkpoint_config_and_wandb_offline(short_run):
    out, _ = short_run
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000020"
    assert (ckpts / "iter_0000020" / ".metadata").is_file()
    assert (ckpts / "iter_0000010" / ".metadata").is_file()      # checkpoint.interval=10
    assert (out / "config.yaml").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_plot_tool_renders_png(short_run, tmp_path):
    out, _ = short_run
    png = tmp_path / "m.png"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"), str(out),
                          "--output", str(png)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
