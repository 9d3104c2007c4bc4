"""The decoder: a model built from its architecture's spec, written for one device.

``Transformer(cfg)`` asks the spec of ``cfg.arch`` (:mod:`model.spec`) for its ordered
units and builds each one. Top-level units (``tok_embeddings``, ``norm``, ``output``)
are attributes; ``layers.<key>`` units live in the ``layers`` ModuleDict. A pipeline
stage is this same class with the units it does not own removed
(:meth:`Transformer.keep_units`); parameter names stay global, so DCP checkpoints
reshard across pipeline layouts.

Build on the meta device, then materialize and initialize::

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(seed=1234)
"""
from __future__ import annotations

import math
import zlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.layers import OUTPUT_ROLES, Context, rope_table, select_rope
from polytron.model.protocols import SequenceShard
from polytron.model.spec import Unit, get_spec


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask restricted to each document: (B, T) ids -> bool (B, 1, T, T)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]     # (B, T, T)
    return (same_doc & causal)[:, None]


class Transformer(nn.Module):
    rope: torch.Tensor                  # (S, 2, hd) buffer, registered in __init__
    """Embedding -> the spec's units -> norm -> head; any of them may be absent on a stage."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.spec = get_spec(cfg.arch)
        self.layers: Optional[nn.ModuleDict] = None
        self.units: list[Unit] = list(self.spec.units(cfg))
        for unit in self.units:
            self._put(unit.name, self.spec.build_unit(cfg, unit))
        self.carry_in: tuple[str, ...] = ()      # carry names a pipeline stage receives
        self.carry_out: tuple[str, ...] = ()     # carry names it hands on
        self.tie_weights()
        self.register_buffer("rope", rope_table(cfg), persistent=False)   # (S, 2, hd)

    # ------------------------------------------------------------ units

    def _put(self, name: str, module: Optional[nn.Module]) -> None:
        if name.startswith("layers."):
            key = name[len("layers."):]
            if self.layers is None:
                self.layers = nn.ModuleDict()
            if module is None:
                del self.layers[key]
            else:
                self.layers[key] = module
        else:
            setattr(self, name, module)

    def unit_module(self, name: str) -> nn.Module:
        if name.startswith("layers."):
            assert self.layers is not None, "unit_module before the layers are built"
            return self.layers[name[len("layers."):]]
        return getattr(self, name)

    def unit_modules(self) -> list[tuple[Unit, nn.Module]]:
        """This model's (or stage's) units in order, with their modules."""
        return [(u, self.unit_module(u.name)) for u in self.units]

    def keep_units(self, names: list[str], carry_in: tuple[str, ...], carry_out: tuple[str, ...]) -> None:
        """Remove every unit not in ``names`` (a pipeline stage)."""
        for unit in self.units:
            if unit.name not in names:
                self._put(unit.name, None)
        self.units = [u for u in self.units if u.name in names]
        self.carry_in, self.carry_out = tuple(carry_in), tuple(carry_out)

    def has_unit(self, kind: str) -> bool:
        return any(u.kind == kind for u in self.units)

    # ------------------------------------------------------------ forward

    #: The context-parallel sequence shard (set by parallel/context.py), else None: then
    #: ``x``, ``position_ids`` and ``doc_ids`` hold this rank's chunks of each sequence.
    seq_shard: Optional[SequenceShard] = None

    def context(self, seq_len: int, position_ids: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor],
                cache=None, start: int = 0) -> Context:
        cos, sin = select_rope(self.rope, seq_len, position_ids, start)
        if self.seq_shard is not None and cache is None:
            # local (B, T/cp) ids; attention masks per block from the gathered ids, never T x T
            local_len = position_ids.shape[1] if position_ids is not None else seq_len
            seq = self.seq_shard.bind(local_len, doc_ids)
            return Context(cos=cos, sin=sin, mask=None, cache=cache, start=start, seq=seq)
        mask = document_mask(doc_ids) if doc_ids is not None else None
        return Context(cos=cos, sin=sin, mask=mask, cache=cache, start=start)

    def forward(self, x: torch.Tensor, *carry: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, cache=None,
                start: int = 0) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        """tokens (B, T) int64, or hidden states (B, T, d) plus the incoming carry tensors
        (``self.carry_in``) on a later pipeline stage.

        Returns logits (B, T, V) on the stage with the head; otherwise the hidden state,
        followed by the carry tensors ``self.carry_out`` when there are any.
        ``position_ids`` (B, T) restart RoPE per document; ``doc_ids`` (B, T) restrict
        attention to each document; ``cache`` / ``start`` are for generation.
        """
        ctx = self.context(x.shape[1], position_ids, doc_ids, cache, start)
        ctx.carry.update(zip(self.carry_in, carry))
        for unit, module in self.unit_modules():
            out = module(x, ctx) if unit.takes_context else module(x)
            if isinstance(out, tuple):
                x, produced = out
                ctx.carry.update(produced)
            else:
                x = out
        if self.carry_out:
            return (x, *[ctx.carry[n] for n in self.carry_out])
        return x

    # ------------------------------------------------------------ init and shapes

    def tie_weights(self) -> None:
        """Re-share tied parameters (after construction and after ``to_empty``)."""
        for name, source in self.spec.tied(self.cfg):
            try:
                owner, leaf = self._owner(name)
                weight = self.get_parameter(source)
            except AttributeError:          # a pipeline stage without one side
                continue
            setattr(owner, leaf, weight)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        return self.get_submodule(path), leaf

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter reproducibly, independent of sharding.

        Each parameter draws from its own generator seeded by (seed, name), builds the
        full tensor and keeps the local shard, so TP/FSDP/PP layouts start from exactly
        the single-device weights. The rule comes from the module that owns the
        parameter: ``init_rule(name)`` when it has one ("ones", "zeros", "normal",
        "output", or ``("uniform", bound)``: U(-bound, bound), e.g. Xavier), else biases
        zero and weights normal(init_std), with init_std / sqrt(2 * num_layers) for
        projections whose role writes into the residual stream.
        """
        self.rope = rope_table(self.cfg, device=self.rope.device)
        depth_std = self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        done = set()
        for mod_name, module in self.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                name = f"{mod_name}.{pname}" if mod_name else pname
                if id(param) in done:
                    continue
                done.add(id(param))
                rule = _rule(module, pname)
                if rule == "ones":
                    full = torch.ones(param.shape)
                elif rule == "zeros":
                    full = torch.zeros(param.shape)
                else:
                    std = depth_std if rule == "output" else self.cfg.init_std
                    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ (seed * 1000003))
                    if isinstance(rule, tuple) and rule[0] == "uniform":     # ("uniform", bound)
                        full = (torch.rand(param.shape, generator=gen) * 2 - 1) * rule[1]
                    else:
                        full = torch.randn(param.shape, generator=gen) * std
                copy_full_into(param, full)
            if hasattr(module, "init_buffers"):
                module.init_buffers()

    def full_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> global shape of every tensor of the whole model (also on a pipeline stage)."""
        return param_shapes(self.cfg)


def _rule(module: nn.Module, pname: str) -> str:
    if hasattr(module, "init_rule"):
        rule = module.init_rule(pname)  # type: ignore[operator]  # a dynamic nn.Module attribute
        if rule:
            return rule
    if pname == "bias":
        return "zeros"
    return "output" if getattr(module, "role", None) in OUTPUT_ROLES else "normal"


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full (unsharded) tensor into a parameter that may be a DTensor shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def build_model(cfg, device: torch.device | str = "cpu", seed: int = 0) -> Transformer:
    """Meta-device build, materialize on ``device``, initialize."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of every tensor of the full (unsharded) model, built on meta."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 over labels != -100. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss in fp32 over labels != -100 (the step divides by its global
    token count). logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")
