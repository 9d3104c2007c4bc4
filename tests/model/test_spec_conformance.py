"""Conformance of every registered architecture spec (one parametrized test per check, tiny
configs, one device): meta build, reproducible and layout-independent initialization, the
tensor-parallel layout rule, cached generation equal to the uncached forward, the Hugging Face
tensor round trip where the spec has an adapter, and resume refusal of meaning-changing keys.
A new architecture folder (or one under tests/model/) is picked up here without editing
this file."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil

import pytest
import torch

from polytron.model.config import FREE_ON_RESUME, ModelConfig, weight_meaning_change
from polytron.model.configlib import from_dict, to_dict
from polytron.model.generate import generate
from polytron.model.spec import config_sections, registered_specs
from polytron.model.transformer import Transformer, build_model


def _register_test_architectures() -> None:
    """Architectures of the test tree register too, whatever else pytest collected: every
    ``tests/model/<arch>/`` package with a ``spec`` module, and the distributed suite's
    heterogeneous spec."""
    import tests.model as package
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg and importlib.util.find_spec(f"tests.model.{info.name}.spec"):
            importlib.import_module(f"tests.model.{info.name}.spec")
    importlib.import_module("tests.distributed.hetero_spec")


_register_test_architectures()
SHAPE = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=32, max_seq_len=32)
ARCHS = sorted(registered_specs())


def tiny(arch: str) -> ModelConfig:
    cfg = ModelConfig(arch=arch, **SHAPE)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module", params=ARCHS)
def built(request):
    """(spec, config, model built with seed 3) per architecture, shared by the checks."""
    cfg = tiny(request.param)
    torch.manual_seed(0)
    return registered_specs()[request.param], cfg, build_model(cfg, seed=3)


def test_meta_build_has_the_declared_units(built):
    spec, cfg, _ = built
    with torch.device("meta"):
        model = Transformer(cfg)
    assert [u.name for u, _ in model.unit_modules()] == [u.name for u in spec.units(cfg)]
    assert all(p.is_meta for p in model.parameters())


def test_initialization_is_reproducible_and_layout_independent(built):
    """Same seed, same tensors; a pipeline stage holding only the later units initializes
    them exactly as the whole model does."""
    spec, cfg, model = built
    again = build_model(cfg, seed=3).state_dict()
    full = model.state_dict()
    assert all(torch.equal(full[k], again[k]) for k in full)
    units = spec.units(cfg)
    tail = [u.name for u in units[len(units) // 2:]]
    carry_in = tuple(c for u in units[:len(units) // 2] for c in u.produces)
    with torch.device("meta"):
        stage = Transformer(cfg)
    stage.keep_units(tail, carry_in, ())
    stage.to_empty(device="cpu")
    stage.init_weights(3)
    part = stage.state_dict()
    assert part and all(torch.equal(part[k], full[k]) for k in part)


def test_check_layout_accepts_and_refuses(built):
    spec, cfg, _ = built
    assert spec.check_layout(cfg, 1) is None and spec.check_layout(cfg, 2) is None
    refused = spec.check_layout(cfg, 3)          # 3 divides no head count and not the vocabulary
    assert isinstance(refused, str) and "parallel.tensor=3" in refused and "\n" not in refused


def test_cached_generation_equals_the_full_forward(built):
    _, cfg, model = built
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = generate(model, prompt, 6, use_cache=True)
        full = generate(model, prompt, 6, use_cache=False)
    assert torch.equal(cached, full)


def test_hf_tensor_round_trip(built):
    """Every built-in spec has an adapter whose tensor map round-trips exactly; only an
    architecture registered from the test tree may have none."""
    spec, cfg, model = built
    if spec.hf is None:
        assert spec.units.__module__.startswith("tests."), f"built-in spec {spec.name} has no HF adapter"
        return
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    back = spec.hf.from_hf_tensors(cfg, spec.hf.to_hf_tensors(cfg, dict(ours)), "round trip")
    assert sorted(back) == sorted(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_resume_refuses_meaning_changing_keys(built):
    """Every field of the architecture's own section and the shape keys fix what the weights
    mean; the free keys (FREE_ON_RESUME) may change."""
    spec, cfg, _ = built
    saved = to_dict(cfg)
    for key in ("num_layers", "hidden_size", "attention", "mlp", "linear"):
        assert weight_meaning_change(saved, {**saved, key: changed(saved[key])})[0] == f"model.{key}"
    for key in FREE_ON_RESUME:
        assert weight_meaning_change(saved, {**saved, key: changed(saved[key])}) is None
    if spec.config is None:
        return
    section = spec.section_name
    assert section in saved, "a model's own section is saved with it"
    for key, value in saved[section].items():
        current = {**saved, section: {**saved[section], key: changed(value)}}
        assert weight_meaning_change(saved, current)[0] == f"model.{section}.{key}"


def changed(value):
    """Another value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [0]
    return {**value, "changed": True} if isinstance(value, dict) else None


# ------------------------------------------------------------ sections (not per spec)

def test_sections_round_trip_and_only_used_ones_are_saved():
    cfg = ModelConfig(arch="moe", linear="bitlinear", **SHAPE, moe={"num_experts": 4})
    saved = to_dict(cfg)
    used = {name for name, s in config_sections().items() if s.used_by(cfg)}
    assert used == {"moe", "bitnet"} and cfg.mlp == "moe"         # arch moe implies mlp moe
    assert set(saved) & set(config_sections()) == used
    assert from_dict(ModelConfig, saved, prefix="model.") == cfg
    assert from_dict(ModelConfig, dataclasses.asdict(cfg), prefix="model.") == cfg
    assert ModelConfig(arch="moe", mlp="mh_moe", **SHAPE).mlp == "mh_moe"   # explicit wins


def test_a_checkpoint_with_every_section_resumes_when_unused_defaults_change():
    """A config stored before sections were per architecture holds every section: the unused
    ones are ignored (also when their defaults changed since), the used ones compared."""
    cfg = tiny("llama")
    every = {**to_dict(cfg), **{n: dataclasses.asdict(s.config()) for n, s in config_sections().items()}}
    every["moe"]["num_experts"] += 5                  # an unused section's default changed
    assert weight_meaning_change(every, to_dict(cfg)) is None
    assert to_dict(from_dict(ModelConfig, every, prefix="model.")) == to_dict(cfg)   # loads, same run
    moe = tiny("moe")
    old = {**to_dict(moe), **{n: dataclasses.asdict(s.config()) for n, s in config_sections().items()
                              if n != "moe"}}
    old["moe"] = {**old["moe"], "top_k": 1}
    assert weight_meaning_change(old, to_dict(moe))[0] == "model.moe.top_k"


def test_unknown_model_keys_are_one_line():
    from polytron.model.configlib import ConfigError
    with pytest.raises(ConfigError, match=r"unknown config key 'model.mooe'.*\bmoe\b") as e:
        from_dict(ModelConfig, {"mooe": {}}, prefix="model.")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model.moe.top_kk"):
        from_dict(ModelConfig, {"moe": {"top_kk": 1}}, prefix="model.")
