"""An lm-evaluation-harness model backend serving polytron models directly.

:class:`PolytronLM` is a harness ``TemplateLM``: the harness turns a task's documents into
requests, this class answers them with our tokenizer and one of two scorers:

* :class:`ModelScorer`: a whole model in this process (``tools/evaluate.py``: any registered
  architecture, any layout the checkpoint was saved with, BitNet latent or packed). Requests
  are sorted by length, longest first, and batched (right padding: the model is causal, so a
  row's real positions never see its padding); ``generate_until`` decodes through the spec's
  own inference cache (``ModelSpec.make_cache``: dense, YOCO's shared key/value, DHA's
  per-layer heads), batching prompts of equal length and settings: greedily, or with
  ``do_sample: true`` by temperature and nucleus (``top_p``) sampling from torch's global
  generator (the harness seeds it).
* :class:`EngineScorer`: the training job's engine (in-loop evaluation,
  :mod:`pretrain.evaluation`): each row is scored through the engine's evaluation forward,
  so every layout's ranks cooperate as in validation.

Requests follow the harness's Hugging Face backend exactly, so the numbers equal its numbers on
the same model exported with ``tools/convert_checkpoint.py to-hf``: no BOS is added to contexts;
an empty context (and each rolling window) starts with the BOS token (EOS when the tokenizer has
none); a request longer than the context keeps its last ``max_length + 1`` tokens; rolling
log-likelihoods use the harness's disjoint windows of ``max_length`` tokens.

This module imports the harness (``pip install -e '.[eval]'``): import it only when evaluation
is asked for.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from polytron.model.generate import GenerationError
from polytron.parallel.loss import TokenLoss, plain

#: One scored row: the tokens (context + continuation, at most max_length + 1 of them) and how
#: many trailing tokens are the continuation whose log-likelihood is summed.
Row = tuple[list[int], int]


class Scorer(Protocol):
    """What :class:`PolytronLM` needs from a model."""
    max_length: int

    def loglikelihoods(self, rows: Sequence[Row], progress: Optional[tqdm]) -> list[tuple[float, bool]]:
        """(summed log-likelihood of the continuation, whether it is the greedy one) per row."""
        ...


class PolytronLM(TemplateLM):
    """The harness's view of a polytron model (see the module docstring)."""

    def __init__(self, scorer: Scorer, tokenizer: Any, show_progress: bool = True):
        super().__init__()
        self.scorer = scorer
        self.tok = tokenizer
        self.bos_id = tokenizer_bos(tokenizer)
        self.show_progress = show_progress

    # ------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.tok.eod_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tok.decode(list(tokens))

    # ------------------------------------------------------------ requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _progress(self, total: int, what: str, disable: bool) -> Optional[tqdm]:
        if disable or not self.show_progress:
            return None
        return tqdm(total=total, desc=what, unit="req", dynamic_ncols=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens) each."""
        rows = [((ctx + cont)[-(self.max_length + 1):], min(len(cont), self.max_length))
                for _, ctx, cont in requests]
        bar = self._progress(len(rows), "loglikelihood", disable_tqdm)
        try:
            out = self.scorer.loglikelihoods(rows, bar)
        finally:
            if bar is not None:
                bar.close()
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole text over disjoint windows of max_length tokens."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        generate = getattr(self.scorer, "generate", None)
        if generate is None:       # pretrain.evaluation skips generation tasks before they run
            raise GenerationError("generate_until: in-loop evaluation scores log-likelihoods only; "
                                  "run generation tasks with tools/evaluate.py")
        prepared = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id])
            if eot and eot not in until:
                until.append(eot)
            max_new = int(kw.pop("max_gen_toks", 256))
            max_new = min(max_new, self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            prepared.append((ids, max_new, until, kw))
        bar = self._progress(len(prepared), "generate_until", disable_tqdm)
        try:
            out = generate(prepared, self.tok, bar)
        finally:
            if bar is not None:
                bar.close()
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def tokenizer_bos(tok: Any) -> Optional[int]:
    """The tokenizer's beginning-of-sequence id, or None when it has none."""
    sp = getattr(tok, "_sp", None)
    if sp is not None:
        return int(sp.bos_id()) if sp.bos_id() >= 0 else None
    return getattr(getattr(tok, "_tok", None), "bos_token_id", None)


# ---------------------------------------------------------------- one-process scorer

class ModelScorer:
    """A whole model in this process: batches by length, answers greedily through its cache."""

    def __init__(self, model, batch_size: int = 16, max_batch_tokens: int = 16384):
        self.model = model.eval()
        self.max_length = int(model.cfg.max_seq_len)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Row indices grouped longest first, at most batch_size rows and max_batch_tokens tokens."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size \
                    and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= self.max_batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.no_grad()
    def loglikelihoods(self, rows: Sequence[Row], progress: Optional[tqdm]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for batch in self._batches([len(r[0]) - 1 for r in rows]):
            T = len(rows[batch[0]][0]) - 1
            inp = torch.zeros(len(batch), T, dtype=torch.long)                     # (B, T) right-padded
            for j, i in enumerate(batch):
                toks = rows[i][0][:-1]
                inp[j, :len(toks)] = torch.tensor(toks)
            logprobs = F.log_softmax(self.model(inp.to(self.device)).float(), dim=-1)   # (B, T, V)
            for j, i in enumerate(batch):
                toks, n = rows[i]
                end = len(toks) - 1
                lp = logprobs[j, end - n:end]                                      # (n, V)
                target = torch.tensor(toks[-n:], device=lp.device)                 # (n,)
                ll = lp.gather(-1, target[:, None]).sum().item()
                out[i] = (float(ll), bool((lp.argmax(-1) == target).all()))
            if progress is not None:
                progress.update(len(batch))
        return out

    @torch.no_grad()
    def generate(self, prepared: list, tok, progress: Optional[tqdm]) -> list[str]:
        """Continuations of (prompt ids, max new tokens, stop strings, kwargs) requests; prompts
        of equal length and sampling settings (:func:`sampling`) decode together through the
        model's cache."""
        from polytron.model.generate import stream
        out = [""] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, (ids, max_new, _, kw) in enumerate(prepared):
            groups.setdefault((len(ids), max_new, *sampling(kw)), []).append(i)
        for (_, max_new, temperature, top_p), members in sorted(groups.items(), key=lambda kv: -kv[0][0]):
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompt = torch.tensor([prepared[i][0] for i in chunk], device=self.device)   # (B, T0)
                new: list[list[int]] = [[] for _ in chunk]
                done = [False] * len(chunk)
                use_cache = getattr(self.model.spec, "make_cache", None) is not None
                for _, nxt in stream(self.model, prompt, max_new, temperature, top_p, use_cache=use_cache):
                    for j, t in enumerate(nxt.tolist()):
                        if not done[j]:
                            new[j].append(t)
                            done[j] = t == tok.eod_id or _stops(tok.decode(new[j]), prepared[chunk[j]][2])
                    if all(done):
                        break
                for j, i in enumerate(chunk):
                    out[i] = _cut(tok.decode([t for t in new[j] if t != tok.eod_id]), prepared[i][2])
                if progress is not None:
                    progress.update(len(chunk))
        return out


#: generate_until settings served besides ``until`` and ``max_gen_toks`` (taken earlier).
SAMPLING_KEYS = ("do_sample", "temperature", "top_p")


def sampling(kw: dict) -> tuple[float, float]:
    """(temperature, top_p) of a request's generation kwargs, as the harness's Hugging Face
    backend reads them: greedy (0.0, 1.0) unless ``do_sample`` is true (a temperature alone
    does not sample); sampling at ``temperature`` (1.0 when unset or 0) and ``top_p`` (1.0).
    Other settings (``top_k``, ``num_beams``, ...) are refused in one line, never ignored."""
    other = sorted(k for k in kw if k not in SAMPLING_KEYS)
    if other:
        raise GenerationError(f"generate_until: setting {', '.join(other)} is not served (only "
                              f"{', '.join(SAMPLING_KEYS)}, until and max_gen_toks)")
    if not kw.get("do_sample"):
        return 0.0, 1.0
    try:
        temperature, top_p = float(kw.get("temperature") or 1.0), float(kw.get("top_p", 1.0))
    except (TypeError, ValueError):
        raise GenerationError(f"generate_until: temperature {kw.get('temperature')!r} and top_p "
                              f"{kw.get('top_p')!r} must be numbers") from None
    if not (temperature > 0 and 0 < top_p <= 1):
        raise GenerationError(f"generate_until: need temperature > 0 and 0 < top_p <= 1 when sampling "
                              f"(got {temperature}, {top_p})")
    return temperature, top_p


def _stops(text: str, until: list[str]) -> bool:
    return any(s and s in text for s in until)


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string (as the harness's backends return it)."""
    for s in until:
        if s:
            text = text.split(s)[0]
    return text


# ---------------------------------------------------------------- the training engine

class RowLoss(TokenLoss):
    """The engine's token loss that also records each row's summed loss (in call order)."""

    def __init__(self, inner: TokenLoss):
        super().__init__(inner.sum_fn)
        self.rows: list[torch.Tensor] = []

    def token_sum(self, logits: torch.Tensor, labels: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                    reduction="none")                               # (B*T,)
        self.rows.append(plain(per_token.detach()).view(labels.shape).sum(1).double())   # (B,)
        return per_token.sum()


class EngineScorer:
    """Rows scored through the engine's evaluation forward under the run's layout.

    Each call of ``eval_loss`` takes ``n`` micro-batches of (micro_batch_size, seq_len) rows
    (``n`` = pipeline size, the training shapes): one request per row, right-padded, labels
    -100 outside the continuation. The data-parallel ranks take disjoint slices of the rows;
    the ranks that hold a row's full loss (the last pipeline stage, tensor-parallel rank 0;
    every context-parallel rank holds part of it) add it into a vector that one all-reduce
    completes on every rank. Greedy checks are not computed (``is_greedy`` is false).
    """

    def __init__(self, engine, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int,
                 pad_id: int, microbatches: int = 1, contributes: bool = True,
                 all_reduce: Optional[Callable[[torch.Tensor], None]] = None):
        self.engine = engine
        self.max_length = seq_len
        self.micro, self.n = micro_batch, microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pad_id = pad_id
        self.contributes = contributes
        self.all_reduce = all_reduce

    def _microbatches(self, rows: Sequence[Row]) -> list[dict[str, torch.Tensor]]:
        T = self.max_length
        tokens = torch.full((self.n * self.micro, T), self.pad_id, dtype=torch.long)    # (n*B, T)
        labels = torch.full((self.n * self.micro, T), -100, dtype=torch.long)
        for j, (toks, n) in enumerate(rows):
            L = len(toks) - 1
            tokens[j, :L] = torch.tensor(toks[:-1])
            labels[j, L - n:L] = torch.tensor(toks[-n:])
        return [{"tokens": tokens[k * self.micro:(k + 1) * self.micro],
                 "labels": labels[k * self.micro:(k + 1) * self.micro]} for k in range(self.n)]

    def loglikelihoods(self, rows: Sequence[Row], progress: Optional[tqdm]) -> list[tuple[float, bool]]:
        per_rank = self.n * self.micro
        per_call = per_rank * self.dp_size
        totals = torch.zeros(len(rows), dtype=torch.float64)
        inner = self.engine.loss
        for start in range(0, len(rows), per_call):
            first = start + self.dp_rank * per_rank
            mine = list(rows[first:min(first + per_rank, len(rows))])
            recorder = RowLoss(inner)
            self.engine.loss = recorder
            try:
                self.engine.eval_loss(self._microbatches(mine))
            finally:
                self.engine.loss = inner
            if self.contributes and recorder.rows:
                sums = torch.cat([r.cpu() for r in recorder.rows])                    # (n*B,)
                totals[first:first + len(mine)] += sums[:len(mine)]
            if progress is not None:
                progress.update(min(per_call, len(rows) - start))
        if self.all_reduce is not None:
            self.all_reduce(totals)
        return [(-float(t), False) for t in totals]


__all__ = ["PolytronLM", "ModelScorer", "EngineScorer", "RowLoss", "tokenizer_bos"]
