"""Hugging Face ``LlamaForCausalLM`` (and Mistral without sliding window) <-> our dense decoder.

Configs whose slots ``LlamaForCausalLM`` does not compute (``mlp: moe`` / ``mh_moe``,
``attention: dha``, ``linear: bitlinear``, ...) export to the ``polytron_llama``
remote-code family instead: a Llama config plus the composition fields and the modeling
file assembled from the kinds' pieces (:mod:`model.hf_remote`), same tensor names.

Both sides use the rotate-half RoPE layout, so q/k weights copy without permutation.
RoPE is written both the transformers 5 way (``rope_parameters``) and the 4.x way
(``rope_theta`` + ``rope_scaling``).
"""
from __future__ import annotations

from typing import Any

import torch

from polytron.model.hf import ConvertError, NameMapAdapter, require_fields
from polytron.model.hf_remote import Family, RemoteAdapter, RemoteFallback

#: The remote-code family of llama compositions without a native class.
REMOTE_TYPE = "polytron_llama"

_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}

#: Fields that change the function of a Llama model and that our model cannot express,
#: with the value it must have (None: the field must be absent or null).
_MUST_BE = {"hidden_act": "silu", "sliding_window": None, "use_sliding_window": False,
            "quantization_config": None, "layer_types": None, "no_rope_layers": None,
            "attn_logit_softcapping": None, "final_logit_softcapping": None}


def rope_to_hf(m) -> tuple[dict, Any]:
    """(rope_parameters, legacy rope_scaling) for our config ``m``."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    sc = m.rope_scaling
    if sc.type == "linear":
        rope.update(rope_type="linear", factor=sc.factor)
    elif sc.type == "llama3":
        rope.update(rope_type="llama3", factor=sc.factor, low_freq_factor=sc.low_freq_factor,
                    high_freq_factor=sc.high_freq_factor,
                    original_max_position_embeddings=sc.original_max_position_embeddings)
    legacy = None if sc.type == "none" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return rope, legacy


def rope_from_hf(hf: dict, file: str):
    """(rope_theta, RopeScaling) from either the 5.x or the 4.x RoPE fields."""
    from polytron.model.config import RopeScaling
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    field_name = "rope_parameters" if params else "rope_scaling"
    spec = {**legacy, **params}
    theta = float(spec.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = spec.get("rope_type", spec.get("type", "default")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(spec["factor"]))
    if kind == "llama3":
        try:
            return theta, RopeScaling(
                type="llama3", factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
                high_freq_factor=float(spec["high_freq_factor"]),
                original_max_position_embeddings=int(spec["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConvertError(f"{file}: field '{field_name}' (llama3) lacks {e.args[0]!r}") from None
    raise ConvertError(f"{file}: field '{field_name}.rope_type'={kind!r} is not supported "
                       "(supported: default, linear, llama3)")


def llama_config_fields(m) -> dict:
    """The ``LlamaConfig`` fields of our config ``m`` (shared by the Llama-family adapters)."""
    rope, legacy = rope_to_hf(m)
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim, "max_position_embeddings": m.max_seq_len,
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "initializer_range": m.init_std,
        "rope_theta": m.rope_theta, "rope_scaling": legacy, "rope_parameters": rope,
        "attention_bias": m.attention_bias, "mlp_bias": m.mlp_bias, "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
    }


def llama_model_fields(hf: dict, file: str) -> dict:
    """Our ModelConfig fields from a Llama-family ``config.json``."""
    theta, scaling = rope_from_hf(hf, file)
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden_size=hf["intermediate_size"], max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)))


class LlamaStackAdapter(RemoteAdapter):
    """The remote-code family of an architecture on the Llama skeleton (``arch``), for
    compositions no transformers class computes: a Llama config plus the composition fields
    (:mod:`model.hf_remote`), tensors under Llama's names."""

    def __init__(self, arch: str, family: Family):
        self.arch, self.family, self.model_types = arch, family, (family.model_type,)

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        return {**llama_config_fields(cfg), **self.composition_fields(cfg), "bos_token_id": bos_id,
                "eos_token_id": eos_id, "use_cache": True, "torch_dtype": dtype_name, "dtype": dtype_name}

    def from_hf_config(self, hf: dict, file: str):
        from polytron.model.config import ModelConfig
        from polytron.model.configlib import ConfigError
        require_fields(hf, file, _MUST_BE, ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads"))
        try:
            cfg = ModelConfig(arch=self.arch, **llama_model_fields(hf, file),
                              **self.composition_from_hf(hf, file, attention=True))
            cfg.validate()
        except (ValueError, ConfigError, TypeError) as e:
            raise ConvertError(f"{file}: {e}") from None
        return cfg


class LlamaAdapter(RemoteFallback, NameMapAdapter):
    """``LlamaForCausalLM`` (one rename per tensor) where its slots fit (gqa + swiglu + linear),
    else the ``polytron_llama`` remote-code family (MoE / MH-MoE MLPs, DHA attention,
    BitLinear projections, ...)."""
    model_types = ("llama", "mistral", REMOTE_TYPE)
    remote = LlamaStackAdapter("llama", Family(REMOTE_TYPE, "modeling_polytron_llama.py",
                                               "PolytronLlamaConfig", "PolytronLlamaForCausalLM"))

    remote_code = RemoteFallback.remote_code     # the fallback's, not NameMapAdapter's None

    def top(self, cfg) -> dict[str, str]:
        return _TOP

    def layer(self, cfg, index: int) -> dict[str, str]:
        return _LAYER

    def tied(self, cfg) -> list[tuple[str, str]]:
        return [("output.weight", "tok_embeddings.weight")] if cfg.tie_embeddings else []

    def native_misfit(self, cfg) -> str:
        """Why ``cfg`` has no ``LlamaForCausalLM`` export ('' when it has one)."""
        if cfg.attention != "gqa" or cfg.mlp != "swiglu" or cfg.linear != "linear":
            return (f"attention={cfg.attention}, mlp={cfg.mlp}, linear={cfg.linear} has no "
                    "LlamaForCausalLM export")
        return ""

    def native_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **llama_config_fields(cfg),
                "bos_token_id": bos_id, "eos_token_id": eos_id, "pretraining_tp": 1, "use_cache": True,
                "torch_dtype": dtype_name, "dtype": dtype_name}

    def native_from_config(self, hf: dict, file: str):
        from polytron.model.config import ModelConfig
        require_fields(hf, file, _MUST_BE, ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads"))
        cfg = ModelConfig(arch="llama", **llama_model_fields(hf, file))
        try:
            cfg.validate()
        except ValueError as e:
            raise ConvertError(f"{file}: {e}") from None
        return cfg

    def native_to_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return NameMapAdapter.to_hf_tensors(self, cfg, tensors)

    def native_from_tensors(self, cfg, hf: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
        return NameMapAdapter.from_hf_tensors(self, cfg, hf, src)
