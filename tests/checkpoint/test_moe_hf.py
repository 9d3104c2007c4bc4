"""Hugging Face export of the MoE decoder: native classes (Mixtral, GLM-4-MoE) and the MH-MoE
remote code load offline and give our fp32 logits; from-hf of a native export restores the
checkpoint's tensors and model config exactly; unsupported fields are named."""
from __future__ import annotations

import json
import os

import pytest
import torch

from polytron.model.config import ModelConfig
from polytron.model.moe.config import MoEConfig
from polytron.pretrain import checkpoint as ckpt
from polytron.tools.convert_checkpoint import from_hf, hf_config_to_model, to_hf
from tests.checkpoint.helpers import assert_close, build_model, hf_logits, our_logits, train_spm

BASE = dict(arch="moe", vocab_size=384, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
            ffn_hidden_size=96, max_seq_len=64, rope_theta=500.0)
CASES = {
    # softmax, normalized top-2, every layer MoE, no shared experts -> MixtralForCausalLM
    "mixtral": dict(mlp="moe", moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=48,
                                             aux_loss_coeff=0.02, z_loss_coeff=1e-3)),
    # sigmoid + balancing bias + shared expert + dense first layer -> Glm4MoeForCausalLM
    "glm4_moe": dict(mlp="moe", tie_embeddings=True,
                     moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=48, shared_experts=1,
                                   score="sigmoid", bias_update_rate=1e-3, first_dense=1, route_scale=1.5,
                                   capacity_factor=1.25)),
    # MH-MoE with shared experts, MoE every other layer -> remote code
    "polytron_moe": dict(mlp="mh_moe", moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32,
                                                     heads=4, shared_experts=1, every=2)),
}
CLASSES = {"mixtral": "MixtralForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
           "polytron_moe": "PolytronMoEForCausalLM"}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    return train_spm(str(tmp_path_factory.mktemp("spm")))


def _checkpoint(tmp, spm_model: str, cfg: ModelConfig):
    """A model trained three AdamW steps (balancing bias set off zero), saved as a checkpoint."""
    from polytron.pretrain.config import RunConfig
    cfg.validate()
    model = build_model(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 384, (2, 17), generator=gen)
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)
    run = RunConfig(model=cfg)
    run.data.tokenizer = spm_model
    state = {"iteration": 3, "consumed_samples": 6, "consumed_tokens": 96, "config": run.to_dict()}
    ckpt.save(str(tmp / "run" / "checkpoints"), 3, [model], opt, state, keep_last=2).finalize()
    return str(tmp / "run"), model.eval()


@pytest.mark.parametrize("kind", list(CASES))
def test_export_loads_offline_with_our_logits_and_round_trips(tmp_path, spm_model, kind):
    from transformers import AutoModelForCausalLM
    cfg = ModelConfig(**BASE, **CASES[kind])
    run_dir, model = _checkpoint(tmp_path, spm_model, cfg)
    to_hf(run_dir, str(tmp_path / "hf"))
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_cfg["model_type"] == kind and hf_cfg["architectures"] == [CLASSES[kind]]
    remote = kind == "polytron_moe"
    assert os.path.isfile(tmp_path / "hf" / "modeling_polytron_moe.py") == remote
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                              trust_remote_code=remote).float().eval()
    assert type(hf).__name__ == CLASSES[kind]
    tokens = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(5))
    ours = our_logits(model, tokens)
    assert_close(ours, hf_logits(hf, tokens))
    with torch.no_grad():                       # the MoE layers matter: silence one router, logits move
        layer = next(m for m in model.modules() if hasattr(m, "router"))
        layer.router.weight.mul_(-1.0)
    assert not torch.allclose(our_logits(model, tokens), ours, atol=1e-4)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back = ckpt.load_tensors(str(tmp_path / "back" / "checkpoint"))
    orig = ckpt.load_tensors(ckpt.resolve_checkpoint(run_dir))
    assert back.keys() == orig.keys()
    for k in orig:
        assert torch.equal(back[k], orig[k]), k
    restored = ckpt.read_trainer_state(str(tmp_path / "back" / "checkpoint"))["config"]["model"]
    saved = ckpt.read_trainer_state(ckpt.resolve_checkpoint(run_dir))["config"]["model"]
    assert restored == saved


def test_generation_with_the_remote_code_cache(tmp_path, spm_model):
    """The remote-code model's KV cache gives the logits of a full forward."""
    from transformers import AutoModelForCausalLM
    cfg = ModelConfig(**BASE, **CASES["polytron_moe"])
    run_dir, _ = _checkpoint(tmp_path, spm_model, cfg)
    to_hf(run_dir, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                              trust_remote_code=True).float().eval()
    tokens = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = hf(input_ids=tokens, use_cache=False).logits
        first = hf(input_ids=tokens[:, :8], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        rest = hf(input_ids=tokens[:, 8:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,needle", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"use_qk_norm": True}, "use_qk_norm"),
    ({"n_group": 8, "topk_group": 4}, "topk_group"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_glm_fields_we_cannot_compute_are_named(change, needle):
    hf = {"model_type": "glm4_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "n_routed_experts": 8,
          "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_shared_experts": 1,
          "first_k_dense_replace": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                          "partial_rotary_factor": 1.0}}
    with pytest.raises(ValueError, match=needle):
        hf_config_to_model({**hf, **change}, "config.json")
    cfg = hf_config_to_model(hf, "config.json")            # the unchanged config is read
    assert (cfg.moe.num_experts, cfg.moe.score, cfg.moe.first_dense) == (8, "sigmoid", 1)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["moe-tiny.yaml", "mhmoe-tiny.yaml"])
def test_launch_config_trains_under_ep2_and_exports(tmp_path, config):
    """The launch config (shrunk like the dense run tests) trains under torchrun with
    parallel.expert=2 (loss falls), its checkpoint goes through to-hf and transformers
    reproduces our logits offline."""
    import subprocess

    from transformers import AutoModelForCausalLM

    from tests.checkpoint import runs
    from tests.checkpoint.test_hf import _load_ours
    out = str(tmp_path / "run")
    cmd = runs.command(out, 12, "parallel.expert=2", "optimizer.lr=1e-2", nproc=2)
    cmd[cmd.index("--config") + 1] = os.path.join(runs.ROOT, "launch", "configs", config)
    p = subprocess.run(cmd, env=runs.env(), cwd=runs.ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert " ep=2" in p.stdout, p.stdout[:3000]
    losses = [v[-1] for _, v in sorted(runs.losses(out).items())]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.9, losses

    hf_dir = str(tmp_path / "hf")
    to_hf(out, hf_dir)
    remote = os.path.isfile(os.path.join(hf_dir, "modeling_polytron_moe.py"))
    assert remote == (config == "mhmoe-tiny.yaml")
    model = _load_ours(os.path.join(out, "checkpoints", runs.complete(out)[-1]))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, trust_remote_code=remote).float().eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(11))
    assert_close(our_logits(model, tokens), hf_logits(hf, tokens))
