"""Decoder-only transformer (Llama style), written for one device.

Layers sit in a ``ModuleDict`` keyed by their global index, and the embedding,
final norm and output head may be ``None``: a pipeline stage is this same class
with the pieces it does not own removed (see :mod:`parallel.pipeline`).

Build on the meta device, then materialize and initialize::

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=1234)
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import (ATTENTIONS, LINEARS, MLPS, OUTPUT_PROJECTIONS, AttnInputs, RMSNorm,
                          rope_table, select_rope)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        linear = LINEARS[cfg.linear]
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = ATTENTIONS[cfg.attention](cfg, layer_idx, linear)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLPS[cfg.mlp](cfg, layer_idx, linear)

    def forward(self, x: torch.Tensor, inp: AttnInputs) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), inp)   # (B, T, d)
        return x + self.mlp(self.mlp_norm(x))


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask restricted to each document: (B, T) ids -> bool (B, 1, T, T)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]     # (B, T, T)
    return (same_doc & causal)[:, None]


class Transformer(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_table(cfg), persistent=False)   # (S, 2, hd)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) int64, or hidden states (B, T, d) on a stage without the embedding.

        Returns logits (B, T, V) when this module owns the output head, else hidden (B, T, d).
        ``position_ids`` (B, T) restart RoPE per document; ``doc_ids`` (B, T) restrict
        attention to each document.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        cos, sin = select_rope(self.rope, h.shape[1], position_ids)
        inp = AttnInputs(cos=cos, sin=sin,
                         mask=document_mask(doc_ids) if doc_ids is not None else None)
        for layer in self.layers.values():
            h = layer(h, inp)                                  # (B, T, d)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)                                 # (B, T, V)
        return h

    def full_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> global shape of every tensor of the whole model (also on a pipeline stage)."""
        return param_shapes(self.cfg)

    # ------------------------------------------------------------ init

    def tie_weights(self) -> None:
        """Re-share embedding and head after ``to_empty`` (which un-shares them)."""
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter reproducibly, independent of sharding.

        Each parameter draws from its own generator seeded by (seed, name), builds
        the full tensor and keeps the local shard, so TP/FSDP/PP layouts start from
        exactly the single-device weights.
        """
        self.rope = rope_table(self.cfg, device=self.rope.device)
        depth_std = self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            leaf = name.split(".")[-2] if "." in name else name
            if name.endswith("norm.weight"):
                full = torch.ones(param.shape)
            elif name.endswith(".bias"):
                full = torch.zeros(param.shape)
            else:
                std = depth_std if leaf in OUTPUT_PROJECTIONS else self.cfg.init_std
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ (seed * 1000003))
                full = torch.randn(param.shape, generator=gen) * std
            copy_full_into(param, full)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full (unsharded) tensor into a parameter that may be a DTensor shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> Transformer:
    """Meta-device build, materialize on ``device``, initialize."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of every tensor of the full (unsharded) model, built on meta."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 over labels != -100. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
