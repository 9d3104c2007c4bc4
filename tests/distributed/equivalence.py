"""Train a tiny model for a few optimizer steps in a given parallel layout, or in one process.

Shared by the equivalence tests: the single-process reference and every layout use
the same config, seed and data (a fixed random global batch per step), the project's
optimizer (``pretrain.optim.build_optimizer``: AdamW) and gradient clipping. Each
data-parallel rank reads its contiguous slice of the global batch, split into
micro-batches of ``MICRO`` samples; the reference reads the whole global batch in
micro-batches of the same size, so both average the same per-micro-batch losses.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from model.config import ModelConfig
from parallel.config import ParallelConfig
from parallel.engine import build_engine
from parallel.mesh import ParallelDims
from pretrain.config import OptimizerConfig
from pretrain.optim import build_optimizer
from tests.distributed.harness import device_for

STEPS = 3
GLOBAL_BATCH = 8
MICRO = 2
SEQ = 16
SEED = 1234
#: small enough that clipping is active at every step (exercises the global-norm path)
GRAD_CLIP = 0.5

#: name -> (world size, parallel overrides, model overrides, data variant)
LAYOUTS: dict[str, tuple[int, dict, dict, str]] = {
    "tp2": (2, {"tensor": 2}, {}, "plain"),
    "tp2_kv1_replicated": (2, {"tensor": 2}, {"num_kv_heads": 1}, "plain"),
    "tp2_docs": (2, {"tensor": 2}, {}, "docs"),
    "tp2_no_sp": (2, {"tensor": 2, "sequence_parallel": False}, {"num_kv_heads": 1}, "plain"),
    "pp2_1f1b": (2, {"pipeline": 2}, {}, "plain"),
    "pp2_gpipe_uneven_docs": (2, {"pipeline": 2, "pipeline_schedule": "gpipe",
                                  "pipeline_split": [3, 1]}, {}, "docs"),
    "pp2_interleaved": (2, {"pipeline": 2, "virtual_stages": 2}, {}, "plain"),
    "fsdp2": (2, {}, {}, "plain"),
    "fsdp2_full_ac": (2, {"activation_checkpoint": "full"}, {}, "plain"),
    "fsdp2_tied": (2, {}, {"tie_embeddings": True}, "plain"),
    "tp2_tied": (2, {"tensor": 2}, {"tie_embeddings": True}, "plain"),
    "tp2_pp2": (4, {"tensor": 2, "pipeline": 2}, {}, "plain"),
    "hsdp_2x2": (4, {"data_parallel_replicate": 2, "data_parallel_shard": 2}, {}, "plain"),
    "fsdp2_tp2_selective_ac_kv1": (4, {"tensor": 2, "activation_checkpoint": "selective"},
                                   {"num_kv_heads": 1}, "docs"),
    "pp2_fsdp2": (4, {"pipeline": 2, "virtual_stages": 2}, {}, "plain"),
}


def model_config(**overrides: Any) -> ModelConfig:
    """Tiny Llama: 4 layers, d=64, 4 heads / 2 KV heads, vocab 128 (all divisible by 2)."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, max_seq_len=32)
    cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


def global_batch(step: int, variant: str, vocab: int) -> dict[str, torch.Tensor]:
    """The step's global batch: tokens/labels (G, T); with ``docs`` also document ids and
    per-document positions (packed documents)."""
    gen = torch.Generator().manual_seed(SEED + step)
    seq = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    batch = {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous()}
    if variant == "docs":
        starts = torch.rand(GLOBAL_BATCH, SEQ, generator=gen) < 0.2
        starts[:, 0] = True
        doc_ids = starts.long().cumsum(1)                                   # (G, T)
        pos = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ)
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        batch.update(doc_ids=doc_ids, position_ids=pos - first)
    return batch


def microbatches(batch: dict, dp_rank: int, dp_size: int) -> list[dict]:
    """This dp rank's contiguous slice of the global batch, in micro-batches of MICRO."""
    per_rank = GLOBAL_BATCH // dp_size
    lo = dp_rank * per_rank
    return [{k: v[i:i + MICRO] for k, v in batch.items()} for i in range(lo, lo + per_rank, MICRO)]


def train(pcfg: ParallelConfig, mcfg: ModelConfig, variant: str, world_size: int) -> dict:
    """Run STEPS optimizer steps; returns per-step losses and grad norms and this rank's
    final parameters (unsharded, by global name)."""
    dims = ParallelDims.resolve(pcfg, mcfg, world_size)
    device = device_for(dist.get_backend()) if world_size > 1 else torch.device("cpu")
    mesh = dims.build_mesh(device.type) if world_size > 1 else None
    engine = build_engine(mcfg, pcfg, dims, mesh, device, torch.float32, SEED)
    opt = build_optimizer(engine.model_parts, OptimizerConfig())
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    losses, norms = [], []
    for step in range(STEPS):
        mbs = microbatches(global_batch(step, variant, mcfg.vocab_size), dp_rank, dims.dp)
        losses.append(float(engine.forward_backward(mbs)))
        norms.append(engine.clip_grad_norm_(GRAD_CLIP))
        opt.step()
        opt.zero_grad(set_to_none=True)
    eval_mbs = microbatches(global_batch(STEPS, variant, mcfg.vocab_size), dp_rank, dims.dp)
    return {"losses": losses, "grad_norms": norms, "eval_loss": engine.eval_loss(eval_mbs),
            "params": engine.full_parameters()}


def reference(model_overrides: dict, variant: str) -> dict:
    """The single-process run of the same global batches."""
    return train(ParallelConfig(), model_config(**model_overrides), variant, 1)


def run_layouts(names: list[str]) -> dict[str, dict]:
    """Worker body (every rank): train each named layout in turn on the current world."""
    world = int(os.environ["WORLD_SIZE"])
    out = {}
    for name in names:
        size, par, mod, variant = LAYOUTS[name]
        assert size == world, (name, size, world)
        try:
            out[name] = train(ParallelConfig(**par), model_config(**mod), variant, world)
        except Exception as e:
            raise RuntimeError(f"layout {name}: {e}") from e
    return out
