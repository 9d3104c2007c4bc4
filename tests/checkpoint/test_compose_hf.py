"""Compositions export: a model composed from slot kinds (YOCO with MH-MoE / MoE MLPs of BitLinear
projections, DHA with BitLinear MoE experts; tests/distributed/layouts_compose.py; and the moe
architecture's MH-MoE with BitLinear projections) goes through
to-hf, reloads in transformers (offline, trust_remote_code=True) with our fp32 logits within
1e-4, and from-hf reads it back exactly. The modeling file is assembled from per-kind pieces and
imports only torch and transformers."""
from __future__ import annotations

import ast
import json
import os

import pytest
import torch
import transformers  # in the dev extra: a missing install must fail, not skip

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.hf import ConvertError
from polytron.model.hf_remote import assemble, missing_kind
from polytron.model.spec import get_spec
from polytron.model.transformer import build_model
from polytron.pretrain import checkpoint as ckpt
from polytron.tools.convert_checkpoint import from_hf, to_hf
from tests.checkpoint.helpers import train_spm
from tests.distributed.layouts_compose import DHA_MOE_BITNET, YOCO_MHMOE_BITNET

BASE = dict(vocab_size=384, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
            max_seq_len=64, rope_theta=500.0)
YOCO_RETENTION_MOE = {"arch": "yoco", "yoco": {"self_decoder": "retention", "retention_chunk": 8},
                      "mlp": "moe", "linear": "bitlinear",
                      "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "shared_experts": 1,
                              "every": 2, "first_dense": 1, "score": "sigmoid", "bias_update_rate": 1e-3}}
MOE_MHMOE_BITNET = {"arch": "moe", "mlp": "mh_moe", "linear": "bitlinear",
                    "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "heads": 2}}
CASES = {"yoco_swa_mhmoe_bitnet": YOCO_MHMOE_BITNET, "yoco_retention_moe_bitnet": YOCO_RETENTION_MOE,
         "dha_moe_bitnet": DHA_MOE_BITNET, "moe_mhmoe_bitnet": MOE_MHMOE_BITNET}
CLASSES = {"yoco": ("PolytronYOCOForCausalLM", "modeling_polytron_yoco.py"),
           "dha": ("DHALlamaForCausalLM", "modeling_dha.py"),
           "moe": ("PolytronMoEForCausalLM", "modeling_polytron_moe.py")}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    return train_spm(str(tmp_path_factory.mktemp("spm")))


def composed(over: dict) -> ModelConfig:
    cfg = from_dict(ModelConfig, {**BASE, **over}, prefix="model.")
    cfg.validate()
    return cfg


def checkpoint(tmp, spm_model: str, cfg: ModelConfig):
    """One AdamW step (norms and balancing bias off their init), saved as a run's checkpoint."""
    from polytron.pretrain.config import RunConfig
    model = build_model(cfg, seed=7)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 384, (2, 33), generator=gen)
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or name.endswith("expert_bias"):
                t.add_(torch.randn(t.shape, generator=gen) * 0.05)
    run = RunConfig(model=cfg)
    run.data.tokenizer = spm_model
    state = {"iteration": 1, "consumed_samples": 2, "consumed_tokens": 64, "config": run.to_dict()}
    ckpt.save(str(tmp / "run" / "checkpoints"), 1, [model], opt, state, keep_last=1).finalize()
    return str(tmp / "run"), model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_composition_exports_reloads_with_our_logits_and_round_trips(tmp_path, spm_model, case):
    cfg = composed(CASES[case])
    run_dir, model = checkpoint(tmp_path, spm_model, cfg)
    hf_dir = str(tmp_path / "hf")
    to_hf(run_dir, hf_dir)
    cls, file = CLASSES[cfg.arch]
    assert file in os.listdir(hf_dir)
    hf_cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert (hf_cfg["linear_kind"], hf_cfg["mlp_kind"]) == (cfg.linear, cfg.mlp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                           local_files_only=True).float().eval()
    assert type(hf).__name__ == cls
    assert {"BitLinear", "MoE"} <= {type(m).__name__ for m in hf.modules()}
    tokens = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(input_ids=tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    from_hf(hf_dir, str(tmp_path / "back"))
    back = ckpt.load_tensors(str(tmp_path / "back" / "checkpoint"))
    orig = ckpt.load_tensors(ckpt.resolve_checkpoint(run_dir))
    assert back.keys() == orig.keys()
    for k in orig:
        want = torch.zeros_like(orig[k]) if k.endswith("expert_load") else orig[k]
        assert torch.equal(back[k], want), k
    restored = ckpt.read_trainer_state(str(tmp_path / "back" / "checkpoint"))["config"]["model"]
    saved = ckpt.read_trainer_state(ckpt.resolve_checkpoint(run_dir))["config"]["model"]
    if cfg.arch == "dha":        # the export writes the resolved head maps (default [] = contiguous)
        from polytron.model.dha.config import layer_heads
        back_cfg = composed(restored)
        assert [layer_heads(back_cfg, i) for i in range(4)] == [layer_heads(cfg, i) for i in range(4)]
        restored, saved = ({k: v for k, v in d.items() if k != "dha"} for d in (restored, saved))
    assert restored == saved


def test_bitlinear_matters_in_the_export(tmp_path):
    """The quantized projections are BitLinear on the transformers side too: the same weights
    run as plain linears give other logits."""
    cfg = composed(YOCO_MHMOE_BITNET)
    adapter = get_spec(cfg.arch).hf
    text = adapter.remote_code(cfg)["modeling_polytron_yoco.py"]
    assert "def bitlinear(" in text and "class MoE(" in text and "def chunk_retention(" not in text
    plain = composed({**YOCO_MHMOE_BITNET, "linear": "linear"})
    assert "def bitlinear(" not in get_spec("yoco").hf.remote_code(plain)["modeling_polytron_yoco.py"]


def test_assembled_file_imports_only_torch_and_transformers():
    """Every assembled family/kind combination parses, and its imports are torch, transformers
    and the standard-library names of the header."""
    get_spec("llama")
    from polytron.model.dha.hf import DHAAdapter
    from polytron.model.yoco.hf import YOCOAdapter
    for adapter, attention in ((DHAAdapter(), ["dha"]), (YOCOAdapter(), ["swa", "retention"])):
        text = assemble(adapter.family, {"linear": ["linear", "bitlinear"], "attention": attention,
                                         "mlp": ["swiglu", "moe", "mh_moe", "relu2_subnorm"],
                                         "stack": [adapter.family.stack]})
        roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                 for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names}
        assert roots == {"__future__", "math", "typing", "torch", "transformers"}, roots
        assert text.count("class RMSNorm(") == 1


def test_kind_without_a_piece_is_named():
    msg = missing_kind({"mlp": ["swiglu", "test_relu2"]})
    assert msg.startswith("mlp=test_relu2 has no Hugging Face remote-code piece"), msg


# ---------------------------------------------------------------- every configuration the suite trains

#: Compositions on the llama / bitnet skeletons with no native transformers class (the
#: polytron_llama / polytron_bitnet remote-code families), beside the equivalence suite's.
FALLBACKS = {
    "llama_moe": {"mlp": "moe", "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32,
                                        "shared_experts": 1, "every": 2}},
    "llama_mhmoe_bitlinear": {"mlp": "mh_moe", "linear": "bitlinear",
                              "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "heads": 2}},
    "llama_dha": {"attention": "dha", "dha": {"key_heads": [2, 1, 4, 2], "value_heads": [1, 2, 2, 4]}},
    "bitnet_moe_subnorm": {"arch": "bitnet", "attention": "gqa_subnorm", "mlp": "moe",
                           "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32}},
}


#: Trained layouts whose model has no export by design, and the reason the refusal names:
#: BitNet's FAQ block has no pre-norms, which every exported block applies (docs/bitnet.md).
NOT_EXPORTED = {"bitnet_faq_tp2": "block_prenorm=false"}


def trained_configs() -> dict[str, dict]:
    """Every distinct ``model`` override of the equivalence layouts (named by its first layout),
    then :data:`FALLBACKS`."""
    from tests.distributed.equivalence import LAYOUTS
    seen: dict[str, dict] = {}
    for name, layout in LAYOUTS.items():
        if layout.model not in seen.values():
            seen[name] = layout.model
    return {**seen, **FALLBACKS}


def from_test_tree(cfg: ModelConfig) -> str:
    """Why ``cfg`` has no export ('' when it has one): its architecture or a layer kind is
    registered from the test tree and has no Hugging Face adapter or piece."""
    from polytron.model.layers import ATTENTIONS, MLPS
    spec = get_spec(cfg.arch)
    test_tree = [f"arch={cfg.arch}"] if spec.units.__module__.startswith("tests.") and spec.hf is None else []
    for slot, table in (("attention", ATTENTIONS), ("mlp", MLPS)):
        kind = getattr(cfg, slot)
        if table[kind].__module__.startswith("tests."):
            test_tree.append(f"{slot}={kind}")
    return ", ".join(test_tree) and f"test-only {', '.join(test_tree)} (tests/): no Hugging Face export"


def perturbed(cfg: ModelConfig):
    """A random-init model whose norms and balancing biases are off their init values."""
    model = build_model(cfg, seed=11)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or name.endswith(("expert_bias", ".bias")):
                t.add_(torch.randn(t.shape, generator=gen) * 0.05)
    return model.eval()


def bitnet_native(hf_cfg: dict) -> bool:
    return hf_cfg.get("quantization_config") is not None


@pytest.mark.parametrize("name", list(trained_configs()))
def test_every_trained_configuration_exports_and_reloads(tmp_path, name):
    """to-hf succeeds, transformers reloads offline (trust_remote_code=True) with our fp32 logits
    within 1e-4, and from-hf gives back every tensor exactly. transformers' own
    BitNetForCausalLM (AutoBitLinear) sums in another order than ours: its logits agree up to
    8-bit rounding flips (tests/checkpoint/test_bitnet_hf.py); the remote-code pieces compute in
    our order and meet 1e-4."""
    from polytron.pretrain.config import RunConfig
    from tests.distributed.equivalence import model_config
    cfg = model_config(**trained_configs()[name])
    model = perturbed(cfg)
    orig = {k: v.detach() for k, v in model.state_dict().items()}
    state = {"iteration": 1, "consumed_samples": 0, "consumed_tokens": 0, "config": RunConfig(model=cfg).to_dict()}
    ckpt.save_tensors(str(tmp_path / "checkpoint"), orig, state)
    if from_test_tree(cfg) or name in NOT_EXPORTED:   # no export: refused in one line, nothing written
        with pytest.raises(ConvertError) as refused:
            to_hf(str(tmp_path / "checkpoint"), str(tmp_path / "hf"))
        assert "\n" not in str(refused.value) and not os.path.exists(tmp_path / "hf")
        assert NOT_EXPORTED.get(name, "") in str(refused.value)
        return
    to_hf(str(tmp_path / "checkpoint"), str(tmp_path / "hf"))
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True,
                                                           local_files_only=True, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(input_ids=tokens).logits.float()       # (B, T, V)
    if bitnet_native(hf_cfg):
        from tests.checkpoint.test_bitnet_hf import assert_close_up_to_flips
        assert_close_up_to_flips(theirs, ours)
    else:
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back = ckpt.load_tensors(str(tmp_path / "back" / "checkpoint"))
    assert back.keys() == orig.keys()
    for k in orig:
        want = torch.zeros_like(orig[k]) if k.endswith("expert_load") else orig[k]
        assert torch.equal(back[k], want), k
