"""``convert_checkpoint.py from-yoco-released``: a state dict under the released YOCO code's
names (microsoft/unilm ``YOCO/yoco/models/decoder/yoco.py``; built here by this file's own
inverse map, written from those module names) converts to our tensors exactly, both
pairings give the source model's logits, and what cannot be mapped is refused in one line.
(The side-by-side run against the released modules themselves is recorded in docs/yoco.md.)"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.hf import ConvertError
from polytron.model.transformer import build_model
from polytron.pretrain import checkpoint as ckpt
from polytron.tools.convert_checkpoint import from_yoco_released
from tests.checkpoint import runs

VOCAB, DIM, HEADS, KV, FFN = 97, 64, 4, 2, 80


def params_for(n_layers: int = 4, window=None, **over) -> dict:
    """The released YOCOArgs (params.json) of the test model."""
    p = dict(dim=DIM, n_layers=n_layers, hidden_dim=FFN, n_self_heads=HEADS, n_attn_heads=HEADS,
             n_attn_kv_heads=KV, vocab_size=VOCAB, max_seq_len=128, rope_theta=500.0, norm_eps=1e-5,
             sliding_window=window, max_batch_size=0, model_parallel_size=1, load_checkpoint=False)
    return {**p, **over}


def source_model(n_layers: int = 4, window=None):
    """Our model with the released model's settings (what the converter must reproduce)."""
    yoco = dict(rope_pairing="interleaved", rope_frequencies="released", gate_logit_normalizer=16.0,
                **(dict(self_decoder="swa", sliding_window=window, self_kv_heads=HEADS) if window
                   else dict(self_decoder="retention", retention_chunk=256)))
    cfg = from_dict(ModelConfig, dict(arch="yoco", vocab_size=VOCAB, hidden_size=DIM, num_layers=n_layers,
                                      num_heads=HEADS, num_kv_heads=KV, ffn_hidden_size=FFN, max_seq_len=128,
                                      rope_theta=500.0, init_std=0.05, yoco=yoco), prefix="model.")
    cfg.validate()
    model = build_model(cfg, seed=5).eval()
    with torch.no_grad():                                  # norms away from 1: a misplaced one shows
        gen = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def to_released_names(state: dict, self_layers: int) -> dict:
    """Our state dict -> the released ``YOCO`` module's names (an independent inverse map)."""
    top = {"tok_embeddings.weight": "embed_tokens.weight", "output.weight": "output_projection.weight",
           "norm.weight": "layer_norm.weight", "shared_kv.norm.weight": "cross_decoder.kv_layer_norm.weight",
           "shared_kv.proj.wk.weight": "cross_decoder.k_proj.weight",
           "shared_kv.proj.wv.weight": "cross_decoder.v_proj.weight"}
    inner = {"attention_norm": "mixer_layer_norm", "mlp_norm": "final_layer_norm", "attention.wq": "mixer.q_proj",
             "attention.wk": "mixer.k_proj", "attention.wv": "mixer.v_proj", "attention.wo": "mixer.out_proj",
             "attention.wg": "mixer.g_proj", "attention.wgt": "mixer.gt_proj", "mlp.w1": "ffn.fc1",
             "mlp.w3": "ffn.gate", "mlp.w2": "ffn.fc2"}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t.clone()
            continue
        _, i, rest = name.split(".", 2)
        part = inner[rest.removesuffix(".weight")]
        i = int(i)
        where = f"self_decoder.layers.{i}" if i < self_layers else f"cross_decoder.layers.{i - self_layers}"
        out[f"{where}.{part}.weight"] = t.clone()
    return out


def write_released(folder, state: dict, params: dict, fmt: str = "pth") -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, os.path.join(folder, "model.safetensors"))
    else:
        torch.save(state, os.path.join(folder, "checkpoint.pth"))
    return str(folder)


def load_converted(dst):
    run = yaml.safe_load(open(os.path.join(dst, "config.yaml")))
    cfg = from_dict(ModelConfig, run["model"], prefix="model.")
    cfg.validate()
    model = build_model(cfg, seed=0).eval()
    tensors = ckpt.load_tensors(os.path.join(dst, "checkpoint"))
    model.load_state_dict(tensors)
    return model, tensors, run


TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("window,fmt,wrap", [(None, "pth", None), (7, "safetensors", None),
                                             (None, "pth", "fairseq")],
                         ids=["retention-pth", "swa-safetensors", "retention-fairseq_wrapped"])
def test_round_trip_exact_and_logits_equal(tmp_path, window, fmt, wrap):
    src_model = source_model(window=window)
    state = to_released_names(src_model.state_dict(), 2)
    if wrap:                                     # fairseq's LanguageModel.decoder (YOCOModel).model
        state = {"model": {f"decoder.model.{k}": v for k, v in state.items()}}
    src = write_released(tmp_path / "released", state, params_for(window=window), fmt)
    from_yoco_released(src, str(tmp_path / "ours"))
    ours, tensors, run = load_converted(tmp_path / "ours")
    assert set(tensors) == set(src_model.state_dict())
    for name, t in src_model.state_dict().items():
        assert torch.equal(tensors[name], t), name
    y = run["model"]["yoco"]
    assert (y["rope_pairing"], y["rope_frequencies"], y["self_layers"]) == ("interleaved", "released", 2)
    assert y["self_decoder"] == ("swa" if window else "retention")
    assert run["checkpoint"]["load"] == os.path.join(os.path.abspath(tmp_path / "ours"), "checkpoint")
    report = json.load(open(tmp_path / "ours" / "yoco_conversion.json"))
    assert report["tensors"] == len(tensors)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), src_model(TOKENS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [None, 5], ids=["retention", "swa"])
def test_rotate_half_conversion_gives_the_same_logits(tmp_path, window):
    """--rope-pairing rotate_half: q/k rows permuted, our default pairing, same model."""
    src_model = source_model(window=window)
    src = write_released(tmp_path / "r", to_released_names(src_model.state_dict(), 2), params_for(window=window))
    from_yoco_released(src, str(tmp_path / "ours"), pairing="rotate_half")
    ours, tensors, run = load_converted(tmp_path / "ours")
    assert run["model"]["yoco"]["rope_pairing"] == "rotate_half"
    assert not torch.equal(tensors["shared_kv.proj.wk.weight"], src_model.state_dict()["shared_kv.proj.wk.weight"])
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), src_model(TOKENS), atol=1e-5, rtol=0)


def test_odd_layer_count_builds_half_per_decoder(tmp_path, capsys):
    """n_layers=5: the released code builds 2 + 2 layers; so do we, with a note."""
    src_model = source_model(n_layers=4)
    src = write_released(tmp_path / "r", to_released_names(src_model.state_dict(), 2), params_for(n_layers=5))
    from_yoco_released(src, str(tmp_path / "ours"))
    ours, _, run = load_converted(tmp_path / "ours")
    assert run["model"]["num_layers"] == 4 and "n_layers=5 is odd" in capsys.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), src_model(TOKENS), atol=1e-6, rtol=0)


def _released_state(window=None) -> dict:
    return to_released_names(source_model(window=window).state_dict(), 2)


def _hostile(folder) -> str:
    """A checkpoint.pth whose unpickling would create ``marker`` (open(marker, 'w'))."""
    marker = os.path.join(folder, "marker")

    class Opens:
        def __reduce__(self):
            return (open, (marker, "w"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "checkpoint.pth"), "wb") as f:
        pickle.dump({"embed_tokens.weight": Opens()}, f, protocol=2)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params_for(), f)
    return marker


@pytest.mark.parametrize("case,expect", [
    ("extra", "tensor self_decoder.layers.0.mixer.bias_proj.weight has no place"),
    ("missing", "tensor cross_decoder.k_proj.weight is missing"),
    ("shape", "tensor self_decoder.layers.1.ffn.fc1.weight has shape (40, 64), the params give (80, 64)"),
    ("self_heads", "n_self_heads=8 differs from n_attn_heads=4"),
    ("unknown_field", "YOCOArgs field(s) gate_bias not known"),
    ("missing_field", "missing hidden_dim"),
    ("bool_window", "sliding_window=True is not a window length"),
    ("text_theta", "rope_theta='1e4' is not a positive number"),
    ("kv_heads", "model.num_kv_heads"),
    ("not_tensor", "entry 'self_decoder.layers.0.mixer.q_proj.weight' is not a tensor"),
    ("hostile", "not loadable as data only (torch.load weights_only=True"),
    ("seq_len", "--seq-len 100000: must be between 1 and the model's max_seq_len"),
])
def test_refusals_are_one_line(tmp_path, case, expect):
    folder = tmp_path / "r"
    state, params = _released_state(), params_for()
    if case == "extra":
        state["self_decoder.layers.0.mixer.bias_proj.weight"] = torch.zeros(3)
    elif case == "missing":
        del state["cross_decoder.k_proj.weight"]
    elif case == "shape":                                   # a tensor-parallel shard of the MLP
        state["self_decoder.layers.1.ffn.fc1.weight"] = state["self_decoder.layers.1.ffn.fc1.weight"][:40]
    elif case == "self_heads":
        params["n_self_heads"] = 8
    elif case == "unknown_field":
        params["gate_bias"] = True
    elif case == "missing_field":
        del params["hidden_dim"]
    elif case == "bool_window":
        params["sliding_window"] = True
    elif case == "text_theta":
        params["rope_theta"] = "1e4"
    elif case == "kv_heads":
        params["n_attn_kv_heads"] = 3
    elif case == "not_tensor":
        state["self_decoder.layers.0.mixer.q_proj.weight"] = [1.0, 2.0]
    if case == "hostile":
        marker = _hostile(folder)
    else:
        write_released(folder, state, params)
    with pytest.raises(ConvertError) as e:
        from_yoco_released(str(folder), str(tmp_path / "ours"), seq_len=100000 if case == "seq_len" else 0)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ours").exists()
    if case == "hostile":
        assert not os.path.exists(marker)


def test_cli_converts_and_refuses_in_one_line(tmp_path):
    src = write_released(tmp_path / "r", _released_state(window=3), params_for(window=3))
    env = {**os.environ, "PYTHONPATH": runs.ROOT}
    tool = os.path.join(runs.ROOT, "tools", "convert_checkpoint.py")
    ok = subprocess.run([sys.executable, tool, "from-yoco-released", src, str(tmp_path / "ours"),
                         "--rope-pairing", "rotate_half"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "wrote checkpoint" in ok.stdout
    bad = subprocess.run([sys.executable, tool, "from-yoco-released", src, str(tmp_path / "ours")],
                         capture_output=True, text=True, env=env)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: destination"), bad.stderr
