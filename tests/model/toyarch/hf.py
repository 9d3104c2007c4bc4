"""The toy architecture's Hugging Face adapter: a Llama-shaped name map (model_type
``polytron_toy``; no transformers class computes it, so it converts tensors and config only)."""
from __future__ import annotations

from polytron.model.hf import ConvertError, NameMapAdapter

MODEL_TYPE = "polytron_toy"
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
          "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
          "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
          "mlp.up": "mlp.up_proj", "mlp.inner_norm": "mlp.inner_norm", "mlp.down": "mlp.down_proj"}
_SHAPE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "ffn_hidden_size", "max_seq_len", "rope_theta", "norm_eps", "init_std", "tie_embeddings",
          "attention_bias", "mlp_bias")


class ToyAdapter(NameMapAdapter):
    model_types = (MODEL_TYPE,)

    def top(self, cfg) -> dict[str, str]:
        return _TOP

    def layer(self, cfg, index: int) -> dict[str, str]:
        return _LAYER

    def tied(self, cfg) -> list[tuple[str, str]]:
        return [("output.weight", "tok_embeddings.weight")] if cfg.tie_embeddings else []

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        return {"architectures": ["PolytronToyForCausalLM"], "model_type": MODEL_TYPE,
                **{k: getattr(cfg, k) for k in _SHAPE}, "toy_inner_mult": cfg.toy.inner_mult,
                "toy_out_scale": cfg.toy.out_scale, "bos_token_id": bos_id, "eos_token_id": eos_id,
                "torch_dtype": dtype_name}

    def from_hf_config(self, hf: dict, file: str):
        from polytron.model.config import ModelConfig
        try:
            cfg = ModelConfig(arch="toy", plugins=["tests.model.toyarch"], **{k: hf[k] for k in _SHAPE},
                              toy={"inner_mult": hf["toy_inner_mult"], "out_scale": hf["toy_out_scale"]})
            cfg.validate()
        except (KeyError, ValueError) as e:
            raise ConvertError(f"{file}: {type(e).__name__}: {e}") from None
        return cfg
