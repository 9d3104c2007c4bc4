"""Hugging Face ``BitNetForCausalLM`` (the released 2B4T model) <-> our ``bitnet`` architecture.

transformers' BitNet modeling file builds plain ``nn.Linear`` projections; the ternary
behaviour comes from the ``quantization_config`` (quant_method ``bitnet``), which swaps
them for the classes of ``transformers/integrations/bitnet.py`` when the model loads:

* the plain export (:class:`BitNetAdapter`) keeps the latent full-precision weights and
  selects ``AutoBitLinear`` in ``online`` mode, which quantizes weights (absmean) and
  activations (absmax, 8 bits) in every forward exactly as our BitLinear does;
* the packed export (:class:`PackedBitNetAdapter`, ``convert_checkpoint.py to-hf --packed``)
  writes each quantized projection as 2-bit ternary values (+1 offset, four per uint8
  along the output dimension; :func:`model.bitnet.quant.pack_ternary`) and a per-tensor
  ``weight_scale``, for an ``offline`` config. The two offline classes apply that scale
  in opposite directions: ``AutoBitLinear`` multiplies the output by it (it is
  ``beta = mean |W|``), ``BitLinear`` divides by it (it is ``1 / beta``). The written
  scale matches the class the config selects (``--packed autobitlinear``, the 2B4T
  release's choice and the default, or ``--packed bitlinear``).

Configs BitNetForCausalLM does not compute (the paper's ``gqa`` + ``swiglu`` with
``bitnet.linear_norm``, a ternary embedding, MoE MLPs, ...) export to the
``polytron_bitnet`` remote-code family (:class:`model.llama.hf.LlamaStackAdapter`: a Llama
config plus the composition fields, the modeling file assembled from the kinds' pieces);
the packed export stays BitNetForCausalLM's alone.

Projections of roles not in ``model.bitnet.quantize`` (the head by default) are listed
in ``modules_to_not_convert`` and stay ``nn.Linear``. ``bos_token_id`` / ``eos_token_id``
are always written (null without a tokenizer), because transformers' BitNet defaults
are Llama 3's ids.
"""
from __future__ import annotations

from typing import Any

import torch

from polytron.model.hf import ConvertError, NameMapAdapter, require_fields
from polytron.model.hf_remote import Family, RemoteFallback, register_fields, register_piece
from polytron.model.llama.hf import LlamaStackAdapter, llama_config_fields, llama_model_fields

#: The remote-code family of bitnet compositions BitNetForCausalLM does not compute.
REMOTE_TYPE = "polytron_bitnet"

_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "attention.sub_norm": "self_attn.attn_sub_norm",
    "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
    "mlp.sub_norm": "mlp.ffn_sub_norm",
    "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
#: Our projection role -> the transformers module name (suffix) it becomes.
ROLE_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj", "head": "lm_head"}
#: Our (module path inside a layer) -> role, for the quantized projections.
_LAYER_ROLES = {"attention.wq": "q", "attention.wk": "k", "attention.wv": "v", "attention.wo": "o",
                "mlp.w1": "gate", "mlp.w3": "up", "mlp.w2": "down"}
_MUST_BE = {"hidden_act": "relu2", "sliding_window": None, "layer_types": None, "mlp_bias": False}
LINEAR_CLASSES = ("autobitlinear", "bitlinear")

# ---------------------------------------------------------------- remote-code compositions
# BitLinear projections, and the 2B4T sub-norm kinds, in compositions BitNetForCausalLM does
# not compute (YOCO, DHA, MoE experts, ...): pieces of the assembled modeling file.
_PIECES = "polytron.model.bitnet.modeling_bitnet"
register_piece("linear", "bitlinear", f"{_PIECES}:bitlinear")
register_piece("attention", "gqa_subnorm", "polytron.model.hf_remote.pieces:gqa", f"{_PIECES}:subnorm")
register_piece("mlp", "relu2_subnorm", f"{_PIECES}:subnorm")


def bitlinear_fields(cfg) -> dict:
    """config.json fields of ``linear: bitlinear``: the roles it quantizes and the in-layer norm."""
    return {"quantized_roles": list(cfg.bitnet.quantize),
            "bitlinear_norm_eps": cfg.norm_eps if cfg.bitnet.linear_norm else None}


def bitlinear_from_hf(hf: dict, file: str) -> dict:
    """``{"bitnet": BitNetConfig}`` from :func:`bitlinear_fields`'s fields."""
    from polytron.model.bitnet.config import BitNetConfig
    roles = hf.get("quantized_roles")
    if not isinstance(roles, list):
        raise ConvertError(f"{file}: field 'quantized_roles' is missing or not a list (linear_kind=bitlinear)")
    return {"bitnet": BitNetConfig(quantize=list(roles), linear_norm=hf.get("bitlinear_norm_eps") is not None)}


register_fields("bitlinear", bitlinear_fields, bitlinear_from_hf)


class BitNetAdapter(RemoteFallback, NameMapAdapter):
    """``BitNetForCausalLM`` with latent weights (``AutoBitLinear``, online quantization) where the
    2B4T slots fit, else the ``polytron_bitnet`` remote-code family (the paper's variant with
    BitLinear's inner RMSNorm, a ternary embedding, MoE / MH-MoE MLPs, ...)."""
    model_types = ("bitnet", REMOTE_TYPE)
    remote = LlamaStackAdapter("bitnet", Family(REMOTE_TYPE, "modeling_polytron_bitnet.py",
                                                "PolytronBitNetConfig", "PolytronBitNetForCausalLM"))

    remote_code = RemoteFallback.remote_code     # the fallback's, not NameMapAdapter's None

    def top(self, cfg) -> dict[str, str]:
        return _TOP

    def layer(self, cfg, index: int) -> dict[str, str]:
        return _LAYER

    def tied(self, cfg) -> list[tuple[str, str]]:
        return [("output.weight", "tok_embeddings.weight")] if cfg.tie_embeddings else []

    # ------------------------------------------------------------ config

    def exportable(self, cfg) -> str:
        """Why ``cfg`` has no export ('' when it has one): the FAQ block has none."""
        return no_prenorm_misfit(cfg) or super().exportable(cfg)

    def native_misfit(self, cfg) -> str:
        """Why ``cfg`` has no ``BitNetForCausalLM`` export ('' when it has one)."""
        if no_prenorm_misfit(cfg):
            return no_prenorm_misfit(cfg)
        slots = (cfg.attention, cfg.mlp, cfg.linear)
        if slots != ("gqa_subnorm", "relu2_subnorm", "bitlinear"):
            return (f"attention={cfg.attention}, mlp={cfg.mlp}, linear={cfg.linear}: BitNetForCausalLM is "
                    "attention=gqa_subnorm, mlp=relu2_subnorm, linear=bitlinear (the 2B4T variant)")
        if cfg.bitnet.linear_norm:
            return "bitnet.linear_norm=true (the paper's RMSNorm inside BitLinear) is not BitNetForCausalLM's"
        if "embedding" in cfg.bitnet.quantize:
            return "a ternary embedding (bitnet.quantize has 'embedding') has no transformers equivalent"
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
            return (f"BitNetForCausalLM's attention sub-norm has hidden_size={cfg.hidden_size} channels; "
                    f"num_heads x head_dim = {cfg.num_heads * cfg.head_dim}")
        if cfg.mlp_bias:
            return "BitNetForCausalLM's MLP has no biases (mlp_bias=true)"
        return ""

    def quantization_config(self, cfg) -> dict[str, Any]:
        """The ``quantization_config`` section: online AutoBitLinear on the quantized roles."""
        return {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online",
                "modules_to_not_convert": not_converted(cfg), "use_rms_norm": False,
                "rms_norm_eps": cfg.norm_eps}

    def native_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        fields = llama_config_fields(cfg)
        fields.update(hidden_act="relu2")
        for key in ("mlp_bias", "pretraining_tp"):
            fields.pop(key, None)
        return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", **fields,
                "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": True,
                "quantization_config": self.quantization_config(cfg),
                "torch_dtype": dtype_name, "dtype": dtype_name}

    def native_from_config(self, hf: dict, file: str):
        return self.model_config(hf, file, latent_roles(hf.get("quantization_config"), file))

    def native_to_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return NameMapAdapter.to_hf_tensors(self, cfg, tensors)

    def native_from_tensors(self, cfg, hf: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
        return NameMapAdapter.from_hf_tensors(self, cfg, hf, src)

    def model_config(self, hf: dict, file: str, quantize: list[str]):
        """Our ModelConfig for a ``bitnet`` config.json whose quantized roles are ``quantize``."""
        from polytron.model.bitnet.config import BitNetConfig
        from polytron.model.config import ModelConfig
        require_fields(hf, file, _MUST_BE, ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads"))
        fields = llama_model_fields(hf, file)
        fields.pop("mlp_bias")
        cfg = ModelConfig(arch="bitnet", attention="gqa_subnorm", mlp="relu2_subnorm", linear="bitlinear",
                          bitnet=BitNetConfig(quantize=quantize), **fields)
        try:
            cfg.validate()
        except ValueError as e:
            raise ConvertError(f"{file}: {e}") from None
        why = self.native_misfit(cfg)
        if why:
            raise ConvertError(f"{file}: {why}")
        return cfg

    def packed(self, linear_class: str) -> "PackedBitNetAdapter":
        """The packed-export variant for transformers class ``linear_class``."""
        if linear_class not in LINEAR_CLASSES:
            raise ConvertError(f"--packed {linear_class!r}: choose one of {', '.join(LINEAR_CLASSES)}")
        return PackedBitNetAdapter(linear_class)


def no_prenorm_misfit(cfg) -> str:
    """Why the FAQ block (``bitnet.block_prenorm: false``) does not export ('' for other models):
    BitNetForCausalLM and the remote-code Llama stack always apply their input and
    post-attention RMSNorms, and a norm with gain 1 still normalizes."""
    if cfg.bitnet.block_prenorm:
        return ""
    return ("bitnet.block_prenorm=false (the FAQ block without pre-norms) has no Hugging Face export: "
            "the exported blocks always normalize their input")


def not_converted(cfg) -> list[str]:
    """transformers module names (suffixes) of the projections we keep full precision."""
    return [ROLE_MODULES[r] for r in ROLE_MODULES if r not in cfg.bitnet.quantize]


def latent_roles(qc, file: str) -> list[str]:
    """Our ``bitnet.quantize`` from a latent-weight (online AutoBitLinear) quantization_config."""
    if not qc:
        raise ConvertError(f"{file}: field 'quantization_config' is missing: without it transformers runs "
                           "BitNetForCausalLM with full-precision linears, which is not a BitNet model")
    if qc.get("quant_method") != "bitnet":
        raise ConvertError(f"{file}: field 'quantization_config.quant_method'={qc.get('quant_method')!r} "
                           "is not supported (must be 'bitnet')")
    if qc.get("quantization_mode") != "online" or qc.get("linear_class") != "autobitlinear":
        raise ConvertError(f"{file}: field 'quantization_config' selects {qc.get('linear_class')!r} in "
                           f"{qc.get('quantization_mode')!r} mode: only latent weights (autobitlinear, online) "
                           "continue training; a packed model loads with model.bitnet.packed.load_packed")
    return quantized_roles(qc, file)


def quantized_roles(qc: dict, file: str) -> list[str]:
    """The roles a BitNet quantization_config converts (all but ``modules_to_not_convert``)."""
    if qc.get("use_rms_norm"):
        raise ConvertError(f"{file}: field 'quantization_config.use_rms_norm'=true is not supported")
    skipped = qc.get("modules_to_not_convert")
    skipped = ["lm_head"] if skipped is None else skipped
    unknown = [m for m in skipped if m not in ROLE_MODULES.values()]
    if unknown:
        raise ConvertError(f"{file}: field 'quantization_config.modules_to_not_convert' entry {unknown[0]!r} "
                           f"is not supported (supported: {', '.join(ROLE_MODULES.values())})")
    return [r for r, m in ROLE_MODULES.items() if m not in skipped]


class PackedBitNetAdapter(BitNetAdapter):
    """``BitNetForCausalLM`` with 2-bit packed ternary weights (offline quantization)."""

    def __init__(self, linear_class: str = "autobitlinear"):
        self.linear_class = linear_class

    def uses_remote(self, cfg) -> bool:
        return False                    # packed weights are BitNetForCausalLM's alone

    def exportable(self, cfg) -> str:
        why = self.native_misfit(cfg)
        if why:
            return why
        widths = {"q": cfg.num_heads * cfg.head_dim, "k": cfg.num_kv_heads * cfg.head_dim,
                  "v": cfg.num_kv_heads * cfg.head_dim, "o": cfg.hidden_size, "gate": cfg.ffn_hidden_size,
                  "up": cfg.ffn_hidden_size, "down": cfg.hidden_size, "head": cfg.vocab_size}
        for role, width in widths.items():
            if role in cfg.bitnet.quantize and width % 4:
                return (f"packed export: {ROLE_MODULES[role]} has {width} output rows; transformers' packed "
                        "BitNet layers need a multiple of 4")
        if "head" in cfg.bitnet.quantize and cfg.tie_embeddings:
            return "packed export: a ternary head tied to the (full-precision) embedding cannot be packed"
        return ""

    def quantization_config(self, cfg) -> dict[str, Any]:
        return {**super().quantization_config(cfg), "linear_class": self.linear_class,
                "quantization_mode": "offline"}

    def to_hf_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from polytron.model.bitnet.quant import pack_ternary, ternary, weight_scale
        out = super().to_hf_tensors(cfg, tensors)
        for name in quantized_weights(cfg, tensors):
            hf = self.to_hf_name(cfg, name)
            w = tensors[name]
            beta = weight_scale(w)                                       # fp32 scalar
            out[hf] = pack_ternary(ternary(w, beta))                     # (ceil(out/4), in) uint8
            base = hf[:-len(".weight")]
            out[base + ".weight_scale"] = self.scale_tensor(beta)         # (1,)
            if base + ".bias" in out and self.linear_class == "autobitlinear":
                out[base + ".bias"] = out[base + ".bias"].float() / beta  # AutoBitLinear scales the bias too
        return out

    def scale_tensor(self, beta: torch.Tensor) -> torch.Tensor:
        """The stored ``weight_scale``: beta for AutoBitLinear (multiplies), 1 / beta for BitLinear (divides)."""
        return (beta if self.linear_class == "autobitlinear" else 1.0 / beta).reshape(1)


def quantized_weights(cfg, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Our names of the weights BitLinear quantizes (layer projections of quantized roles, the head
    when ``head`` is quantized and not tied)."""
    import re
    names = []
    for name in tensors:
        m = re.match(r"^layers\.\d+\.(.+)\.weight$", name)
        if m and _LAYER_ROLES.get(m.group(1)) in cfg.bitnet.quantize:
            names.append(name)
    if "head" in cfg.bitnet.quantize and "output.weight" in tensors and not cfg.tie_embeddings:
        names.append("output.weight")
    return names
