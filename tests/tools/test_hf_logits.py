"""Our Transformer and Hugging Face LlamaForCausalLM with copied weights give the same logits."""
import pytest
import torch
import transformers  # in the dev extra: a missing install must fail, not skip

from polytron.model.config import ModelConfig
from polytron.model.llama.hf import LlamaAdapter
from polytron.model.transformer import build_model


def hf_state_dict(model: torch.nn.Module) -> dict:
    """Our state dict under LlamaForCausalLM names, through the converter's adapter."""
    return LlamaAdapter().to_hf_tensors(model.cfg, dict(model.state_dict()))


def hf_model(cfg: ModelConfig):
    """LlamaForCausalLM from the config the converter writes for ``cfg``."""
    hf_cfg = transformers.LlamaConfig(**LlamaAdapter().to_hf_config(cfg, None, None, "float32"))
    hf_cfg.use_cache = False
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
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours), strict=False)
    tied_head = ["lm_head.weight"] if tied else []          # the export leaves it to HF's tying
    assert not unexpected and all("rotary" in k or k in tied_head for k in missing), (missing, unexpected)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_long_sequence_logits_and_gradients_match_hf():
    """T = 320 > model.attention_kernels.CPU_CHUNK: the blocked CPU causal kernel, in training."""
    from polytron.model.attention_kernels import CPU_CHUNK
    from polytron.model.transformer import cross_entropy
    T = 320
    assert T > CPU_CHUNK
    cfg = ModelConfig(vocab_size=211, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=96, max_seq_len=512, rope_theta=500.0)
    ours = build_model(cfg, seed=5)
    hf = hf_model(cfg).train()
    hf.load_state_dict(hf_state_dict(ours), strict=False)
    ids = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(1))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    ref = hf(input_ids=tokens).logits
    got = ours(tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    cross_entropy(got, labels).backward()
    cross_entropy(ref, labels).backward()
    ours_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name in ours_params:
        hf_name = LlamaAdapter().to_hf_name(cfg, name)
        torch.testing.assert_close(ours_params[name].grad, hf_params[hf_name].grad,
                                   atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

