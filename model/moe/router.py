"""The MoE router: scores, top-k choice, combine weights, routing losses, balancing bias.

Everything here runs in fp32 whatever the training dtype (the router keeps full
precision: its weight is an fp32 parameter, autocast is off inside, and the FSDP pass
gives it an fp32 mixed-precision policy).

Scores (``model.moe.score``): ``softmax`` over the experts, or ``sigmoid`` per expert.
The top-k experts are chosen on ``score + bias`` (the bias exists only with the
auxiliary-loss-free balancing, ``bias_update_rate > 0``), the combine weights are the
chosen *scores* (without the bias), divided by their sum if ``normalize_top_k``, times
``route_scale`` (DeepSeek-V3's order of operations; Mixtral is softmax + normalize).

Losses (attached to the layer output with :func:`model.hooks.add_aux_loss`):

* load balancing (Switch / GShard, in Megatron's top-k form):
  ``coeff * E * sum_i f_i * P_i`` with ``f_i`` the fraction of the N*k assignments that
  chose expert i (``balance_choices: all``; with ``first``, of the N first choices, as
  GShard and the released MH-MoE gate count; before capacity dropping; no gradient) and
  ``P_i`` the mean over the N tokens of expert i's normalized score (softmax probability,
  or the sigmoid scores divided by their sum over experts as in DeepSeek-V3). 1 x coeff
  when balanced.
* z-loss (ST-MoE): ``coeff * mean_t logsumexp(logits_t)^2``.

Context parallelism (``seq_reducer`` set by parallel/context.py): each rank holds part of
every sequence, and routing stays token-local, but ``f_i``, ``P_i``, the z-loss mean and the
reported load are those of the whole sequence: one all-reduce per layer and micro-batch
sums the detached per-expert counts (and first-choice counts with ``balance_choices:
first``), score sums, the z-loss sum and the row count over the cp ranks. A rank's loss is
its own tokens' share of the whole-sequence loss (gradient: its tokens' terms with the
global ``f`` and row count; the cp ranks' gradients are summed), carrying the
whole-sequence value so the reported ``aux/*`` statistic is one process's.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from polytron.model.hooks import _recording, current


class Routing(NamedTuple):
    """One micro-batch's routing of N tokens (or sub-tokens) to k experts each (a named
    tuple, so hooks that walk a module's outputs, like FSDP's, see its tensors)."""
    experts: torch.Tensor      # (N, k) int64 chosen experts, best first
    weights: torch.Tensor      # (N, k) fp32 combine weights
    counts: torch.Tensor       # (E,) int64 assignments per expert (before capacity)
    aux: Optional[torch.Tensor] = None      # fp32 scalar: the weighted load-balancing loss
    z: Optional[torch.Tensor] = None        # fp32 scalar: the weighted z-loss
    share: Optional[torch.Tensor] = None    # (E,) the whole sequence's assignment share (cp); None: counts


def _training_forward() -> bool:
    """True in the forward of a training step (not evaluation, not an activation-checkpoint
    replay in backward, not a pipeline schedule's shape inference, not outside a step)."""
    return _recording() and current().aux_scale > 0


def _carrying(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part``'s gradient with the (detached) value ``whole``."""
    return part + (whole - part).detach()


class Router(nn.Module):
    """Linear scores of ``width``-wide inputs over ``num_experts`` experts, top-k choice."""

    full_precision = True            # the FSDP pass keeps its parameter in fp32
    expert_bias: torch.Tensor        # (E,) buffers, registered in __init__ when rate > 0
    expert_load: torch.Tensor        # (E,)

    def __init__(self, cfg, width: int):
        super().__init__()
        moe = cfg.moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.score, self.normalize, self.scale = moe.score, moe.normalize_top_k, moe.route_scale
        self.aux_coeff, self.z_coeff, self.rate = moe.aux_loss_coeff, moe.z_loss_coeff, moe.bias_update_rate
        self.first_only = moe.balance_choices == "first"
        self.weight = nn.Parameter(torch.empty(moe.num_experts, width, dtype=torch.float32))   # (E, w)
        self.role = "router"
        self.load_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.seq_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        if self.rate > 0:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts))   # persistent: checkpointed
            self.register_buffer("expert_load", torch.zeros(moe.num_experts))   # this step's assignments

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, w) -> routing of each row to top_k experts."""
        with torch.autocast(x.device.type, enabled=False):
            logits = x.float() @ self.weight.float().t()                       # (N, E)
            probs = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
            choice = probs + self.expert_bias if self.rate > 0 else probs
            experts = choice.topk(self.top_k, dim=-1).indices                  # (N, k)
            weights = probs.gather(1, experts)                                 # (N, k)
            if self.normalize:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            weights = weights * self.scale
            counts = torch.bincount(experts.flatten(), minlength=self.num_experts)   # (E,)
            if self.rate > 0 and _training_forward():
                self.expert_load.add_(counts.to(self.expert_load.dtype))
            if self.seq_reducer is not None and torch.is_grad_enabled():
                return self._sequence_routing(experts, weights, counts, probs, logits)
            return Routing(experts, weights, counts, self._balance_loss(probs, experts, counts),
                           self._z_loss(logits))

    def _balance_counts(self, experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(E,) the assignments the balancing loss counts: all k choices, or first choices only."""
        return torch.bincount(experts[:, 0], minlength=self.num_experts) if self.first_only else counts

    def _balance_loss(self, probs: torch.Tensor, experts: torch.Tensor,
                      counts: torch.Tensor) -> Optional[torch.Tensor]:
        if self.aux_coeff == 0 or not torch.is_grad_enabled():
            return None
        if self.score == "sigmoid":
            probs = probs / probs.sum(-1, keepdim=True)                       # (N, E) normalized scores
        counted = self._balance_counts(experts, counts)                       # (E,)
        f = counted.float() / counted.sum().clamp_min(1)                      # (E,) counted fractions
        return self.aux_coeff * self.num_experts * (f * probs.mean(0)).sum()

    def _z_loss(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        if self.z_coeff == 0 or not torch.is_grad_enabled():
            return None
        return self.z_coeff * torch.logsumexp(logits, -1).square().mean()

    def _sequence_routing(self, experts: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                          probs: torch.Tensor, logits: torch.Tensor) -> Routing:
        """Routing whose losses and load share cover the whole sequence (``seq_reducer``)."""
        assert self.seq_reducer is not None
        E, N = self.num_experts, probs.shape[0]
        if self.score == "sigmoid":
            probs = probs / probs.sum(-1, keepdim=True)                       # (N, E) normalized scores
        psum = probs.sum(0)                                                   # (E,) this rank's score sums
        zsum = torch.logsumexp(logits, -1).square().sum()                     # this rank's z terms
        parts = [counts.float(), psum.detach(), zsum.detach()[None], probs.new_tensor([N])]
        if self.first_only:
            parts.append(self._balance_counts(experts, counts).float())       # (E,) first choices
        total = self.seq_reducer(torch.cat(parts))                            # (2E+2 [+E],) over the cp ranks
        all_counts, all_psum, all_z, rows = total[:E], total[E:2 * E], total[2 * E], total[2 * E + 1]
        counted = total[2 * E + 2:] if self.first_only else all_counts        # (E,) what the loss counts
        f = counted / counted.sum().clamp_min(1)                              # (E,) whole-sequence fractions
        aux = z = None
        if self.aux_coeff != 0:
            scale = self.aux_coeff * E / rows
            aux = _carrying((f * psum).sum() * scale, (f * all_psum).sum() * scale)
        if self.z_coeff != 0:
            z = _carrying(zsum * (self.z_coeff / rows), all_z * (self.z_coeff / rows))
        return Routing(experts, weights, counts, aux, z, all_counts / (rows * self.top_k))

    @torch.no_grad()
    def post_optimizer_step(self) -> None:
        """Auxiliary-loss-free balancing: bias += rate * sign(mean load - load), from the
        assignments of the whole step (summed over data-parallel ranks by ``load_reducer``,
        which the parallel layer sets), then the load counter restarts."""
        if self.rate == 0:
            return
        load = self.expert_load.clone()
        if self.load_reducer is not None:
            load = self.load_reducer(load)
        self.expert_bias.add_(self.rate * torch.sign(load.mean() - load))
        self.expert_load.zero_()

    def init_buffers(self) -> None:
        if self.rate > 0:
            self.expert_bias.zero_()
            self.expert_load.zero_()
