"""Parallelism configuration: degrees of each kind of parallelism and how to apply them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from polytron.model.configlib import bad, doc


@dataclass
class ParallelConfig:
    """Degrees multiply to the world size: dp_replicate * dp_shard * cp * tp * pp (ep folds into dp)."""
    data_parallel_replicate: int = field(default=1, metadata=doc(
        "Replicated data-parallel degree (DDP-style; with data_parallel_shard > 1 this is HSDP)."))
    data_parallel_shard: int = field(default=-1, metadata=doc(
        "Fully-sharded (FSDP2) data-parallel degree; -1 fills the ranks the other degrees leave."))
    tensor: int = field(default=1, metadata=doc("Tensor-parallel degree."))
    sequence_parallel: bool = field(default=True, metadata=doc(
        "With tensor > 1, shard norms/residuals along the sequence (Megatron SP)."))
    pipeline: int = field(default=1, metadata=doc("Pipeline-parallel degree (stages)."))
    virtual_stages: int = field(default=1, metadata=doc(
        "Model chunks per pipeline rank; > 1 uses interleaved 1F1B."))
    pipeline_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = field(default="1f1b", metadata=doc(
        "Pipeline schedule; virtual_stages > 1 implies interleaved_1f1b."))
    pipeline_split: list[int] = field(default_factory=list, metadata=doc(
        "Layers per stage (pipeline * virtual_stages numbers summing to num_layers); empty splits evenly."))
    expert: int = field(default=1, metadata=doc(
        "Expert-parallel degree: each MoE layer's routed experts are split over this many "
        "neighbouring data-parallel ranks (carved from data_parallel_shard, which it must divide; "
        "tokens reach their experts by all-to-all) and FSDP-sharded over the remaining "
        "data-parallel ranks; must divide model.moe.num_experts (parallel/expert_parallel.py)."))
    context: int = field(default=1, metadata=doc(
        "Context-parallel degree: each sequence is cut into 2 x context chunks and rank i of a "
        "context group holds chunks i and 2 x context - 1 - i (parallel/context.py); data.seq_len "
        "must be divisible by 2 x context."))
    context_kind: Literal["ring", "allgather"] = field(default="ring", metadata=doc(
        "How attention sees the other ranks' keys/values under context > 1: ring (blocks passed "
        "around the context group, overlapped with compute) or allgather (gathered once per layer)."))
    activation_checkpoint: Literal["none", "selective", "full"] = field(default="none", metadata=doc(
        "Recompute activations in backward: none, selective (every other block), or full (all blocks)."))
    fsdp_reduce_dtype: Literal["fp32", "compute"] = field(default="fp32", metadata=doc(
        "Dtype FSDP reduces gradients in: fp32 (default, also under bf16 training) or the compute dtype."))
    fsdp_reshard_after_forward: Literal["auto", "always", "never"] = field(default="auto", metadata=doc(
        "Free gathered FSDP parameters after forward: auto = yes without pipelining, no with it "
        "(each stage runs several micro-batch forwards before their backwards)."))
    compile: bool = field(default=False, metadata=doc(
        "torch.compile each block and the loss (fuses norms, RoPE, SwiGLU and softmax passes; "
        "costs 20-40 s of compilation at start on 2 CPU cores; see docs/benchmarks.md)."))
    backend: Literal["auto", "gloo", "nccl"] = field(default="auto", metadata=doc(
        "Process-group backend; auto picks nccl with GPUs and gloo without."))

    def validate(self) -> None:
        for key in ("data_parallel_replicate", "tensor", "pipeline", "virtual_stages", "expert", "context"):
            if getattr(self, key) < 1:
                raise bad(f"parallel.{key}", getattr(self, key), "an integer >= 1")
        if self.data_parallel_shard < 1 and self.data_parallel_shard != -1:
            raise bad("parallel.data_parallel_shard", self.data_parallel_shard, "-1 (auto) or an integer >= 1")
