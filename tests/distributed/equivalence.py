"""Train a tiny model for a few optimizer steps in a given parallel layout, or in one process.

Shared by the equivalence tests: the single-process reference and every layout use
the same config, seed and data (a fixed random global batch per step), the project's
optimizer (``pretrain.optim.build_optimizer``: AdamW) and gradient clipping. Each
data-parallel rank reads its contiguous slice of the global batch, split into
micro-batches of ``MICRO`` samples; the reference reads the whole global batch in
micro-batches of the same size, so both average the same per-micro-batch losses.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.parallel.config import ParallelConfig
from polytron.parallel.engine import build_engine
from polytron.parallel.mesh import ParallelDims
from polytron.pretrain.config import OptimizerConfig, ScheduleConfig
from polytron.pretrain.optim import build_optimizer
from polytron.pretrain.step import TrainStep
from tests.distributed import hetero_spec  # noqa: F401  (registers arch "test_hetero")
from tests.distributed.harness import device_for
from tests.distributed.layout import Layout

STEPS = 3
GLOBAL_BATCH = 8
MICRO = 2
SEQ = 16
SEED = 1234
#: small enough that clipping is active at every step (exercises the global-norm path)
GRAD_CLIP = 0.5

#: every layout of the suite by name; architectures add theirs in
#: tests/distributed/layouts_<arch>.py (see _collect_layouts)
BASE_LAYOUTS: list[Layout] = [
    Layout("tp2", 2, parallel={"tensor": 2}),
    Layout("tp2_kv1_replicated", 2, parallel={"tensor": 2}, model={"num_kv_heads": 1}),
    Layout("tp2_docs", 2, parallel={"tensor": 2}, data="docs"),
    Layout("tp2_no_sp", 2, parallel={"tensor": 2, "sequence_parallel": False}, model={"num_kv_heads": 1}),
    Layout("pp2_1f1b", 2, parallel={"pipeline": 2}),
    Layout("pp2_gpipe_uneven_docs", 2, parallel={"pipeline": 2, "pipeline_schedule": "gpipe",
                                                 "pipeline_split": [3, 1]}, data="docs"),
    Layout("pp2_interleaved", 2, parallel={"pipeline": 2, "virtual_stages": 2}),
    Layout("fsdp2", 2),
    Layout("fsdp2_full_ac", 2, parallel={"activation_checkpoint": "full"}),
    Layout("fsdp2_tied", 2, model={"tie_embeddings": True}),
    Layout("tp2_tied", 2, parallel={"tensor": 2}, model={"tie_embeddings": True}),
    Layout("tp2_pp2", 4, parallel={"tensor": 2, "pipeline": 2}),
    Layout("hsdp_2x2", 4, parallel={"data_parallel_replicate": 2, "data_parallel_shard": 2}),
    Layout("fsdp2_tp2_selective_ac_kv1", 4, parallel={"tensor": 2, "activation_checkpoint": "selective"},
           model={"num_kv_heads": 1}, data="docs"),
    Layout("pp2_fsdp2", 4, parallel={"pipeline": 2, "virtual_stages": 2}),
    # a second architecture (tests/distributed/hetero_spec.py): two block kinds and a carry
    # tensor produced by layer 1 and consumed by layers 2-3; PP2 puts the border between them
    # (it also adds auxiliary losses and reports step statistics); "masked" = uneven loss masks
    Layout("hetero_pp2", 2, parallel={"pipeline": 2}, model={"arch": "test_hetero"}, data="masked"),
    Layout("hetero_tp2", 2, parallel={"tensor": 2}, model={"arch": "test_hetero"}, data="docs"),
    Layout("hetero_fsdp2", 2, model={"arch": "test_hetero"}, data="masked"),
    Layout("hetero_tp2_pp2", 4, parallel={"tensor": 2, "pipeline": 2}, model={"arch": "test_hetero"},
           data="masked"),
    Layout("fsdp2_masked", 2, data="masked"),
]
LAYOUTS: dict[str, Layout] = {}


def _collect_layouts() -> None:
    """Merge BASE_LAYOUTS and the LAYOUTS list of every ``tests/distributed/layouts_<name>.py``
    (one file per architecture, so each adds its layouts without editing this one); all
    layouts of one world size still run in a single spawn."""
    import importlib
    import pkgutil

    import tests.distributed as package
    sources = {"equivalence": BASE_LAYOUTS}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("layouts_"):
            sources[info.name] = importlib.import_module(f"tests.distributed.{info.name}").LAYOUTS
    for source, layouts in sources.items():
        for layout in layouts:
            assert isinstance(layout, Layout), f"{source}: {layout!r} is not a Layout"
            assert layout.name not in LAYOUTS, f"{source} redefines layout {layout.name!r}"
            LAYOUTS[layout.name] = layout


_collect_layouts()


def model_config(**overrides: Any) -> ModelConfig:
    """Tiny Llama: 4 layers, d=64, 4 heads / 2 KV heads, vocab 128 (all divisible by 2),
    with ``overrides`` (nested sections as dicts) applied through the config loader."""
    base = dict(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=128, max_seq_len=32)
    cfg = from_dict(ModelConfig, {**base, **overrides}, prefix="model.")
    cfg.validate()
    return cfg


def global_batch(step: int, variant: str, vocab: int) -> dict[str, torch.Tensor]:
    """The step's global batch: tokens/labels (G, T); with ``docs`` also document ids and
    per-document positions (packed documents)."""
    gen = torch.Generator().manual_seed(SEED + step)
    seq = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    batch = {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous()}
    if variant in ("masked", "sources"):  # loss masks of uneven density; samples 0-1 have no loss token
        density = torch.linspace(-0.2, 1.0, GLOBAL_BATCH)[:, None]
        batch["loss_mask"] = (torch.rand(GLOBAL_BATCH, SEQ, generator=gen) < density).long()
    if variant == "sources":    # blended-dataset ids per sample (per-source loss); source 3 has no loss token
        batch["source"] = torch.nn.functional.one_hot(torch.tensor([3, 3, 0, 1, 2, 0, 1, 2]), 4)
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
    """Run STEPS optimizer steps of the project's TrainStep; returns per-step losses and grad
    norms and this rank's final parameters (unsharded, by global name)."""
    dims = ParallelDims.resolve(pcfg, mcfg, world_size)
    device = device_for(dist.get_backend()) if world_size > 1 else torch.device("cpu")
    mesh = dims.build_mesh(device.type) if world_size > 1 else None
    engine = build_engine(mcfg, pcfg, dims, mesh, device, torch.float32, SEED)
    opt_cfg = OptimizerConfig(grad_clip=GRAD_CLIP)
    step = TrainStep(engine, build_optimizer(engine.model_parts, opt_cfg), opt_cfg,
                     ScheduleConfig(kind="constant", warmup_iters=0), STEPS)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    losses, norms = [], []
    for i in range(STEPS):
        result = step(microbatches(global_batch(i, variant, mcfg.vocab_size), dp_rank, dims.dp), i)
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
    eval_mbs = microbatches(global_batch(STEPS, variant, mcfg.vocab_size), dp_rank, dims.dp)
    return {"losses": losses, "grad_norms": norms, "eval_loss": float(engine.eval_loss(eval_mbs)),
            "stats": engine.reduce_stats(), "params": engine.full_parameters()}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body on one intra-op thread, as every rank of a spawn does: the tiny model's
    ops gain nothing from more, and on a loaded 2-core machine the idle threads' spinning
    made a reference run cost 6-20 CPU seconds instead of ~0.2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(model_overrides: dict, variant: str) -> dict:
    """The single-process run of the same global batches (on one thread)."""
    with one_thread():
        return train(ParallelConfig(), model_config(**model_overrides), variant, 1)


class LayoutFault(RuntimeError):
    """The deliberate failure of a test-only ``Layout.fault``."""


def run_layout(layout: Layout) -> dict:
    """Worker body (every rank): train ``layout`` on the current world."""
    world = int(os.environ["WORLD_SIZE"])
    assert layout.world == world, (layout.name, layout.world, world)
    if layout.fault is not None:
        _inject(layout.fault)
    return train(ParallelConfig(**layout.parallel), model_config(**layout.model), layout.data, world)


def _inject(fault: str) -> None:
    """``raise``: the last rank raises while the others go on into training (and block in its
    first collective); ``abort``: the last rank prints a line to stderr and dies of SIGABRT (as a
    C++ ``std::terminate`` would) while the others go on into training; ``hang``: the last rank
    waits for a message nobody sends while the others block in an all-reduce it never joins."""
    rank, last = dist.get_rank(), dist.get_world_size() - 1
    if fault == "raise" and rank == last:
        raise LayoutFault(f"deliberate test fault on rank {rank}")
    if fault == "abort" and rank == last:
        os.write(2, f"deliberate abort on rank {rank}\n".encode())
        os.abort()
    if fault == "hang":
        if rank == last:
            dist.recv(torch.zeros(1), src=0, tag=7)   # never sent
        else:
            dist.all_reduce(torch.zeros(1))
