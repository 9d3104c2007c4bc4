"""Training losses: the object :class:`parallel.engine.TrainEngine` receives.

The engine owns the normalization (each micro-batch's token *sum* divided by the step's
global loss-token count, reduced over the data-parallel ranks separately, so every layout
gives the single-process loss); a loss object computes that token sum for one micro-batch
and may report statistics of its own (:func:`model.hooks.report`), which it turns into
logged values once they are reduced (:meth:`TokenLoss.finish`). Statistics reported as
``sum`` of token-loss sums and of token counts reduce exactly, so their ratio is the exact
token mean over a log interval in every layout.

A loss that needs more of the batch than the labels names the keys in ``extra_keys``
(each a (B, K) integer tensor per micro-batch); the engine moves them to the device and,
with pipelining, lets them ride to the last stage as extra target columns.

:class:`PerSourceLoss` (Instruction Pre-Training mixtures, ``data.per_source_loss``) is one
implementation: each blended dataset's loss is logged as ``loss/source<i>``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from polytron.model.hooks import report
from polytron.model.transformer import cross_entropy_sum

Batch = dict[str, torch.Tensor]


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as a plain tensor (no-op for plain tensors)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


class TokenLoss:
    """Summed token cross-entropy of a micro-batch (labels of -100 excluded)."""

    #: batch keys, beyond the labels, that :meth:`token_sum` reads
    extra_keys: tuple[str, ...] = ()

    def __init__(self, sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum):
        self.sum_fn = sum_fn

    def with_sum_fn(self, sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "TokenLoss":
        """This loss computing its plain token sum with ``sum_fn`` (e.g. a compiled one)."""
        self.sum_fn = sum_fn
        return self

    def token_sum(self, logits: torch.Tensor, labels: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """logits (B, T, V) (maybe vocab-sharded), labels (B, T) with -100 = no loss,
        ``extra`` the present ``extra_keys`` on the device -> scalar token-loss sum."""
        return self.sum_fn(logits, labels)

    def finish(self, stats: dict[str, float]) -> dict[str, float]:
        """Reduced statistics -> the values logged (this loss's raw statistics replaced)."""
        return stats


SOURCE_SUM, SOURCE_TOKENS = "source_loss_sum/", "source_loss_tokens/"


class PerSourceLoss(TokenLoss):
    """The token loss, plus each blended dataset's token-loss sum and loss-token count when
    the micro-batch carries ``source`` (B, S), each sample's dataset one-hot; logged as
    ``loss/source<i>`` (their ratio, when the source had loss tokens) and
    ``loss_tokens/source<i>``. Batches without ``source`` take the plain token loss."""

    extra_keys = ("source",)

    def token_sum(self, logits: torch.Tensor, labels: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        source = extra.get("source")
        if source is None:
            return self.sum_fn(logits, labels)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                    reduction="none")                  # (B*T,)
        report_by_source(plain(per_token.detach()), labels, source)
        return per_token.sum()

    def finish(self, stats: dict[str, float]) -> dict[str, float]:
        out = {k: v for k, v in stats.items() if not k.startswith((SOURCE_SUM, SOURCE_TOKENS))}
        for key, total in stats.items():
            if key.startswith(SOURCE_SUM):
                i = key[len(SOURCE_SUM):]
                out[f"loss_tokens/source{i}"] = tokens = stats.get(SOURCE_TOKENS + i, 0.0)
                if tokens > 0:
                    out[f"loss/source{i}"] = total / tokens
        return out


def report_by_source(per_token: torch.Tensor, labels: torch.Tensor, source: torch.Tensor) -> None:
    """Report each source's token-loss sum and loss-token count of one micro-batch.
    per_token (B*T,) fp32, labels (B, T) with -100 = no loss, source (B, S) one-hot."""
    onehot = source.float()                                              # (B, S)
    per_sample = per_token.float().view(labels.shape).sum(1)             # (B,)
    counted = (labels != -100).sum(1).float()                            # (B,)
    sums, counts = onehot.t() @ per_sample, onehot.t() @ counted         # (S,)
    for i in range(onehot.shape[1]):
        report(f"{SOURCE_SUM}{i}", sums[i], "sum")
        report(f"{SOURCE_TOKENS}{i}", counts[i], "sum")


def default_loss(loss: Optional[TokenLoss] = None) -> TokenLoss:
    """The engine's loss when none is given: per-source statistics whenever the data tags
    sources (it does so only with ``data.per_source_loss`` and several datasets)."""
    return loss if loss is not None else PerSourceLoss()
