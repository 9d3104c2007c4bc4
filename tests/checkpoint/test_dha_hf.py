"""DHA export: to-hf writes a trust_remote_code model that transformers loads offline, with our
logits and cached generation; dha-tiny.yaml trains with the dense tiny command and exports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.generate import generate
from polytron.model.transformer import build_model, param_shapes
from polytron.pretrain import checkpoint as ckpt
from polytron.tools.convert_checkpoint import from_hf, to_hf
from tests.checkpoint import runs
from tests.checkpoint.helpers import assert_close, hf_logits, our_logits, train_spm

DHA = {"key_heads": [1, 4, 2], "value_heads": [2, 3, 4],
       "key_map": [[], [2, 0, 3, 1], []], "value_map": [[], [0, 2, 1, 1], []]}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    return train_spm(str(tmp_path_factory.mktemp("spm")))


def dha_checkpoint(tmp, spm_model: str, tied: bool):
    """A DHA model (norms randomized) saved as a complete checkpoint of a run."""
    from polytron.pretrain.config import RunConfig
    mcfg = from_dict(ModelConfig, {"vocab_size": 384, "hidden_size": 64, "num_layers": 3, "num_heads": 4,
                                   "num_kv_heads": 2, "ffn_hidden_size": 96, "max_seq_len": 64, "init_std": 0.1,
                                   "tie_embeddings": tied, "arch": "dha", "attention": "dha", "dha": DHA},
                     prefix="model.")
    mcfg.validate()
    model = build_model(mcfg, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 384, (2, 33), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    run = RunConfig(model=mcfg)
    run.data.tokenizer = spm_model
    state = {"iteration": 1, "consumed_samples": 2, "consumed_tokens": 64, "config": run.to_dict()}
    ckpt.save(str(tmp / "run" / "checkpoints"), 1, [model], opt, state, keep_last=1).finalize()
    return str(tmp / "run"), model.eval()


def load_remote(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, local_files_only=True).float().eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_with_remote_code_matches_and_generates(tmp_path, spm_model, tied):
    run_dir, model = dha_checkpoint(tmp_path, spm_model, tied)
    to_hf(run_dir, str(tmp_path / "hf"))
    files = os.listdir(tmp_path / "hf")
    assert "modeling_dha.py" in files and "tokenizer.json" in files
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_cfg["model_type"] == "dha_llama" and hf_cfg["dha_key_heads"] == [1, 4, 2]
    hf = load_remote(str(tmp_path / "hf"))
    assert type(hf).__name__ == "DHALlamaForCausalLM"
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(5))
    assert_close(our_logits(model, tokens), hf_logits(hf, tokens))
    prompt = tokens[:, :6]
    cached = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    full = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(cached, generate(model, prompt, 12))
    # and back: from-hf reads the export into identical tensors
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back = ckpt.load_tensors(str(tmp_path / "back" / "checkpoint"))
    orig = ckpt.load_tensors(ckpt.resolve_checkpoint(run_dir))
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)


def test_padded_batch_generation_matches_unpadded(tmp_path, spm_model):
    """Left padding in the exported model: each row generates what it generates alone."""
    run_dir, _ = dha_checkpoint(tmp_path, spm_model, False)
    to_hf(run_dir, str(tmp_path / "hf"))
    hf = load_remote(str(tmp_path / "hf"))
    long = torch.randint(3, 384, (1, 9), generator=torch.Generator().manual_seed(1))
    short = long[:, 4:]
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = hf.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, -6:], alone[0, -6:])


def test_dha_tiny_config_trains_and_exports(tmp_path):
    """launch/configs/dha-tiny.yaml with the dense tiny command (shrunk) under torchrun with
    parallel.tensor=2: loss falls, the start log shows the KV cache, and the checkpoint goes
    through to-hf."""
    out = str(tmp_path / "run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={runs.free_port()}"]
    cmd = [*torchrun, runs.LAUNCH, "--config", os.path.join(runs.ROOT, "launch", "configs", "dha-tiny.yaml"),
           "parallel.tensor=2",
           "model.hidden_size=64", "model.ffn_hidden_size=128", "model.max_seq_len=64", "data.seq_len=64",
           "training.micro_batch_size=4", "training.global_batch_size=8", "training.iterations=12",
           "training.log_interval=1", "training.eval_interval=0", "logging.wandb=false",
           "logging.progress_bar=false", "training.device=cpu", "precision.dtype=fp32",
           "schedule.warmup_iters=2", "optimizer.lr=0.01", f"training.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=runs.env(), cwd=runs.ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    hd = 64 // 8
    assert f"kv cache: {(4 + 2 + 2 + 4 + 2 + 1 + 1 + 2) * hd * 4} bytes/token" in r.stdout
    losses = [rec["loss"] for rec in runs.records(out)]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    to_hf(out, str(tmp_path / "hf"))
    hf = load_remote(str(tmp_path / "hf"))
    path = ckpt.resolve_checkpoint(out)
    mcfg = from_dict(ModelConfig, ckpt.read_trainer_state(path)["config"]["model"], prefix="model.")
    ours = build_model(mcfg)
    ckpt.load(path, [ours], expected_shapes=param_shapes(mcfg))
    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
    assert_close(our_logits(ours.eval(), tokens), hf_logits(hf, tokens))
