"""YOCO's pieces of the assembled remote-code modeling file (You Only Cache Once, Sun et al. 2024).

Copied into an export's modeling file (:mod:`model.hf_remote`) for ``model.arch=yoco``:

* ``swa``: sliding-window attention computed as :func:`model.yoco.kernels.sliding_window_attention`
  computes it (the window covers all: causal SDPA; short runs: one masked call; long
  runs: key windows unfolded per block of queries);
* ``retention``: gated retention in the chunkwise form of
  :func:`model.yoco.kernels.chunk_retention` (chunk ``retention_chunk``), so the two sides
  add the same numbers;
* ``yoco_rope``: RoPE in the model's ``rope_pairing`` (rotate_half or interleaved pairs) and
  ``rope_frequencies`` (standard theta^(-2i/hd), or the released code's
  theta ** -linspace(0, 1, hd/2)), as :mod:`model.yoco.rope` computes it; a config
  without these fields (another family's ``swa`` / ``retention`` layer) rotates halves
  at the standard frequencies;
* ``yoco_stack``: the decoder-decoder: the self-decoder (``self_decoder`` layers), one
  key/value projection of its output (``model.kv_layer``), the cross-decoder attending to
  it, each layer's MLP from ``layer_mlp``. Full-sequence forwards (generation recomputes
  the sequence: no key/value cache); padded batches are not supported.

The imports above the pieces are for reading this file as a module.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from polytron.model.hf_remote.pieces import (
    ATTENTIONS,
    MLPS,
    RMSNorm,
    apply_rope,
    attend,
    init_module,
    make_embedding,
    make_linear,
    rope_cos_sin,
)


# piece: yoco_rope
def yoco_cos_sin(config, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, 1, hd) in the rotate-half layout [angles, angles]."""
    if getattr(config, "rope_frequencies", "standard") != "released":
        return rope_cos_sin(config, positions, dtype)
    exponents = torch.linspace(0, 1, config.head_dim // 2, dtype=torch.float32, device=positions.device)
    inv = 1.0 / (config.rope_base ** exponents)                                         # (hd/2,)
    freqs = positions.float()[..., None] * inv                                          # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]                              # (B, T, 1, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def yoco_rope(config, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by position in the config's ``rope_pairing``."""
    if getattr(config, "rope_pairing", "rotate_half") != "interleaved":
        return apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    c = cos[..., :half].repeat_interleave(2, dim=-1)                    # (..., hd): a0 a0 a1 a1 ...
    s = sin[..., :half].repeat_interleave(2, dim=-1)
    pairs = x.unflatten(-1, (half, 2))                                  # (B, T, H, hd/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x * c + rotated * s).to(x.dtype)


# piece: swa
def _window_mask(T: int, window: int, device) -> torch.Tensor:
    """(T, T) bool: query t sees keys t - window < s <= t."""
    q, k = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _blocked_window(q, k, v, window: int, block: int) -> torch.Tensor:
    """Sliding-window attention by unfolded key windows, one block of queries at a time."""
    B, Hq, T, hd = q.shape
    Hkv, N = k.shape[1], -(-T // block)
    pad = N * block - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    K = block + window - 1

    def unfold(x):                                    # (B, H, L, hd) -> (B*N, H, K, hd)
        win = F.pad(x, (0, 0, window - 1, 0)).unfold(2, K, block)            # (B, H, N, hd, K)
        return win.permute(0, 2, 1, 4, 3).reshape(B * N, x.shape[1], K, hd)

    t, kk = torch.arange(block, device=q.device)[:, None], torch.arange(K, device=q.device)[None, :]
    dist = t + window - 1 - kk
    first = window - 1 - block * torch.arange(N, device=q.device)
    mask = ((dist >= 0) & (dist < window))[None] & (kk[None] >= first[:, None, None])   # (N, C, K)
    mask = mask[:, None].expand(B, N, 1, block, K).reshape(B * N, 1, block, K)
    qb = q.view(B, Hq, N, block, hd).transpose(1, 2).reshape(B * N, Hq, block, hd)
    y = F.scaled_dot_product_attention(qb, unfold(k), unfold(v), attn_mask=mask, enable_gqa=Hq != Hkv)
    return y.view(B, N, Hq, block, hd).transpose(1, 2).reshape(B, Hq, N * block, hd)[:, :, :T]


def window_attention(q, k, v, window: int, block: int = 128) -> torch.Tensor:
    """Causal attention over the last ``window`` keys: (B, Hq, T, hd) x (B, Hkv, T, hd)."""
    T = q.shape[2]
    if T <= window:
        return attend(q, k, v, None)
    if T <= block:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(T, window, q.device),
                                              enable_gqa=q.shape[1] != k.shape[1])
    return _blocked_window(q, k, v, window, block)


class SlidingWindowAttention(nn.Module):
    """Causal attention to the last ``yoco_sliding_window`` positions (itself included)."""

    def __init__(self, c, layer_idx: int):
        super().__init__()
        hd, b, d = c.head_dim, c.attention_bias, c.hidden_size
        self.head_dim, self.window, self.config = hd, c.yoco_sliding_window, c
        self.q_proj = make_linear(c, d, c.num_attention_heads * hd, b, "q")
        self.k_proj = make_linear(c, d, c.self_kv_heads * hd, b, "k")
        self.v_proj = make_linear(c, d, c.self_kv_heads * hd, b, "v")
        self.o_proj = make_linear(c, c.num_attention_heads * hd, d, b, "o")

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = yoco_rope(self.config, self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = yoco_rope(self.config, self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)        # (B, H, T, hd)
        y = window_attention(q, k, v, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


ATTENTIONS["swa"] = SlidingWindowAttention


# piece: retention
def chunk_retention(q, k, v, log_decay, chunk: int) -> torch.Tensor:
    """Gated retention, chunkwise: q, k (B, H, T, dk) (k pre-scaled), v (B, H, T, dv),
    log_decay (B, H, T) fp32 -> (B, H, T, dv) in q's dtype."""
    B, H, T, dk = q.shape
    dv, C = v.shape[-1], min(chunk, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_decay = F.pad(log_decay, (0, pad))
    qc, kc, vc = (t.reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v))    # (B, H, N, C, d)
    g = log_decay.float().reshape(B, H, N, C).cumsum(-1)                   # (B, H, N, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    decay = torch.where(causal, g[..., :, None] - g[..., None, :], float("-inf")).exp()
    inner = ((qc.float() @ kc.float().transpose(-1, -2)) * decay) @ vc.float()    # (B, H, N, C, dv)
    last = g[..., -1:]
    kv = (kc.float() * (last - g).exp()[..., None]).transpose(-1, -2) @ vc.float()  # (B, H, N, dk, dv)
    carry = last[..., 0].exp()                                             # (B, H, N)
    state = torch.zeros(B, H, dk, dv, dtype=torch.float32, device=q.device)
    entering = []
    for n in range(N):
        entering.append(state)
        state = carry[:, :, n, None, None] * state + kv[:, :, n]
    cross = (qc.float() * g.exp()[..., None]) @ torch.stack(entering, dim=2)   # (B, H, N, C, dv)
    return (inner + cross).reshape(B, H, N * C, dv)[:, :, :T].to(q.dtype)


class GatedRetention(nn.Module):
    """(silu(x W_g) * RMSNorm_head(retention)) W_o, gamma = sigmoid(x W_gt)^(1/tau)."""

    def __init__(self, c, layer_idx: int):
        super().__init__()
        hd, b, d = c.head_dim, c.attention_bias, c.hidden_size
        inner = c.num_attention_heads * hd
        self.head_dim, self.tau, self.eps, self.chunk = hd, c.gate_logit_normalizer, c.rms_norm_eps, c.retention_chunk
        self.config = c
        self.q_proj = make_linear(c, d, inner, b, "q")
        self.k_proj = make_linear(c, d, inner, b, "k")
        self.v_proj = make_linear(c, d, inner, b, "v")
        self.g_proj = make_linear(c, d, inner, b, "gate")
        self.gt_proj = make_linear(c, d, c.num_attention_heads, b, "proj")
        self.o_proj = make_linear(c, inner, d, b, "o")

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = yoco_rope(self.config, self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = yoco_rope(self.config, self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)        # (B, H, T, hd)
        log_decay = (F.logsigmoid(self.gt_proj(x).float()) / self.tau).transpose(1, 2)   # (B, H, T)
        o = chunk_retention(q, k * self.head_dim ** -0.5, v, log_decay, self.chunk)
        o32 = o.float()
        o = (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.o_proj(F.silu(self.g_proj(x)) * o.transpose(1, 2).reshape(B, T, -1))


ATTENTIONS["retention"] = GatedRetention


# piece: yoco_stack
class YOCOStackConfig(PretrainedConfig):
    """Shape of a polytron YOCO model, plus the composition (``layer_mlp``, ``linear_kind``, ...)."""
    model_type = "polytron_yoco"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 1024, intermediate_size: int = 2816,
                 num_hidden_layers: int = 8, num_self_layers: int = 4, num_attention_heads: int = 8,
                 num_key_value_heads: int = 8, head_dim: int = 128, self_decoder: str = "swa",
                 yoco_sliding_window: int = 1024, self_kv_heads: int = 8, retention_chunk: int = 64,
                 gate_logit_normalizer: float = 16.0, rms_norm_eps: float = 1e-5, rope_base: float = 10000.0,
                 rope_scaling_type: str = "none", rope_scaling_factor: float = 1.0,
                 rope_low_freq_factor: float = 1.0, rope_high_freq_factor: float = 4.0,
                 rope_original_max_position_embeddings: int = 8192, max_position_embeddings: int = 2048,
                 attention_bias: bool = False, mlp_bias: bool = False, initializer_range: float = 0.02,
                 tie_word_embeddings: bool = False, layer_mlp: Optional[list] = None,
                 rope_pairing: str = "rotate_half", rope_frequencies: str = "standard", **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_self_layers = num_hidden_layers, num_self_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim, self.self_decoder, self.self_kv_heads = head_dim, self_decoder, self_kv_heads
        self.yoco_sliding_window, self.retention_chunk = yoco_sliding_window, retention_chunk
        self.gate_logit_normalizer, self.rms_norm_eps, self.rope_base = gate_logit_normalizer, rms_norm_eps, rope_base
        self.rope_scaling_type, self.rope_scaling_factor = rope_scaling_type, rope_scaling_factor
        self.rope_low_freq_factor, self.rope_high_freq_factor = rope_low_freq_factor, rope_high_freq_factor
        self.rope_original_max_position_embeddings = rope_original_max_position_embeddings
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias, self.mlp_bias, self.initializer_range = attention_bias, mlp_bias, initializer_range
        self.layer_mlp = layer_mlp or ["swiglu"] * num_hidden_layers
        self.rope_pairing, self.rope_frequencies = rope_pairing, rope_frequencies
        # transformers' stubs type PreTrainedConfig.__init__ as **kwargs-free; it takes these at runtime
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)  # type: ignore[call-arg]


class CrossAttention(nn.Module):
    """Queries of this layer against the shared keys/values, causal."""

    def __init__(self, c):
        super().__init__()
        hd, b = c.head_dim, c.attention_bias
        self.head_dim, self.config = hd, c
        self.q_proj = make_linear(c, c.hidden_size, c.num_attention_heads * hd, b, "q")
        self.o_proj = make_linear(c, c.num_attention_heads * hd, c.hidden_size, b, "o")

    def forward(self, x, cos, sin, key, value):
        B, T, _ = x.shape
        q = yoco_rope(self.config, self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        return self.o_proj(attend(q, key, value, None).transpose(1, 2).reshape(B, T, -1))


class KVLayer(nn.Module):
    """The one key/value projection of the self-decoder's output (own norm, RoPE on keys)."""

    def __init__(self, c):
        super().__init__()
        hd, b = c.head_dim, c.attention_bias
        self.head_dim, self.config = hd, c
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.k_proj = make_linear(c, c.hidden_size, c.num_key_value_heads * hd, b, "k")
        self.v_proj = make_linear(c, c.hidden_size, c.num_key_value_heads * hd, b, "v")

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.norm(x)
        k = yoco_rope(self.config, self.k_proj(h).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        return k.contiguous(), self.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2).contiguous()


class YOCODecoderLayer(nn.Module):
    def __init__(self, c, index: int):
        super().__init__()
        self.is_cross = index >= c.num_self_layers
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if self.is_cross:
            self.cross_attn = CrossAttention(c)
        else:
            self.self_attn = ATTENTIONS[c.self_decoder](c, index)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLPS[c.layer_mlp[index]](c, index)

    def forward(self, x, cos, sin, key=None, value=None):
        h = self.input_layernorm(x)
        h = self.cross_attn(h, cos, sin, key, value) if self.is_cross else self.self_attn(h, cos, sin)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class YOCOStackPreTrainedModel(PreTrainedModel):
    config_class = YOCOStackConfig
    base_model_prefix = "model"
    _no_split_modules = ["YOCODecoderLayer"]

    def _init_weights(self, module):
        init_module(module, self.config.initializer_range)


class YOCOStackModel(YOCOStackPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = make_embedding(config)
        self.layers = nn.ModuleList(YOCODecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.kv_layer = KVLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids) * math.sqrt(self.config.hidden_size)     # (B, T, d)
        cos, sin = yoco_cos_sin(self.config, position_ids, x.dtype)               # (B, T, 1, hd)
        key = value = None
        for layer in self.layers:
            if layer.is_cross and key is None:
                key, value = self.kv_layer(x, cos, sin)                           # (B, Hkv, T, hd)
            x = layer(x, cos, sin, key, value)
        return self.norm(x)


class YOCOStackForCausalLM(YOCOStackPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = YOCOStackModel(config)
        self.lm_head = make_linear(config, config.hidden_size, config.vocab_size, False, "head")
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
