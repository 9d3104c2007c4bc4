"""Decoupled-head attention (DHA) decoder for Hugging Face transformers (trust_remote_code).

Written beside the weights by polytron's exporter (``tools/convert_checkpoint.py to-hf``
of a ``model.arch=dha`` checkpoint); it imports only torch and transformers.

The model is a Llama decoder (RMSNorm, RoPE in the rotate-half layout, SwiGLU) whose
attention layer ``i`` has ``dha_key_heads[i]`` key heads and ``dha_value_heads[i]`` value
heads; query head ``h`` reads key head ``dha_key_map[i][h]`` and value head
``dha_value_map[i][h]`` (Chen et al. 2024, "DHA: Learning Decoupled-Head Attention from
Transformer Checkpoints via Adaptive Heads Fusion"). The cache keeps each layer's own
key and value heads, so it is ``sum_i (Gk_i + Gv_i) * head_dim`` values per token.
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


class DHALlamaConfig(LlamaConfig):
    """A Llama config plus ``dha_key_heads``, ``dha_value_heads``, ``dha_key_map``, ``dha_value_map``
    (per-layer lists)."""
    model_type = "dha_llama"


def _rope_spec(config) -> tuple[float, dict]:
    """(theta, scaling fields) from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = dict(getattr(config, "rope_scaling", None) or {})
    spec = {**legacy, **params}
    theta = float(spec.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return theta, spec


def rope_inv_freq(config) -> torch.Tensor:
    """Inverse frequencies (hd/2,) with linear or llama3 scaling (float64 math, float32 out)."""
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
    """positions (B, T) -> cos, sin (B, 1, T, hd)."""
    inv = rope_inv_freq(config).to(positions.device)                    # (hd/2,)
    freqs = positions.float()[..., None] * inv                          # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                             # (B, T, hd)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by position, rotate-half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DHARMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DHAMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DHAAttention(nn.Module):
    """Query heads read their layer's own key and value heads through two independent maps."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.key_map = list(config.dha_key_map[layer_idx])             # query head -> key head
        self.value_map = list(config.dha_value_map[layer_idx])         # query head -> value head
        d, hd, b = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=b)
        self.k_proj = nn.Linear(d, config.dha_key_heads[layer_idx] * hd, bias=b)
        self.v_proj = nn.Linear(d, config.dha_value_heads[layer_idx] * hd, bias=b)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=b)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)      # (B, Hq, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)      # (B, Gk, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)      # (B, Gv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)                         # (B, G, S, hd)
        k = k.index_select(1, torch.tensor(self.key_map, device=k.device))    # (B, Hq, S, hd)
        v = v.index_select(1, torch.tensor(self.value_map, device=v.device))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DHADecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = DHARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DHAAttention(config, layer_idx)
        self.post_attention_layernorm = DHARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DHAMLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DHALlamaPreTrainedModel(PreTrainedModel):
    config_class = DHALlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["DHADecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, DHARMSNorm):
            module.weight.data.fill_(1.0)


class DHALlamaModel(DHALlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DHADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DHARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds     # (B, T, d)
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        mask = _mask(attention_mask, B, T, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def _mask(attention_mask: Optional[torch.Tensor], B: int, T: int, past: int, device) -> Optional[torch.Tensor]:
    """None for plain causal attention over a fresh sequence, else bool (B, 1, T, past + T):
    causal over the cached positions and the new ones, padding (attention_mask 0) excluded."""
    S = past + T
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]   # (1, 1, T, S)
    if padded:
        allowed = allowed & attention_mask[:, None, None, -S:].bool()
        allowed = allowed | ~allowed.any(-1, keepdim=True)       # fully padded rows: attend anywhere
    return allowed.expand(B, 1, T, S)


class DHALlamaForCausalLM(DHALlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = DHALlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
