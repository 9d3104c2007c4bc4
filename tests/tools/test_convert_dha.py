"""tools/convert_mha_to_dha.py and model/dha/fusion.py: exact one-head groups, adaptive fusion
against mean pooling, budgets and KV-cache bytes, a Hugging Face Llama source, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from polytron.model.accounting import kv_cache_bytes_per_token
from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.dha import fusion
from polytron.model.transformer import build_model, param_shapes
from polytron.pretrain import checkpoint as ckpt
from polytron.tools import convert_mha_to_dha as tool
from polytron.tools.convert_checkpoint import hf_config_to_model
from tests.checkpoint import runs
from tests.checkpoint.helpers import hf_llama

#: a 2-layer MHA model (4 heads) on the built-in corpus, short sequences
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4",
         "model.ffn_hidden_size=128", "model.max_seq_len=64", "data.seq_len=64", "training.micro_batch_size=8",
         "training.global_batch_size=8", "training.eval_iters=2", "logging.wandb=false",
         "logging.progress_bar=false", "training.device=cpu", "precision.dtype=fp32", "schedule.warmup_iters=4",
         "optimizer.lr=0.01", "training.eval_interval=0", "training.log_interval=10"]
FAST = ["--calib-samples", "16", "--fusion-steps", "24"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A run directory: the small MHA model trained 30 steps by launch/pretrain.py."""
    out = str(tmp_path_factory.mktemp("src") / "run")
    cmd = [sys.executable, runs.LAUNCH, "--config", os.path.join(runs.ROOT, "launch", "configs", "tiny.yaml"),
           *SMALL, "training.iterations=30", f"training.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=runs.env(), cwd=runs.ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def load(path: str):
    """(model, tensors) of a checkpoint directory."""
    mcfg = from_dict(ModelConfig, ckpt.read_trainer_state(path)["config"]["model"], prefix="model.")
    model = build_model(mcfg)
    ckpt.load(path, [model], expected_shapes=param_shapes(mcfg))
    return model.eval(), ckpt.load_tensors(path)


def test_one_head_groups_reproduce_the_source_bitwise(trained, tmp_path):
    dst = str(tmp_path / "dha")
    assert tool.main([trained, dst, "--budget", "1", *FAST]) == 0
    report = json.load(open(os.path.join(dst, "dha_report.json")))
    assert report["kv_cache_bytes_per_token"]["ratio"] == 1.0
    assert report["loss_fused"] == report["loss_source"]
    source, _ = load(ckpt.resolve_checkpoint(trained))
    dha, _ = load(os.path.join(dst, "checkpoint"))
    assert dha.cfg.arch == "dha" and dha.cfg.dha.key_heads == [4, 4]
    tokens = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(dha(tokens), source(tokens))


def test_half_budget_writes_a_run_that_continues(trained, tmp_path):
    """--budget 0.5: half the KV bytes per token, the report's losses, and the written config
    continues pre-training from the converted weights."""
    dst = str(tmp_path / "dha")
    assert tool.main([trained, dst, "--budget", "0.5", *FAST]) == 0
    report = json.load(open(os.path.join(dst, "dha_report.json")))
    kv = report["kv_cache_bytes_per_token"]
    assert kv["ratio"] == 0.5 and kv["dha"] == kv["source"] // 2
    cfg = load(os.path.join(dst, "checkpoint"))[0].cfg
    assert sum(cfg.dha.key_heads) + sum(cfg.dha.value_heads) == 8
    assert all(report[k] > 0 for k in ("loss_source", "loss_mean_pooling", "loss_fused"))
    assert len(report["fusion"]["lm_loss"]) == 24 and abs(report["fusion"]["distance"][-1]) < 1e-9
    cmd = [sys.executable, runs.LAUNCH, "--config", os.path.join(dst, "config.yaml"), "training.iterations=2",
           "training.log_interval=1", "checkpoint.interval=0", "checkpoint.save_final=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=runs.env(), cwd=runs.ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "initialized model weights from" in r.stdout and f"kv cache: {kv['dha']} bytes/token" in r.stdout


def test_adaptive_fusion_beats_mean_pooling(trained):
    """Value heads of unequal scale (a function-preserving rescaling of the source: V head 0
    x4, the matching W_o columns / 4): mean pooling is dominated by the large head, the fitted
    fusion weights compensate: on validation data the fused model closes a quarter or more of mean
    pooling's gap to the source model."""
    path = ckpt.resolve_checkpoint(trained)
    model, tensors = load(path)
    hd = model.cfg.head_dim
    for layer in range(model.cfg.num_layers):
        tensors[f"layers.{layer}.attention.wv.weight"][:hd] *= 4.0
        tensors[f"layers.{layer}.attention.wo.weight"][:, :hd] /= 4.0
    model.load_state_dict(tensors)
    from polytron.pretrain.config import config_from_dict
    run = config_from_dict(ckpt.read_trainer_state(path)["config"])
    calib, valid = tool.batches(run, 16)
    source_loss = fusion.eval_loss(model, valid)
    grams = fusion.head_grams(model, [b["tokens"] for b in calib], hd)
    groups = {(layer, kind): fusion.contiguous_groups(4, 2) for layer in range(2) for kind in fusion.KINDS}
    lists = fusion.dha_lists(groups, 2, 4, 4)
    assert lists["key_heads"] == [2, 2] and grams[(0, "value")].shape == (4, 4)
    fusing = fusion.install(model, groups, hd)
    mean = fusion.merged_tensors(tensors, fusing)
    fusion.fuse(model, [fp for _, fp in fusing.values()], calib, 40, lr=0.05)
    fused = fusion.merged_tensors(tensors, fusing)
    import dataclasses

    from polytron.model.dha.config import DHAConfig
    cfg = dataclasses.replace(model.cfg, arch="dha", attention="dha", dha=DHAConfig(**lists))
    losses = {}
    for name, t in (("mean", mean), ("fused", fused)):
        m = build_model(cfg)
        m.load_state_dict(t)
        losses[name] = fusion.eval_loss(m, valid)
    losses["source"] = source_loss
    assert losses["mean"] > source_loss + 1e-3, losses                  # merging costs something
    assert losses["fused"] - source_loss < 0.75 * (losses["mean"] - source_loss), losses


def test_grouping_follows_similarity_and_budget_pools():
    """Two identical heads merge first; a fraction budget is shared by layers and kinds; a
    per-layer budget keeps each layer's count."""
    eye = torch.eye(4, dtype=torch.float64)
    same01 = eye.clone()
    same01[0, 1] = same01[1, 0] = 1.0                   # heads 0 and 1 identical
    grams = {(0, "key"): same01, (0, "value"): eye, (1, "key"): eye, (1, "value"): eye}
    got = fusion.choose_groups(grams, fusion.fraction_pool(15 / 16, 2, 4))    # one merge
    assert got[(0, "key")] == [[0, 1], [2], [3]] and got[(0, "value")] == [[0], [1], [2], [3]]
    assert fusion.fusion_residual(same01, [0, 1]) == pytest.approx(0.0, abs=1e-9)
    per_layer = fusion.choose_groups(grams, fusion.layer_pools([2, 1.5], 2, 4))
    assert len(per_layer[(0, "key")]) + len(per_layer[(0, "value")]) == 4
    assert len(per_layer[(1, "key")]) + len(per_layer[(1, "value")]) == 3
    with pytest.raises(ValueError, match="every layer needs a key and a value head"):
        fusion.fraction_pool(0.125, 2, 4)


def test_from_hugging_face_llama_directory_quarter_budget(tmp_path):
    """A transformers-built Llama (MHA, 4 heads) at 25%: a quarter of the KV-cache bytes."""
    src = str(tmp_path / "hf")
    hf_llama(src, vocab=4096, kv_heads=4)
    dst = str(tmp_path / "dha")
    rc = tool.main([src, dst, "--budget", "0.25", *FAST, "data.builtin_corpus=true", "data.tokenizer=",
                    "data.seq_len=64", "training.micro_batch_size=8", "training.global_batch_size=8",
                    "training.eval_iters=2"])
    assert rc == 0
    report = json.load(open(os.path.join(dst, "dha_report.json")))
    model, _ = load(os.path.join(dst, "checkpoint"))
    src_cfg = hf_config_to_model(json.load(open(os.path.join(src, "config.json"))), "config.json")
    assert kv_cache_bytes_per_token(model.cfg) * 4 == kv_cache_bytes_per_token(src_cfg)
    assert report["kv_cache_bytes_per_token"]["ratio"] == 0.25
    assert model.cfg.dha.key_heads == [1, 1] and model.cfg.dha.value_heads == [1, 1]
    assert report["loss_fused"] < report["loss_source"] + 1.0


@pytest.mark.parametrize("args,needle", [
    (["--budget", "0.125"], "every layer needs a key and a value head"),
    (["--budget", "0.3"], "whole number"),
    (["--layer-budget", "2"], "needs 2 entries"),
    (["--budget", "0.5", "model.attention=dha"], "model.attention"),
])
def test_bad_input_is_one_error_line(trained, tmp_path, capsys, args, needle):
    capsys.readouterr()
    assert tool.main([trained, str(tmp_path / "out"), *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "out")
