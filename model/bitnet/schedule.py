"""``schedule.kind: two_stage_linear``: BitNet b1.58's two-stage recipe with linear decays.

The training-tips FAQ trains with a linear decay scheduler ("we opted for the linear decay
scheduler throughout our experiments"; a cosine converged no better at the end): warmup,
stage 1 a linear decay from ``optimizer.lr`` toward ``optimizer.min_lr`` at the end of the
run, cut at ``schedule.stage2_start``; stage 2 restarts at ``schedule.stage2_lr`` and decays
linearly to ``min_lr``; the matrices' weight decay is ``stage2_weight_decay`` in stage 2.
``two_stage`` (pretrain/schedule.py) is the same with cosine decays.
"""
from __future__ import annotations

from polytron.pretrain.schedule import TwoStage, register_schedule


def linear_between(peak: float, floor: float, frac: float) -> float:
    """Straight line from ``peak`` (frac 0) to ``floor`` (frac >= 1)."""
    return peak - (peak - floor) * min(max(frac, 0.0), 1.0)


@register_schedule("two_stage_linear")
class TwoStageLinear(TwoStage):
    """:class:`~pretrain.schedule.TwoStage` with linear instead of cosine decays (the FAQ's)."""

    def after_warmup(self, it: int) -> float:
        mid, warm = self.stage2, self.cfg.warmup_iters
        if it < mid:
            return linear_between(self.opt.lr, self.opt.min_lr, (it - warm) / max(self.total - warm, 1))
        return linear_between(self.cfg.stage2_lr, self.opt.min_lr, (it - mid) / max(self.total - mid, 1))
