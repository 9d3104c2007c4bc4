"""Hugging Face export of YOCO: ``PolytronYOCOForCausalLM``, a ``trust_remote_code`` model.

transformers ships no YOCO, so ``to-hf`` writes ``modeling_polytron_yoco.py`` next to the
weights, assembled (:mod:`model.hf_remote`) from YOCO's pieces (:mod:`model.yoco.hf_modeling`:
sliding window or retention, the shared key/value, the cross-decoder) and the pieces of
the MLP and linear kinds the model uses (SwiGLU, MoE / MH-MoE, BitLinear, ...);
``config.json``'s ``auto_map`` points at it. Every tensor is a rename
(:class:`~model.hf_remote.RemoteAdapter`); ``from-hf`` reads such a directory back.
"""
from __future__ import annotations

from polytron.model.hf import ConvertError, require_fields
from polytron.model.hf_remote import Family, RemoteAdapter, register_piece
from polytron.model.yoco.rope import FREQUENCIES, PAIRINGS

MODEL_TYPE = "polytron_yoco"
MODELING_FILE = "modeling_polytron_yoco.py"
_PIECES = "polytron.model.yoco.hf_modeling"
_ROPE = ("none", "linear", "llama3")

register_piece("attention", "swa", f"{_PIECES}:yoco_rope", f"{_PIECES}:swa")
register_piece("attention", "retention", f"{_PIECES}:yoco_rope", f"{_PIECES}:retention")
register_piece("stack", "yoco", f"{_PIECES}:yoco_rope", f"{_PIECES}:yoco_stack")


class YOCOAdapter(RemoteAdapter):
    """``PolytronYOCOForCausalLM`` (remote code): one rename per tensor."""
    family = Family(MODEL_TYPE, MODELING_FILE, "PolytronYOCOConfig", "PolytronYOCOForCausalLM", stack="yoco")
    model_types = (MODEL_TYPE,)

    def layer_kinds(self, cfg) -> list[tuple[str, str]]:
        from polytron.model.layers import layer_mlp
        S = cfg.yoco.num_self_layers(cfg)
        return [(cfg.yoco.self_decoder if i < S else "cross", layer_mlp(cfg, i)) for i in range(cfg.num_layers)]

    def kinds(self, cfg) -> dict[str, list[str]]:
        kinds = super().kinds(cfg)
        kinds["attention"] = [k for k in kinds["attention"] if k != "cross"]      # part of the yoco stack
        return kinds

    def exportable(self, cfg) -> str:
        """Why ``cfg`` has no export ('' when it has one)."""
        if cfg.yoco.rope_frequencies == "released" and cfg.rope_scaling.type != "none":
            return (f"model.yoco.rope_frequencies=released with rope_scaling.type={cfg.rope_scaling.type}: "
                    "the exported modeling file scales only the standard frequencies")
        return super().exportable(cfg)

    def attention_module(self, cfg, index: int) -> str:
        return "self_attn" if index < cfg.yoco.num_self_layers(cfg) else "cross_attn"

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        y, sc = cfg.yoco, cfg.rope_scaling
        return {
            **self.composition_fields(cfg),
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
            "rope_pairing": y.rope_pairing, "rope_frequencies": y.rope_frequencies,
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
        for key, allowed in (("rope_pairing", PAIRINGS), ("rope_frequencies", FREQUENCIES)):
            if hf.get(key, allowed[0]) not in allowed:
                raise ConvertError(f"{file}: field {key!r}={hf[key]!r} is not supported ({', '.join(allowed)})")
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
                                gate_logit_normalizer=float(hf.get("gate_logit_normalizer", 16.0)),
                                rope_pairing=hf.get("rope_pairing", "rotate_half"),
                                rope_frequencies=hf.get("rope_frequencies", "standard")),
                **self.composition_from_hf(hf, file))
            cfg.validate()
        except (ConfigError, ValueError, TypeError) as e:
            raise ConvertError(f"{file}: {e}") from None
        return cfg
