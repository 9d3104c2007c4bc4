"""Our Transformer and Hugging Face LlamaForCausalLM with copied weights give the same logits."""
import pytest
import torch

from model.config import ModelConfig
from model.transformer import build_model

import transformers  # in the dev extra: a missing install must fail, not skip


def hf_state_dict(model: torch.nn.Module, num_layers: int) -> dict:
    """Our parameter names -> LlamaForCausalLM names (rotate-half RoPE: no permutation)."""
    ours = model.state_dict()
    out = {"model.embed_tokens.weight": ours["tok_embeddings.weight"],
           "model.norm.weight": ours["norm.weight"], "lm_head.weight": ours["output.weight"]}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
             "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    for i in range(num_layers):
        for src, dst in names.items():
            out[f"model.layers.{i}.{dst}.weight"] = ours[f"layers.{i}.{src}.weight"]
    return out


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
