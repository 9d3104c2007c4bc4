"""Routed experts: E SwiGLU MLPs with stacked parameters, computed over expert-sorted rows.

Each projection is a :class:`StackedLinear`: the parameters of E linear-slot modules
stacked along a leading expert dimension (``weight`` is ``(E, out, in)``, the layout of
``nn.Linear`` per expert, so Hugging Face export is a slice per expert). Rows arrive
sorted by expert (:class:`Groups`), and the matmuls run as one of

* ``grouped``: ``torch.nn.functional.grouped_mm`` over the jagged groups (offsets stay on
  the device: no host synchronization). Plain ``linear`` slot only;
* ``batched``: rows scattered into an ``(E, C, in)`` buffer padded to the largest group
  ``C`` (the capacity when capacity-factor routing bounds it, else the largest load, read
  back to the host), then ``bmm``;
* ``looped``: one matmul per expert over its slice (host offsets); for benchmarks, and the
  path of other linear kinds (e.g. BitLinear): the slot module runs per expert with that
  expert's parameters (``torch.func.functional_call``), or vmapped over the padded
  experts with ``gemm: batched`` when the kind's forward supports torch.func transforms.

Never a loop over tokens. Rows past the kept ones (tokens dropped by capacity routing)
may hold anything in the ``grouped`` output; the caller masks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from polytron.model.layers import make_linear


@dataclass
class Groups:
    """M rows sorted by expert: the kept rows of expert 0, of expert 1, ..., then any
    dropped rows (expert id E)."""
    counts: torch.Tensor               # (E,) int64 kept rows per expert
    row_expert: torch.Tensor           # (M,) int64 expert of each row; E for a dropped row
    capacity: Optional[int] = None     # a known bound on counts (no host read to pad)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    def regrouped(self, counts: torch.Tensor, row_expert: torch.Tensor, capacity: Optional[int]) -> "Groups":
        """Groups over other rows (an expert dispatch's local experts; the
        :class:`~polytron.model.protocols.ExpertGroups` protocol)."""
        return Groups(counts, row_expert, capacity)

    def offsets(self) -> torch.Tensor:
        """(E,) int32 end of each group (grouped_mm's ``offs``)."""
        return self.counts.cumsum(0).to(torch.int32)

    def positions(self) -> torch.Tensor:
        """(M,) row index inside its expert's group (0 for a dropped row)."""
        starts = self.counts.cumsum(0) - self.counts                           # (E,)
        kept = self.row_expert < self.num_experts
        expert = self.row_expert.clamp(max=self.num_experts - 1)
        pos = torch.arange(self.row_expert.shape[0], device=self.counts.device) - starts[expert]
        return torch.where(kept, pos, 0)

    def padded_size(self) -> int:
        """C of the (E, C, .) padded layout (a host read of the largest load without a bound)."""
        if self.capacity is not None:
            return max(1, self.capacity)
        return max(1, int(self.counts.max())) if self.counts.numel() else 1

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(M, w) sorted rows -> (E, C, w), zeros where an expert has fewer than C rows."""
        C = self.padded_size()
        buf = x.new_zeros(self.num_experts + 1, C, x.shape[-1])              # row E: the dropped rows
        return buf.index_put((self.row_expert, self.positions()), x)[:-1]

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """(E, C, w) -> (M, w) in row order; dropped rows zero."""
        full = torch.cat([y, y.new_zeros(1, *y.shape[1:])])                  # (E+1, C, w)
        return full[self.row_expert, self.positions()]


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch provides grouped_mm (forward and backward) for this device and dtype."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


class StackedLinear(nn.Module):
    """E copies of a linear-slot projection ``in_features -> out_features`` as stacked parameters."""

    def __init__(self, cfg, num_experts: int, in_features: int, out_features: int, bias: bool, role: str):
        super().__init__()
        self.role = role                   # init: "down" gets the depth-scaled std
        self.plain = cfg.linear == "linear"
        self.template: Optional[nn.Module] = None
        if self.plain:
            self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))   # (E, out, in)
            self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
            return
        with torch.device("meta"):
            template = make_linear(cfg, in_features, out_features, bias, role)
        if any(True for _ in template.buffers()):
            raise ValueError(f"linear kind {cfg.linear!r} keeps buffers; MoE experts stack parameters only")
        object.__setattr__(self, "template", template)        # not a submodule: its tensors stay meta
        self.names = [n for n, _ in template.named_parameters()]
        for n, p in template.named_parameters():
            self.register_parameter(n.replace(".", "_"), nn.Parameter(torch.empty(num_experts, *p.shape)))

    def stacked(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n.replace(".", "_")) for n in self.names}

    def grouped(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """(M, in) expert-sorted rows -> (M, out) with grouped_mm (plain linear only)."""
        y = F.grouped_mm(x, self.weight.transpose(-2, -1), offs=groups.offsets())   # (M, out)
        if self.bias is not None:
            bias = torch.cat([self.bias, self.bias.new_zeros(1, self.bias.shape[1])])
            y = y + bias[groups.row_expert]
        return y

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """(E, C, in) padded rows -> (E, C, out)."""
        if self.plain:
            y = torch.bmm(x, self.weight.transpose(1, 2))                      # (E, C, out)
            return y + self.bias[:, None, :] if self.bias is not None else y
        from torch.func import functional_call, vmap
        template = self.template
        assert template is not None                                    # set whenever not plain
        return vmap(lambda params, rows: functional_call(template, params, (rows,)))(self.stacked(), x)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its rows (R, in) -> (R, out)."""
        if self.plain:
            return F.linear(x, self.weight[e], None if self.bias is None else self.bias[e])
        from torch.func import functional_call
        assert self.template is not None                               # set whenever not plain
        return functional_call(self.template, {n: p[e] for n, p in self.stacked().items()}, (x,))

    def init_rule(self, name: str) -> Optional[str]:
        return "zeros" if name.endswith("bias") else None


class Experts(nn.Module):
    """E SwiGLU experts ``width -> ffn -> width``: down(silu(gate x) * up x) per expert."""

    def __init__(self, cfg, num_experts: int, width: int, ffn: int):
        super().__init__()
        b = cfg.mlp_bias
        self.num_experts = num_experts
        self.gemm = cfg.moe.gemm
        self.gate = StackedLinear(cfg, num_experts, width, ffn, b, "gate")
        self.up = StackedLinear(cfg, num_experts, width, ffn, b, "up")
        self.down = StackedLinear(cfg, num_experts, ffn, width, b, "down")

    def backend(self, x: torch.Tensor) -> str:
        """The matmul path: as configured for the plain linear slot (auto: grouped where torch
        has it, else batched); another linear kind runs its module per expert (looped), or
        vmapped over the padded experts when ``batched`` is asked for (the kind's forward must
        then support torch.func transforms)."""
        if not self.gate.plain:
            return "batched" if self.gemm == "batched" else "looped"
        if self.gemm != "auto":
            return self.gemm
        return "grouped" if grouped_mm_available(x.device, x.dtype) else "batched"

    def forward(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """(M, width) rows sorted by expert -> (M, width)."""
        backend = self.backend(x)
        if backend == "grouped":
            h = F.silu(self.gate.grouped(x, groups)) * self.up.grouped(x, groups)    # (M, ffn)
            return self.down.grouped(h, groups)
        if backend == "looped":
            return self._looped(x, groups)
        xp = groups.pad(x)                                                         # (E, C, width)
        h = F.silu(self.gate.batched(xp)) * self.up.batched(xp)                     # (E, C, ffn)
        return groups.unpad(self.down.batched(h))

    def _looped(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        ends = groups.offsets().tolist()
        outs, start = [], 0
        for e, end in enumerate(ends):
            rows = x[start:end]                                                    # (R, width)
            outs.append(self.down.one(e, F.silu(self.gate.one(e, rows)) * self.up.one(e, rows)))
            start = end
        outs.append(x.new_zeros(x.shape[0] - start, x.shape[1]))                   # dropped rows
        return torch.cat(outs)
