"""Hugging Face export of YOCO: ``PolytronYOCOForCausalLM``, a ``trust_remote_code`` model.

transformers ships no YOCO, so ``to-hf`` writes ``modeling_polytron_yoco.py`` (the
self-contained file :mod:`model.yoco.hf_modeling`, imports only torch and transformers)
next to the weights, and ``config.json`` points ``auto_map`` at it. Every tensor is a
rename (:class:`~model.hf.NameMapAdapter`); ``from-hf`` reads such a directory back.
"""
from __future__ import annotations

import os

from polytron.model.hf import ConvertError, NameMapAdapter, require_fields

MODEL_TYPE = "polytron_yoco"
MODELING_FILE = "modeling_polytron_yoco.py"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling.py")

_MLP = {"mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_SWA = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj"}
_RETENTION = {**_SWA, "attention.wg": "self_attn.g_proj", "attention.wgt": "self_attn.gt_proj"}
_CROSS = {"attention.wq": "cross_attn.q_proj", "attention.wo": "cross_attn.o_proj"}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight", "shared_kv.norm.weight": "model.kv_layer.norm.weight",
        "shared_kv.proj.wk.weight": "model.kv_layer.k_proj.weight",
        "shared_kv.proj.wv.weight": "model.kv_layer.v_proj.weight"}
_TOP_BIAS = {"shared_kv.proj.wk.bias": "model.kv_layer.k_proj.bias",
             "shared_kv.proj.wv.bias": "model.kv_layer.v_proj.bias"}
_ROPE = {"none": "none", "linear": "linear", "llama3": "llama3"}


class YOCOAdapter(NameMapAdapter):
    """``PolytronYOCOForCausalLM`` (remote code): one rename per tensor."""
    model_types = (MODEL_TYPE,)

    def top(self, cfg) -> dict[str, str]:
        return {**_TOP, **(_TOP_BIAS if cfg.attention_bias else {})}

    def layer(self, cfg, index: int) -> dict[str, str]:
        if index >= cfg.yoco.num_self_layers(cfg):
            return {**_CROSS, **_MLP}
        return {**(_SWA if cfg.yoco.self_decoder == "swa" else _RETENTION), **_MLP}

    def tied(self, cfg) -> list[tuple[str, str]]:
        return [("output.weight", "tok_embeddings.weight")] if cfg.tie_embeddings else []

    def exportable(self, cfg) -> str:
        """Why ``cfg`` has no export ('' when it has one)."""
        if cfg.mlp != "swiglu" or cfg.linear != "linear":
            return f"mlp={cfg.mlp}, linear={cfg.linear} has no PolytronYOCOForCausalLM export (swiglu + linear)"
        return ""

    def remote_code(self, cfg) -> dict[str, str]:
        """{file name: source} of the modeling file ``config.json``'s ``auto_map`` names."""
        with open(SOURCE) as f:
            return {MODELING_FILE: f.read()}

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        y, sc = cfg.yoco, cfg.rope_scaling
        module = MODELING_FILE[:-3]
        return {
            "architectures": ["PolytronYOCOForCausalLM"], "model_type": MODEL_TYPE,
            "auto_map": {"AutoConfig": f"{module}.PolytronYOCOConfig",
                         "AutoModelForCausalLM": f"{module}.PolytronYOCOForCausalLM"},
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_self_layers": y.num_self_layers(cfg), "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "self_decoder": y.self_decoder, "yoco_sliding_window": y.sliding_window,
            "self_kv_heads": y.kv_heads(cfg), "retention_chunk": y.retention_chunk,
            "gate_logit_normalizer": y.gate_logit_normalizer, "rms_norm_eps": cfg.norm_eps,
            "rope_base": cfg.rope_theta, "rope_scaling_type": sc.type, "rope_scaling_factor": sc.factor,
            "rope_low_freq_factor": sc.low_freq_factor, "rope_high_freq_factor": sc.high_freq_factor,
            "rope_original_max_position_embeddings": sc.original_max_position_embeddings,
            "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.attention_bias,
            "mlp_bias": cfg.mlp_bias, "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "use_cache": False, "torch_dtype": dtype_name, "dtype": dtype_name,
        }

    def from_hf_config(self, hf: dict, file: str):
        from polytron.model.config import ModelConfig, RopeScaling
        from polytron.model.configlib import ConfigError
        from polytron.model.yoco.config import YOCOConfig
        require_fields(hf, file, {}, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_self_layers", "num_attention_heads", "num_key_value_heads",
                                      "head_dim", "yoco_sliding_window", "self_kv_heads"))
        rope = hf.get("rope_scaling_type", "none")
        if hf.get("self_decoder", "swa") not in ("swa", "retention"):
            raise ConvertError(f"{file}: field 'self_decoder'={hf['self_decoder']!r} is not supported (swa, retention)")
        if rope not in _ROPE:
            raise ConvertError(f"{file}: field 'rope_scaling_type'={rope!r} is not supported (none, linear, llama3)")
        try:
            cfg = ModelConfig(
                arch="yoco", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                ffn_hidden_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
                head_dim=hf["head_dim"], max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                rope_theta=float(hf.get("rope_base", 10000.0)),
                rope_scaling=RopeScaling(
                    type=rope, factor=float(hf.get("rope_scaling_factor", 1.0)),
                    low_freq_factor=float(hf.get("rope_low_freq_factor", 1.0)),
                    high_freq_factor=float(hf.get("rope_high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(hf.get("rope_original_max_position_embeddings", 8192))),
                norm_eps=float(hf.get("rms_norm_eps", 1e-5)), init_std=float(hf.get("initializer_range", 0.02)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
                yoco=YOCOConfig(self_decoder=hf.get("self_decoder", "swa"), self_layers=hf["num_self_layers"],
                                sliding_window=hf["yoco_sliding_window"], self_kv_heads=hf["self_kv_heads"],
                                retention_chunk=int(hf.get("retention_chunk", 64)),
                                gate_logit_normalizer=float(hf.get("gate_logit_normalizer", 16.0))))
            cfg.validate()
        except (ConfigError, ValueError, TypeError) as e:
            raise ConvertError(f"{file}: {e}") from None
        return cfg
