"""Shared pieces of the assembled remote-code modeling file (see :mod:`model.hf_remote`).

Each ``# piece: <name>`` section below is copied verbatim into an export's modeling file
when the spec uses it; the imports above the first section are for reading this file
as a module (lint, tests) and are replaced by the assembled file's own header, which
imports only torch and transformers. Names shared by all pieces (``ATTENTIONS``,
``MLPS``, ``LINEARS``, ``LINEAR_FNS``, ``make_linear``, ``RMSNorm``, ``apply_rope``,
``attend``) come from the ``base`` section.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# piece: base
#: Layer kinds of this file by name (config.json's ``layer_attention`` / ``layer_mlp``).
ATTENTIONS: dict = {}
MLPS: dict = {}
#: Linear kind -> module factory (config, in, out, bias, role), and -> function (x, weight, bias).
LINEARS: dict = {"linear": lambda config, i, o, bias, role: nn.Linear(i, o, bias=bias)}
LINEAR_FNS: dict = {"linear": lambda config, x, w, b: F.linear(x, w, b)}
#: Linear kind -> input embedding factory (config), used when ``quantized_roles`` lists ``embedding``.
EMBEDDINGS: dict = {"linear": lambda config: nn.Embedding(config.vocab_size, config.hidden_size)}


def _quantized(config, role: str) -> bool:
    """Whether projections of ``role`` use the config's linear kind (others stay plain)."""
    roles = getattr(config, "quantized_roles", None)
    return roles is None or role in roles


def linear_kind(config, role: str) -> str:
    kind = getattr(config, "linear_kind", "linear") or "linear"
    return kind if _quantized(config, role) else "linear"


def make_linear(config, in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
    """A projection of the config's linear kind for ``role`` (q k v o gate up down proj head)."""
    return LINEARS[linear_kind(config, role)](config, in_features, out_features, bias, role)


def make_embedding(config) -> nn.Module:
    """The input embedding: plain unless ``quantized_roles`` lists ``embedding`` (then the linear kind's)."""
    roles = getattr(config, "quantized_roles", None) or []
    kind = (getattr(config, "linear_kind", "linear") or "linear") if "embedding" in roles else "linear"
    return EMBEDDINGS[kind](config)


def linear_fn(config, role: str):
    """``fn(x, weight, bias)`` of the linear kind for ``role`` (stacked expert weights)."""
    fn = LINEAR_FNS[linear_kind(config, role)]
    return lambda x, w, b=None: fn(config, x, w, b)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMSNorm, mean square summed in float64 and rounded once."""
    x32 = x.float()
    ms = x32.pow(2).sum(-1, keepdim=True, dtype=torch.float64) / x.shape[-1]      # (..., 1)
    return (x32 * torch.rsqrt(ms + eps).float()).to(x.dtype)


def _rope_spec(config) -> tuple[float, dict]:
    """(theta, scaling fields) from ``rope_parameters`` / ``rope_scaling`` or the YOCO fields."""
    if hasattr(config, "rope_scaling_type"):
        return float(config.rope_base), {
            "rope_type": {"none": "default"}.get(config.rope_scaling_type, config.rope_scaling_type),
            "factor": config.rope_scaling_factor, "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position_embeddings}
    params = dict(getattr(config, "rope_parameters", None) or {})
    spec = {**dict(getattr(config, "rope_scaling", None) or {}), **params}
    return float(spec.get("rope_theta", getattr(config, "rope_theta", 10000.0))), spec


def rope_inv_freq(config) -> torch.Tensor:
    """(hd/2,) inverse frequencies, with linear or llama3 scaling (float64 math, float32 out)."""
    hd = config.head_dim
    theta, spec = _rope_spec(config)
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    kind = spec.get("rope_type", spec.get("type", "default")) or "default"
    if kind == "linear":
        inv = inv / spec["factor"]
    elif kind == "llama3":
        factor, low, high = spec["factor"], spec["low_freq_factor"], spec["high_freq_factor"]
        old = spec["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported by this model file")
    return inv.float()


def rope_cos_sin(config, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, 1, hd)."""
    freqs = positions.float()[..., None] * rope_inv_freq(config).to(positions.device)   # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]                               # (B, T, 1, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by position, rotate-half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Causal attention (B, Hq, T, hd) over (B, Hkv, S, hd); ``mask`` bool (B, 1, T, S) or None."""
    gqa = q.shape[1] != k.shape[1]
    T, S = q.shape[2], k.shape[2]
    if mask is None and S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)       # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def padding_mask(attention_mask: Optional[torch.Tensor], B: int, T: int, past: int, device) -> Optional[torch.Tensor]:
    """None for plain causal attention over a fresh sequence, else bool (B, 1, T, past + T):
    causal over the cached positions and the new ones, padding (attention_mask 0) excluded."""
    S = past + T
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]   # (1, 1, T, S)
    if padded:
        assert attention_mask is not None
        allowed = allowed & attention_mask[:, None, None, -S:].bool()
        allowed = allowed | ~allowed.any(-1, keepdim=True)       # fully padded rows: attend anywhere
    return allowed.expand(B, 1, T, S)


def init_module(module: nn.Module, std: float) -> None:
    """Fresh weights (transformers' ``_init_weights``): normal linears and embeddings, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, RMSNorm):
        module.weight.data.fill_(1.0)


# piece: gqa
class Attention(nn.Module):
    """Grouped-query attention, RoPE, with a DynamicCache (``attention: gqa``)."""

    def __init__(self, config, layer_idx: int, kv_heads: Optional[tuple[int, int]] = None):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, config.head_dim
        kh, vh = kv_heads or (config.num_key_value_heads, config.num_key_value_heads)
        d, hd, b = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = make_linear(config, d, config.num_attention_heads * hd, b, "q")
        self.k_proj = make_linear(config, d, kh * hd, b, "k")
        self.v_proj = make_linear(config, d, vh * hd, b, "v")
        self.o_proj = make_linear(config, config.num_attention_heads * hd, d, b, "o")

    def project(self, x, cos, sin, cache):
        """(B, T, d) -> q (B, Hq, T, hd), k (B, Hk, S, hd), v (B, Hv, S, hd) with the cache's past."""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return q, k, v

    def mix(self, q, k, v, mask) -> torch.Tensor:
        """(B, T, Hq*hd): attention output before the output projection."""
        y = attend(q, k, v, mask)                                            # (B, Hq, T, hd)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def forward(self, x, cos, sin, mask, cache):
        return self.o_proj(self.mix(*self.project(x, cos, sin, cache), mask))


ATTENTIONS["gqa"] = Attention


# piece: swiglu
class SwiGLU(nn.Module):
    """down(silu(gate x) * up x) (``mlp: swiglu``; also the MoE shared experts)."""

    def __init__(self, config, width: int, inner: int):
        super().__init__()
        b = config.mlp_bias
        self.gate_proj = make_linear(config, width, inner, b, "gate")
        self.up_proj = make_linear(config, width, inner, b, "up")
        self.down_proj = make_linear(config, inner, width, b, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


MLPS["swiglu"] = lambda config, i: SwiGLU(config, config.hidden_size, config.intermediate_size)


# piece: llama_stack
class LlamaStackConfig(LlamaConfig):
    """A Llama config plus the composition: ``layer_attention`` / ``layer_mlp`` (kind per
    layer), ``linear_kind`` and ``quantized_roles``, and each kind's own fields."""
    model_type = "polytron_llama"


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ATTENTIONS[config.layer_attention[layer_idx]](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLPS[config.layer_mlp[layer_idx]](config, layer_idx)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStackPreTrainedModel(PreTrainedModel):
    config_class = LlamaStackConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        init_module(module, self.config.initializer_range)


class LlamaStackModel(LlamaStackPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = make_embedding(config)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds     # (B, T, d)
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)                     # (B, T, 1, hd)
        mask = padding_mask(attention_mask, B, T, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


class LlamaStackForCausalLM(LlamaStackPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaStackModel(config)
        self.lm_head = make_linear(config, config.hidden_size, config.vocab_size, False, "head")
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        x = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{field: cache})
