"""Hugging Face export of the ``dha`` architecture (no native transformers class).

Tensor names are Llama's (``model.layers.<i>.self_attn.k_proj`` holds the layer's
``Gk * hd`` key rows, ``v_proj`` its ``Gv * hd`` value rows), so the tensor half is the
Llama rename table. ``config.json`` is a Llama config with ``model_type: dha_llama``,
the resolved per-layer head counts and maps (``dha_key_heads``, ``dha_value_heads``,
``dha_key_map``, ``dha_value_map``) and an ``auto_map`` to ``modeling_dha.py``, a
self-contained modeling file (torch + transformers only) written beside the weights,
loaded with ``trust_remote_code=True``.
"""
from __future__ import annotations

import os

from polytron.model.dha.config import DHAConfig, layer_heads
from polytron.model.hf import ConvertError, require_fields
from polytron.model.llama.hf import _MUST_BE, LlamaAdapter, llama_config_fields, llama_model_fields

MODEL_TYPE = "dha_llama"
REMOTE_FILE = "modeling_dha.py"
_FIELDS = ("dha_key_heads", "dha_value_heads", "dha_key_map", "dha_value_map")


class DHAAdapter(LlamaAdapter):
    """Llama tensor names; a DHA config; the remote-code modeling file."""
    model_types = (MODEL_TYPE,)

    def exportable(self, cfg) -> str:
        """Why ``cfg`` has no DHA export ('' when it has one)."""
        if cfg.attention != "dha" or cfg.mlp != "swiglu" or cfg.linear != "linear":
            return (f"attention={cfg.attention}, mlp={cfg.mlp}, linear={cfg.linear}: the DHA export "
                    "covers attention=dha, mlp=swiglu, linear=linear")
        return ""

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        heads = [layer_heads(cfg, i) for i in range(cfg.num_layers)]
        fields = llama_config_fields(cfg)        # num_key_value_heads: unused, the lists rule
        return {"architectures": ["DHALlamaForCausalLM"], "model_type": MODEL_TYPE,
                "auto_map": {"AutoConfig": "modeling_dha.DHALlamaConfig",
                             "AutoModelForCausalLM": "modeling_dha.DHALlamaForCausalLM"},
                **fields,
                "dha_key_heads": [h.key_heads for h in heads], "dha_value_heads": [h.value_heads for h in heads],
                "dha_key_map": [list(h.key_map) for h in heads],
                "dha_value_map": [list(h.value_map) for h in heads],
                "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
                "torch_dtype": dtype_name, "dtype": dtype_name}

    def from_hf_config(self, hf: dict, file: str):
        from polytron.model.config import ModelConfig
        from polytron.model.configlib import ConfigError
        require_fields(hf, file, _MUST_BE, ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads"))
        missing = [k for k in _FIELDS if not isinstance(hf.get(k), list)]
        if missing:
            raise ConvertError(f"{file}: field '{missing[0]}' is missing or not a list")
        dha = DHAConfig(key_heads=hf["dha_key_heads"], value_heads=hf["dha_value_heads"],
                        key_map=hf["dha_key_map"], value_map=hf["dha_value_map"])
        cfg = ModelConfig(arch="dha", attention="dha", dha=dha, **llama_model_fields(hf, file))
        try:
            cfg.validate()
        except (ValueError, ConfigError) as e:
            raise ConvertError(f"{file}: {e}") from None
        return cfg

    def remote_code(self, cfg) -> dict[str, str]:
        """``{modeling_dha.py: source}``: the self-contained transformers model."""
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), REMOTE_FILE)) as f:
            return {REMOTE_FILE: f.read()}
