"""Generation: the dense KV cache against full forwards, sampling, limits and fallbacks."""
import dataclasses

import pytest
import torch

from polytron.model.config import ModelConfig
from polytron.model.generate import (
    DenseKVCache,
    GenerationError,
    InferenceCache,
    NoCacheWarning,
    generate,
    sample_next,
    stream,
)
from polytron.model.transformer import build_model

ATOL = 1e-5


def tiny_model(kv_heads: int = 2, max_seq_len: int = 40, seed: int = 1):
    """A random 2-layer model; init_std 0.1 so logits (and any cache error) are not tiny."""
    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                      ffn_hidden_size=96, max_seq_len=max_seq_len, init_std=0.1)
    return build_model(cfg, seed=seed).eval()


def prompt(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_stream(model, p: torch.Tensor, n: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Step logits (B, n, V) and tokens (B, n) of one generation."""
    steps = list(stream(model, p, n, **kw))
    return torch.stack([lg for lg, _ in steps], 1), torch.stack([t for _, t in steps], 1)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cached_steps_match_full_forward(kv_heads):
    """Every cached step's logits equal the full forward over the final sequence; the
    uncached path gives the same tokens."""
    model, p, n = tiny_model(kv_heads), prompt(), 16
    logits, tokens = run_stream(model, p, n)
    ref_logits, ref_tokens = run_stream(model, p, n, use_cache=False)
    assert torch.equal(tokens, ref_tokens)
    with torch.no_grad():
        full = model(torch.cat([p, tokens], 1))                     # (B, T0 + n, V)
    want = full[:, p.shape[1] - 1:-1]                                # positions that chose each token
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(ref_logits, want, atol=ATOL, rtol=0)
    assert len(set(tokens[0].tolist())) > 1                          # not a degenerate constant stream


def test_generate_returns_prompt_plus_tokens():
    model, p = tiny_model(), prompt()
    out = generate(model, p, 10)
    assert out.shape == (2, 17) and torch.equal(out[:, :7], p)
    assert torch.equal(out, generate(model, p, 10, use_cache=False))


def test_chunked_prefill_matches_full_forward():
    """Two forwards of several tokens (start > 0, T > 1) see exactly the full forward's keys."""
    model, x = tiny_model(kv_heads=2), prompt(length=12)
    cache = model.spec.make_cache(model.cfg, 2, 12, "cpu", torch.float32)
    with torch.no_grad():
        a = model(x[:, :5], cache=cache, start=0)
        cache.advance(5)
        b = model(x[:, 5:], cache=cache, start=cache.length)
        cache.advance(7)
        ref = model(x)
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=ATOL, rtol=0)
    assert cache.length == 12


def test_dense_cache_layout_and_bytes():
    cfg = tiny_model(kv_heads=2).cfg
    cache = DenseKVCache.for_layers(cfg, range(cfg.num_layers), 3, 20, "cpu", torch.float32)
    assert isinstance(cache, InferenceCache)
    assert cache.keys[0].shape == (3, 2, 20, cfg.head_dim)
    assert cache.bytes() == 2 * cfg.num_layers * 3 * 2 * 20 * cfg.head_dim * 4
    k = torch.randn(3, 2, 4, cfg.head_dim)
    ks, vs = cache.update(1, k, -k)
    assert ks.shape == (3, 2, 4, cfg.head_dim) and torch.equal(vs, -k)
    cache.advance(4)
    ks, _ = cache.update(1, k[:, :, :1], k[:, :, :1])                # written at position 4
    assert ks.shape[2] == 5 and torch.equal(ks[:, :, :4], k) and torch.equal(ks[:, :, 4], k[:, :, 0])
    cache.advance(1)
    with pytest.raises(GenerationError, match="holds 20 positions"):
        cache.update(0, torch.randn(3, 2, 16, cfg.head_dim), torch.randn(3, 2, 16, cfg.head_dim))


def test_sampling_is_deterministic_per_seed():
    model, p = tiny_model(), prompt()
    a = generate(model, p, 12, temperature=1.0, seed=7)
    assert torch.equal(a, generate(model, p, 12, temperature=1.0, seed=7))
    assert torch.equal(a, generate(model, p, 12, temperature=1.0, seed=7, use_cache=False))
    assert not torch.equal(a, generate(model, p, 12, temperature=1.0, seed=8))
    assert not torch.equal(a, generate(model, p, 12))                # sampling is not greedy here


def test_tiny_top_p_is_greedy():
    model, p = tiny_model(), prompt()
    assert torch.equal(generate(model, p, 12, temperature=1.5, top_p=1e-6, seed=3), generate(model, p, 12))


def test_top_p_keeps_only_the_nucleus():
    """probs (0.5, 0.3, 0.15, 0.05), top_p 0.7: tokens 0 and 1 only, renormalized to 5:3."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)       # (B, V)
    drawn = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / 4000 - 0.625) < 0.03
    everything = torch.bincount(sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(0)), minlength=4)
    assert everything[3] > 0


def test_length_limit_is_one_clear_error():
    model, p = tiny_model(max_seq_len=20), prompt(length=8)
    assert generate(model, p, 12).shape == (2, 20)                    # exactly max_seq_len is fine
    with pytest.raises(GenerationError, match=r"8 tokens\) \+ new tokens \(13\) = 21 exceeds the model's "
                                              r"max_seq_len of 20"):
        generate(model, p, 13)


def test_eos_stops_and_pads():
    model, p = tiny_model(), prompt(batch=1)
    greedy = generate(model, p, 10)
    eos = int(greedy[0, 9])                                          # the third new token
    out = generate(model, p, 10, eos_id=eos)
    first = (greedy[0, 7:] == eos).nonzero()[0].item()               # where eos first appears
    assert torch.equal(out, greedy[:, :7 + first + 1])


def test_spec_without_cache_falls_back_with_a_note():
    model, p = tiny_model(), prompt()
    cached = generate(model, p, 6)
    model.spec = dataclasses.replace(model.spec, make_cache=None)
    with pytest.warns(NoCacheWarning, match="declares no inference cache"):
        assert torch.equal(generate(model, p, 6), cached)
