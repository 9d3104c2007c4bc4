"""YOCO's Hugging Face export: the trust_remote_code model matches our logits (fp32, 1e-4) and
gradients, converts back exactly, and trained runs of the launch configs export through to-hf."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers  # in the dev extra: a missing install must fail, not skip

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.transformer import build_model, cross_entropy, param_shapes
from polytron.model.yoco.hf import MODELING_FILE, YOCOAdapter
from polytron.pretrain import checkpoint as ckpt
from polytron.tools.convert_checkpoint import from_hf, write_safetensors
from tests.checkpoint import runs

ROOT = runs.ROOT
ADAPTER = YOCOAdapter()


def yoco_config(**over) -> ModelConfig:
    base = dict(arch="yoco", vocab_size=211, hidden_size=64, num_layers=5, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, max_seq_len=256, rope_theta=500.0, init_std=0.05)
    cfg = from_dict(ModelConfig, {**base, **over}, prefix="model.")
    cfg.validate()
    return cfg


def export(model, dst: str) -> None:
    """What ``to-hf`` writes for the weights: config.json, safetensors, the modeling file."""
    os.makedirs(dst)
    tensors = ADAPTER.to_hf_tensors(model.cfg, {k: v.contiguous() for k, v in model.state_dict().items()})
    write_safetensors(tensors, dst, 1 << 30)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(ADAPTER.to_hf_config(model.cfg, None, None, "float32"), f)
    for name, text in ADAPTER.remote_code(model.cfg).items():
        with open(os.path.join(dst, name), "w") as f:
            f.write(text)


def load_hf(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                             local_files_only=True).float().eval()


@pytest.mark.parametrize("over", [
    dict(yoco=dict(self_decoder="swa", sliding_window=7)),
    dict(tie_embeddings=True, num_kv_heads=1, yoco=dict(self_decoder="swa", sliding_window=100, self_kv_heads=4),
         rope_scaling=dict(type="llama3", factor=4.0, original_max_position_embeddings=32)),
    dict(tie_embeddings=True, num_kv_heads=4, yoco=dict(self_decoder="retention", retention_chunk=8)),
    dict(num_kv_heads=1, attention_bias=True, num_layers=3,
         yoco=dict(self_decoder="retention", retention_chunk=64, self_layers=2)),
    dict(yoco=dict(self_decoder="swa", sliding_window=7, rope_pairing="interleaved", rope_frequencies="released")),
    dict(attention_bias=True, yoco=dict(self_decoder="retention", retention_chunk=8, rope_pairing="interleaved",
                                        rope_frequencies="released")),
    dict(yoco=dict(self_decoder="swa", sliding_window=7, rope_frequencies="released")),
], ids=["swa", "swa-tied-mqa-mha_window-llama3", "retention-tied-mha", "retention-mqa-bias-2self",
        "swa-released_rope", "retention-bias-released_rope", "swa-released_freqs"])
def test_logits_match_hf(tmp_path, over):
    ours = build_model(yoco_config(**over), seed=3).eval()
    export(ours, str(tmp_path / "hf"))
    hf = load_hf(str(tmp_path / "hf"))
    assert type(hf).__name__ == "PolytronYOCOForCausalLM"
    if ours.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 211, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["swa", "retention"])
def test_long_sequence_logits_and_gradients_match_hf(tmp_path, kind):
    """T = 200: our blocked window kernel (T > its 128-row block) and chunk recurrence (13
    chunks) against the export's quadratic masked forms, forward and backward."""
    ours = build_model(yoco_config(num_layers=4, yoco=dict(self_decoder=kind, sliding_window=40,
                                                           retention_chunk=16)), seed=5)
    export(ours, str(tmp_path / "hf"))
    hf = load_hf(str(tmp_path / "hf")).train()
    ids = torch.randint(0, 211, (2, 201), generator=torch.Generator().manual_seed(1))
    got, ref = ours(ids[:, :-1]), hf(input_ids=ids[:, :-1]).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    cross_entropy(got, ids[:, 1:]).backward()
    cross_entropy(ref, ids[:, 1:]).backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[ADAPTER.to_hf_name(ours.cfg, name)].grad,
                                   atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_from_hf_round_trip(tmp_path):
    """Export -> from-hf: the same config and bit-identical tensors."""
    ours = build_model(yoco_config(yoco=dict(self_decoder="retention", retention_chunk=8,
                                             rope_pairing="interleaved", rope_frequencies="released")), seed=4)
    export(ours, str(tmp_path / "hf"))
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back = ckpt.load_tensors(str(tmp_path / "back" / "checkpoint"))
    assert sorted(back) == sorted(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k
    state = ckpt.read_trainer_state(str(tmp_path / "back" / "checkpoint"))
    cfg = from_dict(ModelConfig, state["config"]["model"], prefix="model.")
    assert param_shapes(cfg) == param_shapes(ours.cfg)
    assert cfg.yoco.self_decoder == "retention" and cfg.yoco.num_self_layers(cfg) == 2
    assert (cfg.yoco.rope_pairing, cfg.yoco.rope_frequencies) == ("interleaved", "released")


def test_non_exportable_kind_is_named():
    assert "mlp=test_relu2" in ADAPTER.exportable(yoco_config(mlp="test_relu2", plugins=[
        "tests.distributed.hetero_spec"]))
    scaled = yoco_config(yoco=dict(rope_frequencies="released"), rope_scaling=dict(type="linear", factor=2.0))
    assert "rope_frequencies=released" in ADAPTER.exportable(scaled)
    assert ADAPTER.exportable(yoco_config(yoco=dict(rope_frequencies="released"))) == ""


# ---------------------------------------------------------------- trained runs -> to-hf

RUN = ["model.hidden_size=64", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2",
       "model.ffn_hidden_size=128", "model.max_seq_len=64", "data.seq_len=64", "model.yoco.sliding_window=24",
       "model.yoco.retention_chunk=16", "training.micro_batch_size=2", "training.global_batch_size=4",
       "training.log_interval=1", "training.eval_interval=0", "logging.wandb=false",
       "logging.progress_bar=false", "training.device=cpu", "precision.dtype=fp32",
       "schedule.warmup_iters=2", "training.iterations=12", "checkpoint.interval=12"]


@pytest.mark.parametrize("config,nproc,extra", [("yoco-tiny.yaml", 1, []),
                                                ("yoco-retention-tiny.yaml", 2, ["parallel.tensor=2"])],
                         ids=["swa", "retention-tp2"])
def test_launch_config_trains_and_exports(tmp_path, config, nproc, extra):
    """The launch config trains with launch/pretrain.py (loss falls), its checkpoint goes
    through ``to-hf`` and the exported directory matches the checkpoint's logits."""
    out = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, "launch", "configs", config), *RUN, *extra,
            f"training.output_dir={out}"]
    cmd = [sys.executable, runs.LAUNCH, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={runs.free_port()}", runs.LAUNCH, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=runs.env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    loss = [x[-1] for _, x in sorted(runs.losses(out).items())]
    assert len(loss) == 12 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.3, loss

    hf_dir = str(tmp_path / "hf")
    c = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf", out, hf_dir],
                       capture_output=True, text=True, timeout=300, env=runs.env(), cwd=ROOT)
    assert c.returncode == 0, c.stderr[-3000:]
    assert MODELING_FILE in os.listdir(hf_dir) and "tokenizer.json" in os.listdir(hf_dir)
    path = ckpt.resolve_checkpoint(out)
    mcfg = from_dict(ModelConfig, ckpt.read_trainer_state(path)["config"]["model"], prefix="model.")
    ours = build_model(mcfg)
    ckpt.load(path, [ours], expected_shapes=param_shapes(mcfg))
    tokens = torch.randint(0, mcfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), load_hf(hf_dir)(input_ids=tokens).logits,
                                   atol=1e-4, rtol=0)
