"""Hugging Face export of the ``dha`` architecture (no native transformers class).

Tensor names are Llama's (``model.layers.<i>.self_attn.k_proj`` holds the layer's
``Gk * hd`` key rows, ``v_proj`` its ``Gv * hd`` value rows; MoE layers use the
``polytron_moe`` names). ``config.json`` is a Llama config with ``model_type: dha_llama``,
the resolved per-layer head counts and maps (``dha_key_heads``, ``dha_value_heads``,
``dha_key_map``, ``dha_value_map``), the composition fields of :mod:`model.hf_remote`
and an ``auto_map`` to ``modeling_dha.py``: a self-contained modeling file (torch +
transformers only) assembled from the DHA attention piece (:mod:`model.dha.modeling_dha`)
and the pieces of the MLP and linear kinds the model uses, loaded with
``trust_remote_code=True``.
"""
from __future__ import annotations

from polytron.model.dha.config import DHAConfig, layer_heads
from polytron.model.hf import ConvertError, require_fields
from polytron.model.hf_remote import Family, RemoteAdapter, register_fields, register_piece
from polytron.model.llama.hf import _MUST_BE, llama_config_fields, llama_model_fields

MODEL_TYPE = "dha_llama"
REMOTE_FILE = "modeling_dha.py"
_FIELDS = ("dha_key_heads", "dha_value_heads", "dha_key_map", "dha_value_map")

register_piece("attention", "dha", "polytron.model.hf_remote.pieces:gqa", "polytron.model.dha.modeling_dha:dha")


def dha_fields(cfg) -> dict:
    """config.json fields of ``attention: dha``: the resolved per-layer head counts and maps."""
    heads = [layer_heads(cfg, i) for i in range(cfg.num_layers)]
    return {"dha_key_heads": [h.key_heads for h in heads], "dha_value_heads": [h.value_heads for h in heads],
            "dha_key_map": [list(h.key_map) for h in heads], "dha_value_map": [list(h.value_map) for h in heads]}


def dha_from_hf(hf: dict, file: str) -> dict:
    """``{"dha": DHAConfig}`` from :func:`dha_fields`'s fields."""
    missing = [k for k in _FIELDS if not isinstance(hf.get(k), list)]
    if missing:
        raise ConvertError(f"{file}: field '{missing[0]}' is missing or not a list")
    return {"dha": DHAConfig(key_heads=hf["dha_key_heads"], value_heads=hf["dha_value_heads"],
                             key_map=hf["dha_key_map"], value_map=hf["dha_value_map"])}


register_fields("dha", dha_fields, dha_from_hf)


class DHAAdapter(RemoteAdapter):
    """Llama tensor names; a DHA config; the assembled remote-code modeling file."""
    family = Family(MODEL_TYPE, REMOTE_FILE, "DHALlamaConfig", "DHALlamaForCausalLM")
    model_types = (MODEL_TYPE,)

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        fields = llama_config_fields(cfg)        # num_key_value_heads: unused, the dha_* lists rule
        return {**fields, **self.composition_fields(cfg),    # with dha_fields (attention: dha)
                "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
                "torch_dtype": dtype_name, "dtype": dtype_name}

    def from_hf_config(self, hf: dict, file: str):
        from polytron.model.config import ModelConfig
        from polytron.model.configlib import ConfigError
        require_fields(hf, file, _MUST_BE, ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads"))
        dha = dha_from_hf(hf, file)["dha"]
        try:
            cfg = ModelConfig(arch="dha", attention="dha", dha=dha, **llama_model_fields(hf, file),
                              **self.composition_from_hf(hf, file))
            cfg.validate()
        except (ValueError, ConfigError, TypeError) as e:
            raise ConvertError(f"{file}: {e}") from None
        return cfg
