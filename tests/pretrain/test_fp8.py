"""FP8 configuration, projection selection and the exact numerics of the torchao recipes.

The numerics tests compare torchao's emulated ``Float8Linear`` (what runs on CPU) with a
reference written here from the recipe definitions: per-tensor scale
``fp8_max / amax`` (E4M3 max 448, E5M2 max 57344), saturating cast, GEMM of the
dequantized operands; row-wise: one scale per row, rounded down to a power of two.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from polytron.model.configlib import ConfigError
from polytron.model.layers import LINEARS
from polytron.model.transformer import param_shapes
from polytron.parallel.config import ParallelConfig
from polytron.parallel.engine import build_engine
from polytron.parallel.fp8 import FP8Config, cp_refusal
from polytron.parallel.mesh import ParallelDims
from polytron.pretrain.config import load_config
from tests.distributed.equivalence import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.yaml")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("overrides,key,words", [
    (["precision.fp8.recipe=delayed"], "precision.fp8.recipe", "backend='te'"),
    (["precision.fp8.recipe=mxfp8"], "precision.fp8.recipe", "backend='te'"),
    (["precision.fp8.backend=te", "precision.fp8.recipe=rowwise"], "precision.fp8.recipe", "backend='torchao'"),
    (["precision.fp8.recipe=rowwise", "precision.fp8.format=hybrid"], "precision.fp8.format", "E4M3"),
    (["precision.fp8.amax_history_len=16"], "precision.fp8.amax_history_len", "'delayed' only"),
    (["precision.fp8.keep_roles=[head,qkv]"], "precision.fp8.keep_roles[1]", "router"),
    (["precision.fp8.keep_first_blocks=2", "precision.fp8.keep_last_blocks=2"],
     "precision.fp8.keep_last_blocks", "model.num_layers=4"),
    (["precision.fp8.keep_first_blocks=-1"], "precision.fp8.keep_first_blocks", ">= 0"),
    (["precision.fp8.backend=te"], "precision.fp8.backend", "pip install .[te]"),
])
def test_misconfigured_recipes_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["precision.fp8.enabled=true", *overrides])
    assert key in str(err.value) and words in str(err.value), str(err.value)


def test_missing_transformer_engine_is_one_error_line():
    """Through the launcher: exit 2, one ``error:`` line saying how to install TE."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", TINY,
                           "precision.fp8.enabled=true", "precision.fp8.backend=te", "training.device=cpu"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "pip install .[te]" in errors[0], text


# ---------------------------------------------------------------- with context parallelism

def test_fp8_rowwise_with_cp_is_refused_in_one_line():
    """Refused at config validation, before any process group (the layouts that train are
    in tests/pretrain/test_fp8_layouts.py)."""
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["precision.fp8.enabled=true", "parallel.context=2", "precision.fp8.recipe=rowwise"])
    words = ("recipe='rowwise' (backend 'torchao') with parallel.context=2 is not supported: its grad-weight "
             "GEMM scales each feature over all tokens")
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_engine_refuses_fp8_with_cp_as_the_config_does():
    from polytron.parallel.fp8 import build_fp8
    dims = ParallelDims.resolve(ParallelConfig(context=2), model_config(), 2, 16)
    with pytest.raises(ConfigError, match="recipe='rowwise' .* with parallel.context=2 is not supported"):
        build_fp8(FP8Config(enabled=True, recipe="rowwise"), dims, None, torch.device("cpu"))


@pytest.mark.parametrize("overrides", [["precision.fp8.recipe=tensorwise", "parallel.tensor=2"],
                                       ["precision.fp8.recipe=rowwise_gw_hp"]])
def test_fp8_with_cp_is_accepted_for_global_scales(overrides):
    cfg = load_config(TINY, ["precision.fp8.enabled=true", "parallel.context=2", *overrides])
    assert cfg.parallel.context == 2 and cfg.precision.fp8.enabled


@pytest.mark.parametrize("fp8,seq_len,words", [
    ({"recipe": "tensorwise"}, 256, "current scaling takes each cp rank's own amax"),
    ({"recipe": "mxfp8"}, 192, "data.seq_len divisible by 64 x parallel.context = 128"),
    ({"recipe": "mxfp8"}, 256, None),
    ({"recipe": "delayed"}, 192, None),
])
def test_transformer_engine_with_cp(fp8, seq_len, words):
    """TE needs a GPU, so its rules are checked on :func:`cp_refusal` itself: delayed scaling
    reduces amaxes over a group with the cp ranks; MXFP8 blocks of 32 tokens must not
    straddle two cp chunks."""
    got = cp_refusal(FP8Config(enabled=True, backend="te", **fp8), 2, seq_len)
    assert got is None if words is None else (got is not None and words in got and "\n" not in got), got


# ---------------------------------------------------------------- selection

def engine_for(fp8: dict, **model):
    cfg = model_config(**model)
    dims = ParallelDims.resolve(ParallelConfig(), cfg, 1)
    engine = build_engine(cfg, ParallelConfig(), dims, None, torch.device("cpu"), torch.float32, 1,
                          fp8_cfg=FP8Config(enabled=True, **fp8))
    return cfg, engine


def kinds(model: nn.Module) -> dict[str, str]:
    """Path -> class name of every linear of the model."""
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_projections_convert_by_role_and_keep_names():
    cfg, engine = engine_for({})
    model = engine.model
    got = kinds(model)
    assert got.pop("output") == "Linear"                          # the head stays high precision
    assert isinstance(model.tok_embeddings, nn.Embedding)
    assert set(got.values()) == {"Float8Linear"} and len(got) == 4 * 7
    assert model.layers["0"].attention.wo.role == "o"             # role kept (depth-scaled init)
    assert sorted(model.state_dict()) == sorted(param_shapes(cfg))
    assert "28 projections in FP8" in engine.fp8.describe()


def test_first_last_blocks_roles_and_shapes_stay_high_precision():
    _, engine = engine_for({"keep_first_blocks": 1, "keep_last_blocks": 1, "keep_roles": ["head", "q"]})
    got = kinds(engine.model)
    for i in (0, 3):
        assert all(v == "Linear" for k, v in got.items() if k.startswith(f"layers.{i}.")), got
    for i in (1, 2):
        assert got[f"layers.{i}.attention.wq"] == "Linear"
        assert got[f"layers.{i}.attention.wk"] == "Float8Linear"
    # an inner width that is not a multiple of 16 cannot feed an FP8 GEMM: the MLP stays
    _, engine = engine_for({}, ffn_hidden_size=72)
    got = kinds(engine.model)
    assert got["layers.1.mlp.w1"] == "Linear" and got["layers.1.attention.wq"] == "Float8Linear"
    assert "12 by shape not a multiple of 16" in engine.fp8.describe()


class SubLinear(nn.Linear):
    """A linear kind of another class (as BitNet's BitLinear): never converted."""


def test_other_linear_kinds_are_never_converted():
    LINEARS["test_fp8_sub"] = lambda cfg, i, o, bias, role: SubLinear(i, o, bias=bias)
    try:
        _, engine = engine_for({}, linear="test_fp8_sub")
    finally:
        del LINEARS["test_fp8_sub"]
    assert engine.fp8.converted == 0
    assert {type(m) for m in engine.model.modules() if isinstance(m, nn.Linear)} == {SubLinear}


# ---------------------------------------------------------------- exact numerics

def quantize(x: torch.Tensor, dtype: torch.dtype, dim=None, pow2: bool = False) -> torch.Tensor:
    """Dequantized FP8 value of ``x``: scale fp8_max / amax (per tensor, or per slice along
    ``dim``), saturating cast, divided back."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (fmax / amax.double().clamp_min(1e-12)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return (x * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def float8_linear(recipe: str, fmt: str, weight: torch.Tensor) -> nn.Module:
    from polytron.parallel.fp8 import to_float8_linear, torchao_config
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    linear.role = "up"
    return to_float8_linear(linear, torchao_config(FP8Config(recipe=recipe, format=fmt), True, False), False)


@pytest.mark.parametrize("fmt,grad_dtype", [("hybrid", E5M2), ("e4m3", E4M3)])
def test_tensorwise_forward_and_backward_match_the_recipe(fmt, grad_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 32, generator=gen).requires_grad_()          # (B, T, in)
    w = torch.randn(48, 32, generator=gen) * 0.05                       # (out, in)
    g = torch.randn(2, 8, 48, generator=gen) * 1e-3                     # d loss / d y
    layer = float8_linear("tensorwise", fmt, w)
    y = layer(x)
    y.backward(g)
    xq, wq, gq = quantize(x.detach(), E4M3), quantize(w, E4M3), quantize(g, grad_dtype)
    torch.testing.assert_close(y, xq @ wq.t(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(layer.weight.grad, gq.flatten(0, 1).t() @ xq.flatten(0, 1), rtol=1e-6, atol=1e-9)
    assert (y - x.detach() @ w.t()).abs().max() > 1e-4                  # it is not the fp32 GEMM


def test_rowwise_forward_matches_the_recipe():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, generator=gen) * torch.logspace(-2, 1, 16)[:, None]   # rows of many scales
    w = torch.randn(48, 32, generator=gen) * 0.05
    y = float8_linear("rowwise", "auto", w)(x)
    want = quantize(x, E4M3, dim=-1, pow2=True) @ quantize(w, E4M3, dim=-1, pow2=True).t()
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7)
    tensorwise = quantize(x, E4M3) @ quantize(w, E4M3).t()
    assert (want - tensorwise).abs().max() > 1e-5                       # per-row scales matter here
