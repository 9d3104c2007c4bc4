"""Shared helpers of the checkpoint tests: tiny models, tokenizers and HF directories."""
from __future__ import annotations

import os
from typing import Optional

import torch

from polytron.model.config import ModelConfig, RopeScaling
from polytron.model.transformer import Transformer, build_model


def train_spm(tmp: str, vocab: int = 384) -> str:
    """A small byte-fallback SentencePiece model trained on pydoc topics (< 1 s)."""
    import pydoc_data.topics as topics

    from polytron.data.tokenizer import train_sentencepiece
    return train_sentencepiece(list(topics.topics.values()), os.path.join(tmp, "spm"), vocab, threads=1)


def hf_llama(dst: str, *, vocab: int = 384, tied: bool = False, kv_heads: int = 2,
             rope: Optional[dict] = None, bias: bool = False, seed: int = 0, tokenizer: Optional[str] = None):
    """A random tiny LlamaForCausalLM saved with save_pretrained (norms randomized too)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, attention_bias=bias, mlp_bias=bias,
                      rope_scaling=rope, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(dst)
    if tokenizer:
        from polytron.tools.convert_checkpoint import write_tokenizer
        write_tokenizer(tokenizer, dst)
    return model.eval()


def plant_custom_tokenizer(tokenizer: str, directory: str, marker: str) -> None:
    """``tokenizer`` written as a Hugging Face directory whose ``auto_map`` names a module of
    its own, which writes ``marker`` when imported (the code-execution tests assert it never
    appears)."""
    import json

    from polytron.tools.convert_checkpoint import write_tokenizer
    os.makedirs(directory, exist_ok=True)
    write_tokenizer(tokenizer, directory)
    with open(os.path.join(directory, "tokenization_custom.py"), "w") as f:
        f.write(f"open({marker!r}, 'w').write('ran')\n"
                "from transformers import PreTrainedTokenizerFast\n"
                "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path) as f:
        cfg = json.load(f)
    cfg.update(tokenizer_class="CustomTokenizer",
               auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    with open(config_path, "w") as f:
        json.dump(cfg, f)


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def our_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < tol, f"max relative error {err:.3g} >= {tol}"


__all__ = ["train_spm", "hf_llama", "tiny_model_config", "our_logits", "hf_logits", "assert_close",
           "build_model", "RopeScaling"]
