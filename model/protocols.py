"""The hooks a module may offer the rest of the system, as typed protocols.

Model code is written for one device. What the training system needs to know about a
layer (how tensor parallelism shards it, how it is initialized, which parameters a
token activates, what runs after the optimizer step) the layer declares by offering a
method or attribute below; generic code asks ``isinstance(module, Protocol)`` (all are
``runtime_checkable``), never ``hasattr`` with a name string, and never the layer's
class. A new architecture implements the protocols its layers need and edits nothing
outside its folder.

=========================  ================================================  ==========================
protocol                   what the module offers                            read by
=========================  ================================================  ==========================
:class:`TPRoles`           ``tp_roles() -> {child name: role}``              parallel/tensor_parallel.py,
                                                                             parallel/fp8.py
:class:`TPRole`            ``tp_role``: its own role in its parent block     model/layers.py ``Block``
:class:`TPRequirements`    ``tp_requirements(cfg, layer_idx, tp)``           spec layout checks
                           (classmethod): an error line or None
:class:`TPLocal`           ``tp_localize(rank, tp)``: keep its rank's part   the ``tp_local`` style
                           of plain head-indexed state                       (model/dha)
:class:`InitRule`          ``init_rule(param_name)``: "ones", "zeros",       model/transformer.py
                           ("uniform", bound), ... or None (the default)
:class:`InitBuffers`       ``init_buffers()``: reset non-parameter state     model/transformer.py
:class:`ActiveParams`      ``active_params()``: matmul parameters one        model/accounting.py
                           token activates (a sparse module)
:class:`AttentionFlops`    ``attention_flops(seq_len)``: score and           model/accounting.py
                           weighted-sum FLOPs per token
:class:`SavedActivations`  ``saved_elements(tp, sp)``, ``saved_fp32_``        parallel/plan.py
                           ``elements(tp, sp)``: what backward keeps per token
:class:`ExpertLayer`       ``routed_experts()``, ``set_dispatch(d)``         parallel/expert_parallel.py
:class:`ExpertGroups`      rows sorted by expert; ``regrouped(...)``         an expert dispatch
:class:`LoadReducing`      ``load_reducer``: a hook summing observed load    parallel/expert_parallel.py,
                           over the data-parallel (and cp) ranks             parallel/context.py
:class:`SequenceReducing`  ``seq_reducer``: a hook summing per-sequence      parallel/context.py
                           statistics over the cp ranks
:class:`CPRequirements`    ``cp_requirements(cfg, cp)``                     parallel/context.py
                           (classmethod): an error line or None              layout checks
:class:`FullPrecision`     ``full_precision``: compute in fp32 under         parallel/fsdp.py
                           mixed precision (its own FSDP unit)
:class:`PostOptimizerStep` ``post_optimizer_step()`` after every update      pretrain/step.py
:class:`FullParamShapes`   ``full_param_shapes()``: unsharded shapes by FQN  pretrain/checkpoint
:class:`RecurrentCache`    an inference cache holding per-layer recurrent     model/yoco/layers.py
                           states (``recurrent_state`` / ``set_...``)         (retention)
:class:`SequenceShard`     this forward's context-parallel sequence shard:    model/layers.py ``attend``,
                           layout, ``gather``/``halo``/``shard``,             CP mixers (parallel/context.py)
                           ``attention``
=========================  ================================================  ==========================

This module imports nothing from the rest of polytron, so every layer, the model core
and ``parallel/`` can import it without a cycle.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

#: A tensor-parallel role: a registered style name (``"colwise"``), or a tuple whose
#: first item is one with its arguments (``("kv", num_kv_heads, head_dim)``).
Role = Any


@runtime_checkable
class TPRoles(Protocol):
    """A module that declares how tensor parallelism shards each of its children."""

    def tp_roles(self) -> dict[str, Role]:
        """``{child name: role}``; roles are names in ``parallel.tensor_parallel``'s registry."""
        ...


@runtime_checkable
class TPRole(Protocol):
    """A module that declares its own role in the block holding it (an MoE layer: ``replicated``)."""

    tp_role: Role


@runtime_checkable
class TPRequirements(Protocol):
    """A layer class whose shapes constrain the tensor-parallel degree (check with ``issubclass``)."""

    @classmethod
    def tp_requirements(cls, cfg: Any, layer_idx: int, tp: int) -> Optional[str]:
        """The first divisibility rule ``tp`` breaks as one error line, or None."""
        ...


@runtime_checkable
class TPLocal(Protocol):
    """A module with plain (non-parameter) state indexed by heads."""

    def tp_localize(self, rank: int, tp: int) -> None:
        """Keep tensor-parallel rank ``rank``'s part (of ``tp``) of that state, in place."""
        ...


@runtime_checkable
class InitRule(Protocol):
    """A module that initializes (some of) its own parameters differently from the default."""

    def init_rule(self, name: str) -> Any:
        """Rule for parameter ``name``: "ones", "zeros", "normal", ("uniform", bound), or None."""
        ...


@runtime_checkable
class InitBuffers(Protocol):
    """A module with buffers that ``init_weights`` must reset (a router's balancing state)."""

    def init_buffers(self) -> None:
        ...


@runtime_checkable
class ActiveParams(Protocol):
    """A sparse module: a token activates only part of its parameters."""

    def active_params(self) -> int:
        """Matmul parameters one token activates (for MFU)."""
        ...


@runtime_checkable
class SavedActivations(Protocol):
    """A module that states what it saves for backward per token of a micro-batch on one rank
    (docs/scaling.md); a module without it is walked into by the planner."""

    def saved_elements(self, tp: int, sp: bool) -> float:
        """Elements saved per token, each at the compute width (a float64 counts as two)."""
        ...

    def saved_fp32_elements(self, tp: int, sp: bool) -> float:
        """Under a 16-bit compute dtype, the extra 2-byte units per token beyond
        ``saved_elements`` at 2 bytes: one for each of those elements kept in fp32 (two for a
        float64), two for each fp32 element a 16-bit run copies where an fp32 run shares the
        input (``x.float()``). Bytes: ``width * saved + (4 - width) * fp32``."""
        ...


@runtime_checkable
class AttentionFlops(Protocol):
    """An attention module that reports its score and weighted-sum work."""

    def attention_flops(self, seq_len: int) -> float:
        """FLOPs per token (training, forward + backward) at ``seq_len``."""
        ...


@runtime_checkable
class ExpertGroups(Protocol):
    """M rows sorted by expert (kept rows of expert 0, 1, ..., then dropped rows)."""

    counts: torch.Tensor               # (E,) int64 kept rows per expert
    row_expert: torch.Tensor           # (M,) int64 expert of each row; E for a dropped row

    def regrouped(self, counts: torch.Tensor, row_expert: torch.Tensor,
                  capacity: Optional[int]) -> "ExpertGroups":
        """Groups of the same kind over other rows (an expert dispatch's local experts)."""
        ...


#: How a layer runs its experts on expert-sorted rows: ``(rows (M, w), groups, experts) -> (M, w)``.
Dispatch = Callable[[torch.Tensor, ExpertGroups, nn.Module], torch.Tensor]


@runtime_checkable
class ExpertLayer(Protocol):
    """A layer with routed experts that expert parallelism can shard."""

    def routed_experts(self) -> nn.Module:
        """The module holding the experts' stacked parameters (dim 0: expert)."""
        ...

    def set_dispatch(self, dispatch: Dispatch) -> None:
        """Replace how the experts run on the sorted rows."""
        ...


@runtime_checkable
class LoadReducing(Protocol):
    """A module that balances by observed load; the parallel layer sets the reduction."""

    load_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]]


@runtime_checkable
class SequenceReducing(Protocol):
    """A module whose statistics must cover the whole sequence (a router's load and
    balancing loss); under context parallelism the parallel layer sets ``seq_reducer``, which
    sums a detached fp32 vector over the ranks holding parts of the same sequences."""

    seq_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]]


@runtime_checkable
class CPRequirements(Protocol):
    """A layer class that runs under context parallelism within limits (check with ``issubclass``)."""

    @classmethod
    def cp_requirements(cls, cfg: Any, cp: int) -> Optional[str]:
        """The first setting ``parallel.context=cp`` cannot serve, as one error line, or None."""
        ...


@runtime_checkable
class FullPrecision(Protocol):
    """A module that computes in fp32 under mixed precision when ``full_precision`` is true."""

    full_precision: bool


@runtime_checkable
class PostOptimizerStep(Protocol):
    """A module with work to do after every optimizer step (a router's bias update)."""

    def post_optimizer_step(self) -> None:
        ...


@runtime_checkable
class FullParamShapes(Protocol):
    """A model that can tell its unsharded parameter shapes (checkpoint checks)."""

    def full_param_shapes(self) -> dict[str, tuple[int, ...]]:
        ...


@runtime_checkable
class RecurrentCache(Protocol):
    """An inference cache that also holds per-layer recurrent states (retention layers)."""

    def recurrent_state(self, layer_idx: int) -> torch.Tensor:
        """Layer ``layer_idx``'s state, (B, H, hd, hd) fp32."""
        ...

    def set_recurrent_state(self, layer_idx: int, state: torch.Tensor) -> None:
        ...


@runtime_checkable
class SequenceShard(Protocol):
    """The context-parallel sequence shard of one forward pass (``Context.seq``;
    implemented by :class:`parallel.context.SequenceShard`). The sequence of ``seq_len``
    tokens is cut into ``2 * size`` chunks of ``chunk_len``; rank ``rank`` holds chunks
    ``rank`` and ``2 * size - 1 - rank`` in that order (``positions``: their global indices)."""

    size: int
    rank: int
    kind: str                          # "ring" | "allgather"
    seq_len: int
    chunk_len: int
    positions: torch.Tensor            # (T/size,) int64 global positions of the local tokens

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Local tokens -> the full sequence in global order (differentiable)."""
        ...

    def halo(self, x: torch.Tensor, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` tokens preceding each local chunk (zeros before position 0)."""
        ...

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Full sequence -> this rank's two chunks."""
        ...

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Causal (document-masked) attention of local queries over the whole sequence's keys."""
        ...

    def bind(self, local_len: int, doc_ids: Optional[torch.Tensor]) -> "SequenceShard":
        """The view of one forward pass (local length, document ids gathered once)."""
        ...
