"""Mixture-of-experts decoder (MoE and MH-MoE) for Hugging Face transformers (trust_remote_code).

Written beside the weights by polytron's exporter (``tools/convert_checkpoint.py to-hf``
of a ``model.arch=moe`` checkpoint that no transformers class computes exactly); it
imports only torch and transformers.

A Llama decoder (RMSNorm, RoPE in the rotate-half layout, GQA) whose MLP in layer ``i``
is a mixture of experts when ``i >= moe.first_dense`` and ``i % moe.every == 0``, else a
dense SwiGLU of ``intermediate_size``. The MoE layer:

* MH-MoE (``mlp_kind == "mh_moe"`` and ``moe.heads = h > 1``; Wu et al. 2024,
  "Multi-Head Mixture-of-Experts"): a d x d split projection, each token reshaped into h
  sub-tokens of width d/h that are routed on their own, reshaped back and merged by a
  d x d projection;
* routing of each (sub-)token: scores ``softmax`` or ``sigmoid`` of the router logits
  (fp32); the top ``moe.top_k`` experts chosen on scores plus the balancing bias
  (``e_score_correction_bias``, when ``balance_bias``); combine weights the chosen
  scores, divided by their sum if ``moe.normalize_top_k``, times ``moe.route_scale``;
* routed experts: SwiGLU MLPs of ``moe.expert_ffn_hidden_size`` with stacked weights
  ``experts.{gate,up,down}_proj`` (E, out, in); shared experts (always on) one SwiGLU of
  ``moe.shared_experts x moe.expert_ffn_hidden_size``.

Inference is dropless (no capacity limit), as in training's evaluation.
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


class PolytronMoEConfig(LlamaConfig):
    """A Llama config plus ``mlp_kind`` ("moe" | "mh_moe"), ``balance_bias`` and ``moe`` (a
    dict: num_experts, top_k, expert_ffn_hidden_size, shared_experts, score, normalize_top_k,
    route_scale, every, first_dense, heads)."""
    model_type = "polytron_moe"


def _rope_spec(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = dict(getattr(config, "rope_scaling", None) or {})
    spec = {**legacy, **params}
    return float(spec.get("rope_theta", getattr(config, "rope_theta", 10000.0))), spec


def rope_inv_freq(config) -> torch.Tensor:
    """(hd/2,) inverse frequencies, with linear or llama3 scaling."""
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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) rotated by position (rotate-half layout); cos/sin (B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, width: int, inner: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(width, inner, bias=bias)
        self.up_proj = nn.Linear(width, inner, bias=bias)
        self.down_proj = nn.Linear(inner, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.hd = layer_idx, config.head_dim
        b = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.hd, bias=b)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.hd, bias=b)
        self.o_proj = nn.Linear(config.num_attention_heads * self.hd, config.hidden_size, bias=b)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.hd).transpose(1, 2)            # (B, Hq, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.hd).transpose(1, 2)            # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Router(nn.Module):
    def __init__(self, config, width: int):
        super().__init__()
        m = config.moe
        self.top_k, self.score = m["top_k"], m["score"]
        self.normalize, self.scale = m["normalize_top_k"], m["route_scale"]
        self.weight = nn.Parameter(torch.zeros(m["num_experts"], width))
        self.balance = bool(getattr(config, "balance_bias", False))
        if self.balance:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(m["num_experts"]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, w) -> experts (N, k), weights (N, k) fp32."""
        logits = x.float() @ self.weight.float().t()                           # (N, E)
        probs = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = probs + self.e_score_correction_bias.float() if self.balance else probs
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, experts)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale


class Experts(nn.Module):
    def __init__(self, num: int, width: int, inner: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.zeros(num, inner, width))
        self.up_proj = nn.Parameter(torch.zeros(num, inner, width))
        self.down_proj = nn.Parameter(torch.zeros(num, width, inner))
        if bias:
            self.gate_proj_bias = nn.Parameter(torch.zeros(num, inner))
            self.up_proj_bias = nn.Parameter(torch.zeros(num, inner))
            self.down_proj_bias = nn.Parameter(torch.zeros(num, width))
        self.bias = bias

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        b = (lambda n: getattr(self, f"{n}_bias")[e]) if self.bias else (lambda n: None)
        h = F.silu(F.linear(x, self.gate_proj[e], b("gate_proj"))) * F.linear(x, self.up_proj[e], b("up_proj"))
        return F.linear(h, self.down_proj[e], b("down_proj"))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, w), experts/weights (N, k) -> (N, w)."""
        out = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():
            rows, slot = torch.nonzero(experts == e, as_tuple=True)
            y = self.one(e, x[rows]) * weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y)
        return out


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        m = config.moe
        d = config.hidden_size
        self.heads = m["heads"] if config.mlp_kind == "mh_moe" else 1
        self.width = d // self.heads
        self.gate = Router(config, self.width)
        self.experts = Experts(m["num_experts"], self.width, m["expert_ffn_hidden_size"], config.mlp_bias)
        self.shared_experts = (SwiGLU(self.width, m["shared_experts"] * m["expert_ffn_hidden_size"], config.mlp_bias)
                               if m["shared_experts"] else None)
        if self.heads > 1:
            self.split = nn.Linear(d, d)
            self.merge = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        if self.heads > 1:
            x = self.split(x)
        rows = x.reshape(-1, self.width)                                       # (B*T*h, d/h)
        experts, weights = self.gate(rows)
        out = self.experts(rows, experts, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(rows)
        out = out.reshape(B, T, d)
        return self.merge(out) if self.heads > 1 else out


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        m = config.moe
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = layer_idx >= m["first_dense"] and layer_idx % m["every"] == 0
        self.mlp = MoE(config) if moe else SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class PolytronMoEPreTrainedModel(PreTrainedModel):
    config_class = PolytronMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class PolytronMoEModel(PolytronMoEPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds     # (B, T, d)
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        inv = rope_inv_freq(self.config).to(x.device)
        freqs = position_ids.float()[..., None] * inv                           # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)   # (B, 1, T, hd)
        mask = _mask(attention_mask, B, T, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def _mask(attention_mask: Optional[torch.Tensor], B: int, T: int, past: int, device) -> Optional[torch.Tensor]:
    """None for plain causal attention over a fresh sequence, else bool (B, 1, T, past + T)."""
    S = past + T
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]
    if padded:
        allowed = allowed & attention_mask[:, None, None, -S:].bool()
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed.expand(B, 1, T, S)


class PolytronMoEForCausalLM(PolytronMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = PolytronMoEModel(config)
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
