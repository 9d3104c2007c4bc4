"""Our Transformer and Hugging Face LlamaForCausalLM with copied weights give the same logits."""
import pytest
import torch

from model.config import ModelConfig
from model.transformer import build_model

import transformers  # in the dev extra: a missing install must fail, not skip


def name_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(our parameter name, LlamaForCausalLM name) for every weight (rotate-half RoPE: no permutation)."""
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight"),
             ("norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")]
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
             "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    for i in range(num_layers):
        pairs += [(f"layers.{i}.{src}.weight", f"model.layers.{i}.{dst}.weight")
                  for src, dst in names.items()]
    return pairs


def hf_state_dict(model: torch.nn.Module, num_layers: int) -> dict:
    """Our state dict under LlamaForCausalLM names."""
    ours = model.state_dict()
    return {hf_name: ours[name] for name, hf_name in name_pairs(num_layers)}


def hf_model(cfg: ModelConfig):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, use_cache=False)
    hf_cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_logits_match_hf(tied, kv_heads):
    cfg = ModelConfig(vocab_size=211, hidden_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=kv_heads, ffn_hidden_size=96, max_seq_len=64,
                      tie_embeddings=tied, rope_theta=500.0)
    ours = build_model(cfg, seed=3).eval()
    hf = hf_model(cfg)
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours, cfg.num_layers), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_long_sequence_logits_and_gradients_match_hf():
    """T = 320 > model.attention_kernels.CPU_CHUNK: the blocked CPU causal kernel, in training."""
    from model.attention_kernels import CPU_CHUNK
    from model.transformer import cross_entropy
    T = 320
    assert T > CPU_CHUNK
    cfg = ModelConfig(vocab_size=211, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=96, max_seq_len=512, rope_theta=500.0)
    ours = build_model(cfg, seed=5)
    hf = hf_model(cfg).train()
    hf.load_state_dict(hf_state_dict(ours, cfg.num_layers), strict=False)
    ids = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(1))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    ref = hf(input_ids=tokens).logits
    got = ours(tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    cross_entropy(got, labels).backward()
    cross_entropy(ref, labels).backward()
    ours_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name, hf_name in name_pairs(cfg.num_layers):
        torch.testing.assert_close(ours_params[name].grad, hf_params[hf_name].grad,
                                   atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")

