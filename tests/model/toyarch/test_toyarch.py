"""The toy architecture (this folder) plugs in without editing a shared file: its config
section loads and is saved, it trains under TP2, PP2 and FSDP2 equal to one process (one
batched spawn of the equivalence harness), converts to Hugging Face names and config and
back, and generates the same tokens from the converted weights."""
from __future__ import annotations

import json

import torch

from polytron.model.config import ModelConfig
from polytron.model.configlib import field_docs, from_dict, to_dict
from polytron.model.generate import generate
from polytron.model.spec import get_spec
from polytron.model.transformer import build_model
from tests.distributed import equivalence as eq
from tests.distributed.harness import Call, run_batch
from tests.distributed.layout import Layout
from tests.distributed.test_equivalence import assert_matches

TOY = {"arch": "toy", "plugins": ["tests.model.toyarch"], "toy": {"inner_mult": 3, "out_scale": 0.7}}
LAYOUTS = [
    Layout("toy_tp2", 2, parallel={"tensor": 2}, model=TOY, data="docs"),
    Layout("toy_pp2", 2, parallel={"pipeline": 2}, model=TOY),
    Layout("toy_fsdp2", 2, model=TOY, data="docs"),
]


def toy_config() -> ModelConfig:
    """Loaded as a run would load it: the plugin is imported for its section."""
    return eq.model_config(**TOY)


def test_section_loads_saves_and_documents():
    cfg = toy_config()
    assert cfg.mlp == "toy_glu" and cfg.toy.inner_mult == 3
    saved = to_dict(cfg)
    assert saved["toy"] == {"inner_mult": 3, "out_scale": 0.7}
    assert from_dict(ModelConfig, saved, prefix="model.") == cfg
    assert "toy.inner_mult" in [k for k, _, _ in field_docs(ModelConfig)]


def test_trains_under_tp2_pp2_fsdp2_like_one_process():
    calls = [Call(layout.name, eq.run_layout, (layout,), layout.budget_s) for layout in LAYOUTS]
    results = run_batch(calls, 2, base_s=120.0)
    reference = {v: eq.reference(json.loads(json.dumps(TOY)), v) for v in ("plain", "docs")}
    for layout in LAYOUTS:
        assert_matches(results.get(layout.name), reference[layout.data])


def test_converts_both_ways_and_generates():
    cfg = toy_config()
    adapter = get_spec("toy").hf
    model = build_model(cfg, seed=5).eval()
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    hf = adapter.to_hf_tensors(cfg, ours)
    assert "model.layers.0.mlp.inner_norm.weight" in hf
    back_cfg = adapter.from_hf_config(adapter.to_hf_config(cfg, 1, 2, "float32"), "config.json")
    assert to_dict(back_cfg) == to_dict(cfg)
    back = adapter.from_hf_tensors(back_cfg, hf, "toy export")
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    again = build_model(back_cfg, seed=9).eval()
    again.load_state_dict(back)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = generate(again, prompt, 5)
        assert torch.equal(out, generate(model, prompt, 5))
        assert torch.equal(out, generate(model, prompt, 5, use_cache=False))
