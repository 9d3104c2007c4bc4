"""Decoupled-head attention: config rules, exact special cases, a per-head reference,
cached generation, KV-cache accounting and tensor-parallel rules (model/dha)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from polytron.model.accounting import describe_kv_cache, kv_cache_bytes_per_token
from polytron.model.config import ModelConfig
from polytron.model.configlib import ConfigError, from_dict
from polytron.model.dha.config import DHAConfig, layer_heads
from polytron.model.dha.layers import HeadMaps, _plan
from polytron.model.generate import generate, stream
from polytron.model.transformer import build_model, document_mask

BASE = dict(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
            max_seq_len=200, init_std=0.1)
#: unequal key/value counts per layer, a permuted key map and a non-contiguous value map
UNEVEN = {"key_heads": [1, 4, 2], "value_heads": [2, 3, 4],
          "key_map": [[], [2, 0, 3, 1], []], "value_map": [[], [0, 2, 1, 1], []]}


def dha_config(dha: dict | None = None, **kw) -> ModelConfig:
    data = {**BASE, **kw, "arch": "dha", "attention": "dha", "dha": dha or {}}
    cfg = from_dict(ModelConfig, data, prefix="model.")
    cfg.validate()
    return cfg


def tokens(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("dha,extra,needle", [
    ({"key_heads": [2, 2]}, {}, "model.dha.key_heads"),                       # one entry per layer
    ({"key_heads": [3, 2, 2]}, {}, "model.dha.key_heads[0]"),                 # 3 does not divide 4 heads
    ({"key_heads": [5, 2, 2]}, {}, "model.dha.key_heads[0]"),                 # more than the query heads
    ({"value_heads": [2, 2, 2], "value_map": [[0, 1, 2, 0], [], []]}, {}, "model.dha.value_map[0]"),
    ({"key_heads": [3, 2, 2], "key_map": [[0, 1, 1, 0], [], []]}, {}, "key head 2 is read by no query"),
    ({"key_map": [[0, 1, 0], [], []]}, {}, "model.dha.key_map[0]"),           # not one entry per query head
    ({}, {"attention": "gqa"}, "model.attention"),                           # arch dha needs the dha slot
])
def test_bad_config_is_one_line_naming_the_key(dha, extra, needle):
    data = {**BASE, "arch": "dha", "attention": "dha", "dha": dha, **extra}
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, data, prefix="model.").validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_dha_lists_without_dha_attention_refused():
    with pytest.raises(ConfigError, match="model.dha"):
        ModelConfig(**BASE, dha=DHAConfig(key_heads=[1, 1, 1])).validate()


def test_layer_heads_resolve_defaults_and_explicit_maps():
    cfg = dha_config(UNEVEN)
    assert layer_heads(cfg, 0).key_map == (0, 0, 0, 0) and layer_heads(cfg, 0).value_map == (0, 0, 1, 1)
    assert layer_heads(cfg, 1).key_map == (2, 0, 3, 1) and layer_heads(cfg, 1).value_heads == 3
    assert layer_heads(dha_config(), 2).key_heads == BASE["num_kv_heads"]


# ---------------------------------------------------------------- exact special cases

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_mha_gqa_special_cases_are_bitwise_the_dense_model(kv_heads):
    """Default lists = the GQA layout: the same weights give the same logits, bit for bit."""
    dense = build_model(ModelConfig(**{**BASE, "num_kv_heads": kv_heads}), seed=3).eval()
    dha = build_model(dha_config(num_kv_heads=kv_heads), seed=3).eval()
    dha.load_state_dict(dense.state_dict())
    for length in (24, 160):                                   # SDPA and the blocked CPU kernel
        x = tokens(length=length)
        with torch.no_grad():
            assert torch.equal(dha(x), dense(x))


def test_gather_plan_merges_contiguous_pairs():
    assert _plan((0, 0, 1, 1), (0, 0, 1, 1)) == ((0, 1), (0, 1))           # GQA: no gather
    assert _plan((0, 0, 0, 0), (0, 0, 1, 1)) == ((0, 0), (0, 1))           # keys repeated to 2
    assert _plan((2, 0, 3, 1), (0, 2, 1, 1)) == ((2, 0, 3, 1), (0, 2, 1, 1))  # one per query head


def reference_attention(attn, x: torch.Tensor, cos, sin, mask=None) -> torch.Tensor:
    """Per-query-head softmax attention written out: query head h scores against key head
    key_map[h] and mixes value head value_map[h]."""
    from polytron.model.layers import apply_rope
    B, T, _ = x.shape
    hd = attn.head_dim
    q = apply_rope(attn.wq(x).view(B, T, -1, hd), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(B, T, -1, hd), cos, sin).transpose(1, 2)
    v = attn.wv(x).view(B, T, -1, hd).transpose(1, 2)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask[:, 0]
    outs = []
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, attn.maps.key_map[h]].transpose(-1, -2) / math.sqrt(hd)    # (B, T, T)
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(p @ v[:, attn.maps.value_map[h]])                                # (B, T, hd)
    return attn.wo(torch.stack(outs, 2).reshape(B, T, -1))


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_layer_matches_per_head_reference(layer, docs):
    model = build_model(dha_config(UNEVEN), seed=1).eval()
    attn = model.layers[str(layer)].attention
    T = 20
    x = torch.randn(2, T, BASE["hidden_size"], generator=torch.Generator().manual_seed(2))
    doc_ids = torch.tensor([[0] * 7 + [1] * 13, [0] * 15 + [1] * 5]) if docs else None
    ctx = model.context(T, None, doc_ids)
    with torch.no_grad():
        got = attn(x, ctx)
        want = reference_attention(attn, x, ctx.cos, ctx.sin, document_mask(doc_ids) if docs else None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_backward_reaches_every_head():
    model = build_model(dha_config(UNEVEN), seed=1)
    x = tokens()
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if ".attention.w" in name:
            per_head = p.grad.view(-1, BASE["hidden_size"] // BASE["num_heads"], p.shape[-1]) \
                if ".wk." in name or ".wv." in name else p.grad[None]
            assert all(float(h.abs().sum()) > 0 for h in per_head), name


# ---------------------------------------------------------------- generation and cache

def test_cached_generation_equals_full_forward():
    model = build_model(dha_config(UNEVEN), seed=4).eval()
    p, n = tokens(length=7), 12
    steps = list(stream(model, p, n))
    logits = torch.stack([lg for lg, _ in steps], 1)
    out = torch.stack([t for _, t in steps], 1)
    assert torch.equal(generate(model, p, n), generate(model, p, n, use_cache=False))
    with torch.no_grad():
        full = model(torch.cat([p, out], 1))
    torch.testing.assert_close(logits, full[:, p.shape[1] - 1:-1], atol=1e-5, rtol=0)
    cache = model.spec.make_cache(model.cfg, 2, 10, "cpu", torch.float32)
    assert [cache.keys[i].shape[1] for i in range(3)] == [1, 4, 2]
    assert [cache.values[i].shape[1] for i in range(3)] == [2, 3, 4]


def test_kv_cache_bytes_per_token_follow_the_layers():
    hd = BASE["hidden_size"] // BASE["num_heads"]
    dense = ModelConfig(**BASE)
    assert kv_cache_bytes_per_token(dense, torch.float32) == 2 * 3 * 2 * hd * 4
    cfg = dha_config(UNEVEN)
    want = (1 + 2 + 4 + 3 + 2 + 4) * hd * 2                                        # bf16
    assert kv_cache_bytes_per_token(cfg) == want
    cache = build_model(cfg).spec.make_cache(cfg, 3, 5, "cpu", torch.bfloat16)
    assert cache.bytes() == 3 * 5 * want
    assert f"{want} bytes/token" in describe_kv_cache(cfg)


def test_dha_slot_in_the_dense_spec_refuses_a_wrong_cache():
    """The slot composes into other specs; with a cache not sized for it, one clear error."""
    cfg = from_dict(ModelConfig, {**BASE, "attention": "dha", "dha": {"key_heads": [1, 1, 1]}}, prefix="model.")
    cfg.validate()
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        model(tokens())                                                 # trains and runs uncached
        with pytest.raises(ValueError, match="use model.arch=dha"):
            generate(model, tokens(length=5), 3)


# ---------------------------------------------------------------- tensor parallelism

def test_tp_rules_accept_rank_local_maps_and_name_the_rest():
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.mesh import LayoutError, ParallelDims
    ok = dha_config({"key_heads": [1, 4, 2], "key_map": [[], [1, 0, 3, 2], []]}, vocab_size=98)
    ParallelDims.resolve(ParallelConfig(tensor=2), ok, 2)                # split, permuted, replicated
    bad = dha_config(UNEVEN, vocab_size=98)                               # key_map[1] crosses ranks
    with pytest.raises(LayoutError) as e:
        ParallelDims.resolve(ParallelConfig(tensor=2), bad, 2)
    assert "model.dha.key_map[1]" in str(e.value) and "query head 0" in str(e.value)
    three = dha_config({"value_heads": [2, 3, 2], "value_map": [[], [0, 1, 2, 2], []]}, vocab_size=98)
    with pytest.raises(LayoutError, match=r"model.dha.value_heads\[1\]=3"):
        ParallelDims.resolve(ParallelConfig(tensor=2), three, 2)


def test_tp_localize_keeps_each_ranks_heads():
    cfg = dha_config({"key_heads": [1, 4, 2], "value_heads": [2, 4, 1],
                      "key_map": [[], [1, 0, 3, 2], []], "value_map": [[], [0, 1, 3, 2], []]})
    for rank, keys, values in ((0, (1, 0), (0, 1)), (1, (1, 0), (1, 0))):
        maps = HeadMaps(layer_heads(cfg, 1))
        maps.tp_localize(rank, 2)
        assert (maps.key_map, maps.key_heads, maps.value_map, maps.value_heads) == (keys, 2, values, 2)
    maps = HeadMaps(layer_heads(cfg, 2))                                  # 1 value head: replicated
    maps.tp_localize(1, 2)
    assert maps.value_map == (0, 0) and maps.value_heads == 1 and maps.key_map == (0, 0)


def test_config_round_trips_through_dataclasses():
    cfg = dha_config(UNEVEN)
    again = from_dict(ModelConfig, dataclasses.asdict(cfg), prefix="model.")
    again.validate()
    assert again == cfg
