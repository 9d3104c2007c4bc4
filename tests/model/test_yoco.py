"""YOCO: kernels against their quadratic references, causality, cached generation, early-exit
prefill, the cache's memory, config errors and the slot kinds in other specs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytron.model.config import ModelConfig
from polytron.model.configlib import ConfigError, from_dict
from polytron.model.generate import DenseKVCache, GenerationError, InferenceCache, stream
from polytron.model.transformer import build_model, document_mask
from polytron.model.yoco import kernels
from polytron.model.yoco.cache import YOCOCache, cache_bytes, dense_cache_bytes
from polytron.model.yoco.kernels import (
    chunk_retention,
    parallel_retention,
    recurrent_retention,
    segments,
    sliding_window_attention,
)

ATOL = 1e-5
KINDS = ["swa", "retention"]


def yoco_config(kind: str = "swa", **over) -> ModelConfig:
    """5 layers (2 self, 3 cross), window 6, retention chunk 4: prompts of 10+ tokens cross both."""
    base = dict(arch="yoco", vocab_size=97, hidden_size=64, num_layers=5, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, max_seq_len=64, init_std=0.1,
                yoco=dict(self_decoder=kind, sliding_window=6, retention_chunk=4))
    base.update(over)
    cfg = from_dict(ModelConfig, base, prefix="model.")
    cfg.validate()
    return cfg


def tokens(batch: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def doc_starts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Document start index (B, T) of random packed documents."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, length, generator=gen) < 0.15
    starts[:, 0] = True
    pos = torch.arange(length).expand(batch, length)
    return torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values


# ---------------------------------------------------------------- kernels

def _masked_window(q, k, v, window, seg=None):
    """Reference: SDPA with the full (T, S) sliding-window mask."""
    T, S = q.shape[2], k.shape[2]
    qpos, kpos = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
    allowed = (kpos <= qpos) & (kpos > qpos - window)
    if seg is not None:
        allowed = (allowed & (seg[:, S - T:, None] == seg[:, None, :]))[:, None]
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=allowed)


@pytest.mark.parametrize("T,S,window,block,docs", [
    (37, 37, 5, 8, False), (37, 37, 5, 8, True), (200, 200, 17, 64, True), (40, 50, 7, 8, False),
    (40, 50, 7, 8, True), (3, 12, 5, 8, False), (20, 20, 30, 8, True), (33, 33, 1, 8, False)])
def test_sliding_window_matches_masked_attention(T, S, window, block, docs):
    """Values and gradients (GQA, earlier keys in front, documents, window 1 and > T)."""
    gen = torch.Generator().manual_seed(T + S + window)
    q = torch.randn(2, 4, T, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, S, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, S, 8, generator=gen, requires_grad=True)
    seg = doc_starts(2, S, seed=T) if docs else None
    got = sliding_window_attention(q, k, v, window, seg, block=block)
    want = _masked_window(q, k, v, window, seg)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    w = torch.randn(want.shape, generator=gen)
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sliding_window_work_is_linear_in_length(monkeypatch):
    """The blocked path never forms a T x T score matrix: every SDPA call sees at most
    block + window - 1 keys per query block, however long the sequence."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kw)
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", spy)
    T, window, block = 1024, 40, 64
    q, k, v = (torch.randn(1, 2, T, 8) for _ in range(3))
    sliding_window_attention(q, k, v, window, None, block=block)
    assert seen == [(block, block + window - 1)]


@pytest.mark.parametrize("T,chunk,docs", [(37, 8, False), (37, 8, True), (64, 16, True), (5, 8, False),
                                          (40, 1, False)])
def test_chunk_retention_matches_parallel_form(T, chunk, docs):
    """Chunkwise retention equals (q k^T * D) v, values and gradients (decay gate included)."""
    gen = torch.Generator().manual_seed(T * chunk)
    q = torch.randn(2, 3, T, 8, generator=gen, requires_grad=True)
    k = (torch.randn(2, 3, T, 8, generator=gen) * 8 ** -0.5).requires_grad_()
    v = torch.randn(2, 3, T, 6, generator=gen, requires_grad=True)
    gate = (torch.randn(2, 3, T, generator=gen) * 3).requires_grad_()
    seg = doc_starts(2, T, seed=T) if docs else None
    got, _ = chunk_retention(q, k, v, F.logsigmoid(gate) / 4, chunk, seg)
    want = parallel_retention(q, k, v, F.logsigmoid(gate) / 4, seg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn(want.shape, generator=gen)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v, gate)),
                    torch.autograd.grad((want * w).sum(), (q, k, v, gate))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_retention_state_carries_between_calls():
    """Chunkwise in two calls (state handed on) and the recurrent form equal one call."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 23, 8, generator=gen), torch.randn(2, 3, 23, 8, generator=gen) * 0.3
    v, decay = torch.randn(2, 3, 23, 5, generator=gen), F.logsigmoid(torch.randn(2, 3, 23, generator=gen))
    whole, state = chunk_retention(q, k, v, decay, 4)
    a, mid = chunk_retention(q[:, :, :10], k[:, :, :10], v[:, :, :10], decay[:, :, :10], 4)
    b, end = chunk_retention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], decay[:, :, 10:], 4, state=mid)
    rec, rec_state = recurrent_retention(q, k, v, decay, torch.zeros(2, 3, 8, 5))
    torch.testing.assert_close(torch.cat([a, b], 2), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(end, state, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec_state, state, atol=1e-5, rtol=0)


def test_segments_from_document_mask():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 6, 6]])
    assert segments(document_mask(ids)).tolist() == [[0, 0, 2, 2, 2, 5], [0, 0, 0, 0, 4, 4]]
    assert segments(None) is None


# ---------------------------------------------------------------- the model

def test_units_and_embedding_scale():
    cfg = yoco_config("swa", num_layers=4)
    model = build_model(cfg, seed=1)
    assert [(u.name, u.kind, u.produces, u.consumes) for u in model.units] == [
        ("tok_embeddings", "embedding", (), ()), ("layers.0", "block", (), ()), ("layers.1", "block", (), ()),
        ("shared_kv", "yoco_kv", ("yoco_k", "yoco_v"), ()),
        ("layers.2", "block", (), ("yoco_k", "yoco_v")), ("layers.3", "block", (), ("yoco_k", "yoco_v")),
        ("norm", "norm", (), ()), ("output", "head", (), ())]
    assert not hasattr(model.layers["2"].attention, "wk")        # cross layers: only q and o
    t = tokens()
    torch.testing.assert_close(model.tok_embeddings(t), model.tok_embeddings.weight[t] * 8.0)


@pytest.mark.parametrize("kind", KINDS)
def test_causal(kind):
    """Changing tokens after position p changes no logit up to p, and the gradient of a
    position's loss reaches no later position's embedding (through the shared key/value,
    the window or the retention state alike)."""
    model = build_model(yoco_config(kind), seed=2)
    x = tokens(length=20)
    y = x.clone()
    y[:, 11:] = (y[:, 11:] + 7) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=1e-6, rtol=0)
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-2

    emb = {}
    handle = model.tok_embeddings.register_forward_hook(lambda m, i, o: emb.setdefault("out", o.retain_grad() or o))
    model(x)[:, 9].logsumexp(-1).sum().backward()
    handle.remove()
    grad = emb["out"].grad                                       # (B, T, d)
    assert grad[:, 10:].abs().max() == 0
    assert grad[:, :10].abs().amax(-1).min() > 0


def _generate_and_check(model, prompt: torch.Tensor, n: int) -> None:
    steps = list(stream(model, prompt, n))
    logits = torch.stack([lg for lg, _ in steps], 1)            # (B, n, V)
    new = torch.stack([t for _, t in steps], 1)
    with torch.no_grad():
        full = model(torch.cat([prompt, new], 1))
    torch.testing.assert_close(logits, full[:, prompt.shape[1] - 1:-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_matches_full_forward(kind):
    """Token by token with the YOCO cache (window wraps, retention state spans chunks) equals
    the full forward over the final sequence."""
    model = build_model(yoco_config(kind), seed=3).eval()
    _generate_and_check(model, tokens(length=9), 17)
    _generate_and_check(model, tokens(length=1, seed=4), 12)


@pytest.mark.parametrize("kind", KINDS)
def test_early_exit_prefill_matches_full_prefill(kind):
    """The cross-decoder run for the last prompt position only gives the full prefill's last
    logits, and the caches it leaves decode the same next step."""
    cfg = yoco_config(kind)
    model = build_model(cfg, seed=4).eval()
    prompt = tokens(length=23)
    exit_cache = YOCOCache.build(cfg, 2, 30, early_exit=True)
    full_cache = YOCOCache.build(cfg, 2, 30, early_exit=False)
    with torch.no_grad():
        early = model(prompt, cache=exit_cache, start=0)
        full = model(prompt, cache=full_cache, start=0)
        ref = model(prompt)
        assert early.shape == (2, 1, cfg.vocab_size) and full.shape == ref.shape
        torch.testing.assert_close(early[:, -1], full[:, -1], atol=ATOL, rtol=0)
        torch.testing.assert_close(early[:, -1], ref[:, -1], atol=ATOL, rtol=0)
        for cache in (exit_cache, full_cache):
            cache.advance(23)
        nxt = ref[:, -1].argmax(-1, keepdim=True)
        a = model(nxt, cache=exit_cache, start=23)
        b = model(nxt, cache=full_cache, start=23)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_matches_full_forward(kind):
    """Forwards of several tokens at start > 0 see the window / state of the earlier ones."""
    cfg = yoco_config(kind)
    model = build_model(cfg, seed=5).eval()
    x = tokens(length=21)
    cache = YOCOCache.build(cfg, 2, 21, early_exit=False)
    outs = []
    with torch.no_grad():
        for lo, hi in ((0, 4), (4, 13), (13, 14), (14, 21)):
            outs.append(model(x[:, lo:hi], cache=cache, start=cache.length))
            cache.advance(hi - lo)
        ref = model(x)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_memory(kind):
    """Allocated bytes equal the computed layout: one layer's keys/values per position plus a
    fixed window or state per self-decoder layer; a dense model of the same shape keeps
    num_layers times the keys/values."""
    cfg = yoco_config(kind, num_layers=6)
    cache = YOCOCache.build(cfg, 3, 500, dtype=torch.bfloat16)
    assert isinstance(cache, InferenceCache)
    assert cache.bytes() == cache_bytes(cfg, 500, 3, torch.bfloat16)
    per_position = 2 * 3 * cfg.num_kv_heads * cfg.head_dim * 2
    fixed = (3 * 2 * 2 * 5 * 16 * 2) if kind == "swa" else (3 * 4 * 16 * 16 * 4)   # per self layer
    assert cache.bytes() == 500 * per_position + 3 * fixed
    grown = YOCOCache.build(cfg, 3, 1000, dtype=torch.bfloat16).bytes() - cache.bytes()
    assert grown == 500 * per_position
    dense = DenseKVCache.for_layers(cfg, range(cfg.num_layers), 3, 500, dtype=torch.bfloat16)
    assert dense.bytes() == dense_cache_bytes(cfg, 500, 3, torch.bfloat16) == 6 * 500 * per_position


def test_cache_refuses_overflow():
    cfg = yoco_config("swa")
    model = build_model(cfg, seed=1).eval()
    cache = YOCOCache.build(cfg, 2, 5)
    with pytest.raises(GenerationError, match="holds 5 positions"), torch.no_grad():
        model(tokens(length=6), cache=cache, start=0)


# ---------------------------------------------------------------- configuration and composition

@pytest.mark.parametrize("over,key", [
    ({"yoco": {"sliding_window": 0}}, "model.yoco.sliding_window"),
    ({"yoco": {"retention_chunk": -1}}, "model.yoco.retention_chunk"),
    ({"yoco": {"self_kv_heads": 3}}, "model.yoco.self_kv_heads"),
    ({"yoco": {"self_layers": 5}}, "model.yoco.self_layers"),
    ({"yoco": {"gate_logit_normalizer": 0.0}}, "model.yoco.gate_logit_normalizer"),
    ({"yoco": {"self_decoder": "mamba"}}, "model.yoco.self_decoder"),
    ({"num_layers": 1}, "model.num_layers"),
    ({"attention": "swa"}, "model.attention"),
])
def test_bad_config_names_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        yoco_config(**over)


def test_derived_settings_are_written_in():
    """Validation resolves self_layers / self_kv_heads = 0 for YOCO (the saved config is
    explicit) and leaves the section of other models as it was."""
    cfg = yoco_config("swa", num_layers=7)
    assert (cfg.yoco.self_layers, cfg.yoco.self_kv_heads) == (3, 2)
    assert [u.kind for u in build_model(cfg).units].index("yoco_kv") == 4      # after 3 self layers
    dense = ModelConfig()
    dense.validate()
    assert (dense.yoco.self_layers, dense.yoco.self_kv_heads) == (0, 0)


@pytest.mark.parametrize("kind,over,tp,message", [
    ("swa", {"yoco": {"self_kv_heads": 3}}, 2, "model.yoco.self_kv_heads=3"),
    ("retention", {"num_kv_heads": 3}, 2, "model.num_kv_heads=3"),
    ("retention", {}, 4, "model.num_heads=6"),
])
def test_layout_rules_name_the_key(kind, over, tp, message):
    """Each layer kind's tensor-parallel rule is checked before any process group exists."""
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.mesh import LayoutError, ParallelDims
    cfg = yoco_config(kind, num_heads=6, hidden_size=96, vocab_size=96, **over)
    with pytest.raises(LayoutError, match=message):
        ParallelDims.resolve(ParallelConfig(tensor=tp), cfg, tp)


@pytest.mark.parametrize("kind", KINDS)
def test_mixers_as_attention_slot_in_the_dense_spec(kind):
    """model.attention=swa / retention in the Llama spec: causal like above; swa decodes
    with the dense cache, retention says it needs a recurrent-state cache."""
    cfg = from_dict(ModelConfig, dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                      ffn_hidden_size=96, max_seq_len=64, init_std=0.1, attention=kind,
                                      yoco=dict(sliding_window=6, retention_chunk=4)), prefix="model.")
    cfg.validate()
    model = build_model(cfg, seed=6).eval()
    if kind == "swa":
        _generate_and_check(model, tokens(length=9), 10)
    else:
        with pytest.raises(GenerationError, match="recurrent"):
            list(stream(model, tokens(length=9), 2))


def test_cross_decoder_mlp_is_the_slot():
    """The cross-decoder (and self-decoder) MLP is the model.mlp slot kind."""
    from tests.distributed.hetero_spec import RELU2, SquaredReLU
    model = build_model(yoco_config("retention", mlp=RELU2), seed=1)
    assert all(isinstance(model.layers[str(i)].mlp, SquaredReLU) for i in range(5))
    model(tokens()).sum().backward()
