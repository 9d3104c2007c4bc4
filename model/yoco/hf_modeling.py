"""YOCO (You Only Cache Once, Sun et al. 2024) for Hugging Face transformers.

Written by polytron's checkpoint converter (``tools/convert_checkpoint.py to-hf``) next to
the weights of a ``model.arch=yoco`` model; load with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. It imports only
torch and transformers.

A self-decoder (sliding-window attention or gated retention) is followed by one key/value
projection of its output (``model.kv_layer``), which every cross-decoder layer attends to.
This file is a plain reference implementation: full-sequence forwards (generation
recomputes the sequence: no key/value cache), sliding windows and retention computed in
their quadratic masked forms. Padded batches are not supported.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class PolytronYOCOConfig(PretrainedConfig):
    """Shape of a polytron YOCO model."""
    model_type = "polytron_yoco"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 1024, intermediate_size: int = 2816,
                 num_hidden_layers: int = 8, num_self_layers: int = 4, num_attention_heads: int = 8,
                 num_key_value_heads: int = 8, head_dim: int = 128, self_decoder: str = "swa",
                 yoco_sliding_window: int = 1024, self_kv_heads: int = 8, gate_logit_normalizer: float = 16.0,
                 rms_norm_eps: float = 1e-5, rope_base: float = 10000.0, rope_scaling_type: str = "none",
                 rope_scaling_factor: float = 1.0, rope_low_freq_factor: float = 1.0,
                 rope_high_freq_factor: float = 4.0, rope_original_max_position_embeddings: int = 8192,
                 max_position_embeddings: int = 2048, attention_bias: bool = False, mlp_bias: bool = False,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_self_layers = num_hidden_layers, num_self_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim, self.self_decoder, self.self_kv_heads = head_dim, self_decoder, self_kv_heads
        self.yoco_sliding_window, self.gate_logit_normalizer = yoco_sliding_window, gate_logit_normalizer
        self.rms_norm_eps, self.rope_base = rms_norm_eps, rope_base
        self.rope_scaling_type, self.rope_scaling_factor = rope_scaling_type, rope_scaling_factor
        self.rope_low_freq_factor, self.rope_high_freq_factor = rope_low_freq_factor, rope_high_freq_factor
        self.rope_original_max_position_embeddings = rope_original_max_position_embeddings
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias, self.mlp_bias, self.initializer_range = attention_bias, mlp_bias, initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ---------------------------------------------------------------- pieces

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def inv_frequencies(c: PolytronYOCOConfig) -> torch.Tensor:
    """RoPE inverse frequencies (hd/2,) with linear or Llama-3 scaling."""
    inv = 1.0 / (c.rope_base ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    if c.rope_scaling_type == "linear":
        inv = inv / c.rope_scaling_factor
    elif c.rope_scaling_type == "llama3":
        orig, factor = c.rope_original_max_position_embeddings, c.rope_scaling_factor
        low, high = c.rope_low_freq_factor, c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (orig / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > orig / low, inv / factor, inv)
        mid = (wavelen <= orig / low) & (wavelen >= orig / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of (B, T, H, hd) with cos/sin (B, T, 1, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attention(q, k, v, allowed) -> torch.Tensor:
    """Softmax attention (B, H, T, hd) x (B, Hkv, S, hd) under a bool mask (T, S)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class MLP(nn.Module):
    def __init__(self, c: PolytronYOCOConfig):
        super().__init__()
        b = c.mlp_bias
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SlidingWindowAttention(nn.Module):
    """Causal attention to the last ``yoco_sliding_window`` positions (itself included)."""

    def __init__(self, c: PolytronYOCOConfig):
        super().__init__()
        hd, b, d = c.head_dim, c.attention_bias, c.hidden_size
        self.head_dim, self.window = hd, c.yoco_sliding_window
        self.q_proj = nn.Linear(d, c.num_attention_heads * hd, bias=b)
        self.k_proj = nn.Linear(d, c.self_kv_heads * hd, bias=b)
        self.v_proj = nn.Linear(d, c.self_kv_heads * hd, bias=b)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, d, bias=b)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = rotate(self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = rotate(self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        i = torch.arange(T, device=x.device)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        y = attention(q, k, v, allowed)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class GatedRetention(nn.Module):
    """(silu(x W_g) * RMSNorm_head(sum_j (q_i k_j / sqrt(hd)) prod_{m=j+1..i} gamma_m v_j)) W_o,
    gamma = sigmoid(x W_gt)^(1/tau); here in the quadratic (parallel) form."""

    def __init__(self, c: PolytronYOCOConfig):
        super().__init__()
        hd, b, d = c.head_dim, c.attention_bias, c.hidden_size
        inner = c.num_attention_heads * hd
        self.head_dim, self.tau, self.eps = hd, c.gate_logit_normalizer, c.rms_norm_eps
        self.q_proj = nn.Linear(d, inner, bias=b)
        self.k_proj = nn.Linear(d, inner, bias=b)
        self.v_proj = nn.Linear(d, inner, bias=b)
        self.g_proj = nn.Linear(d, inner, bias=b)
        self.gt_proj = nn.Linear(d, c.num_attention_heads, bias=b)
        self.o_proj = nn.Linear(inner, d, bias=b)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = rotate(self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = rotate(self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        log_gamma = F.logsigmoid(self.gt_proj(x).double()).transpose(1, 2) / self.tau   # (B, H, T)
        G = log_gamma.cumsum(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        decay = torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")).exp().float()
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim ** -0.5 * decay
        o = scores @ v.float()                                            # (B, H, T, hd)
        o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        o = o.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(F.silu(self.g_proj(x)) * o)


class CrossAttention(nn.Module):
    """Queries of this layer against the shared keys/values, causal."""

    def __init__(self, c: PolytronYOCOConfig):
        super().__init__()
        hd, b = c.head_dim, c.attention_bias
        self.head_dim = hd
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * hd, bias=b)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, c.hidden_size, bias=b)

    def forward(self, x, cos, sin, key, value):
        B, T, _ = x.shape
        q = rotate(self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = attention(q, key, value, allowed)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class KVLayer(nn.Module):
    """The one key/value projection of the self-decoder's output (own norm, RoPE on keys)."""

    def __init__(self, c: PolytronYOCOConfig):
        super().__init__()
        hd, b = c.head_dim, c.attention_bias
        self.head_dim = hd
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=b)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=b)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.norm(x)
        k = rotate(self.k_proj(h).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        return k, self.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)


class DecoderLayer(nn.Module):
    def __init__(self, c: PolytronYOCOConfig, index: int):
        super().__init__()
        self.is_cross = index >= c.num_self_layers
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if self.is_cross:
            self.cross_attn = CrossAttention(c)
        elif c.self_decoder == "swa":
            self.self_attn = SlidingWindowAttention(c)
        else:
            self.self_attn = GatedRetention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, key=None, value=None):
        h = self.input_layernorm(x)
        h = self.cross_attn(h, cos, sin, key, value) if self.is_cross else self.self_attn(h, cos, sin)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------- models

class PolytronYOCOPreTrainedModel(PreTrainedModel):
    config_class = PolytronYOCOConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class PolytronYOCOModel(PolytronYOCOPreTrainedModel):
    def __init__(self, config: PolytronYOCOConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.kv_layer = KVLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor, position_ids: Optional[torch.LongTensor] = None) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        freqs = position_ids[..., None].float() * inv_frequencies(self.config).to(input_ids.device)  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]            # (B, T, 1, hd)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(input_ids) * math.sqrt(self.config.hidden_size)
        key = value = None
        for layer in self.layers:
            if layer.is_cross and key is None:
                key, value = self.kv_layer(x, cos, sin)
            x = layer(x, cos, sin, key, value)
        return self.norm(x)


class PolytronYOCOForCausalLM(PolytronYOCOPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PolytronYOCOConfig):
        super().__init__(config)
        self.model = PolytronYOCOModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No key/value cache: every generation step runs the whole sequence."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, labels: Optional[torch.LongTensor] = None,
                **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("this YOCO implementation does not support padded batches")
        logits = self.lm_head(self.model(input_ids, position_ids))          # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
