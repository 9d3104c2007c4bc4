"""Blended Megatron datasets and the resumable, data-parallel-sharded training loader.

Global sample order is a property of the data (prefixes, weights, split, seed,
seq_len, number of training samples), never of the number of ranks: step ``s`` of a
global batch ``G`` consumes global samples ``[c, c + G)`` where ``c`` is the number of
samples consumed before it; data-parallel rank ``r`` of ``D`` takes the contiguous
slice ``[c + r*G/D, c + (r+1)*G/D)`` and cuts it into micro batches in order. The
loader's state is just ``consumed_samples``, so a checkpoint restores exactly, also at
another ``D``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import torch

from polytron.data.builtin import ensure_builtin_corpus, file_lock
from polytron.data.config import DataConfig
from polytron.data.errors import DataError
from polytron.data.files import ensure_writable_dir
from polytron.data.tokenizer import Tokenizer, load_tokenizer
from polytron.data.validate import IndexInfo, check_dataset, check_dataset_tokenizer, check_tokenizer_fits

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
STATE_VERSION = 1


# ----------------------------------------------------------------------------- batches

def collate(samples: list[dict], eod_id: int, position_ids: bool, doc_ids: bool,
            sources: int = 0) -> Batch:
    """Stack GPTDataset samples into one micro batch.

    ``loss_mask`` (B, T) is the per-token loss-mask channel: 0 where the loss is masked
    (padding, EOD inputs with ``eod_mask_loss``, or any token a data source masks); the
    training step folds it into the labels and counts only unmasked tokens. ``doc_ids``
    numbers the documents inside each packed sample; an EOD token belongs to the
    document it ends. With ``sources`` = S blended datasets, ``source`` (B, S) is one-hot over
    the dataset (``data.paths`` index) each sample came from, for the per-source loss.
    """
    tokens = torch.stack([s["tokens"] for s in samples]).long()          # (B, T)
    labels = torch.stack([s["labels"] for s in samples]).long()          # (B, T)
    loss_mask = torch.stack([s["loss_mask"] for s in samples]).to(torch.uint8)   # (B, T)
    out: Batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    if position_ids:
        out["position_ids"] = torch.stack([s["position_ids"] for s in samples]).long()  # (B, T)
    if doc_ids:
        is_eod = (tokens == eod_id).long()                                # (B, T)
        out["doc_ids"] = torch.cumsum(is_eod, dim=1) - is_eod             # (B, T)
    if sources and "dataset_id" in samples[0]:
        ids = torch.tensor([int(s["dataset_id"]) for s in samples])          # (B,)
        out["source"] = torch.nn.functional.one_hot(ids, sources)          # (B, S)
    return out


def rank_slice(start: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    """Global sample indices of one rank for the step starting at sample ``start``."""
    per_rank = global_batch // dp_size
    first = start + dp_rank * per_rank
    return range(first, first + per_rank)


class _Sampler:
    """Turns global sample indices into micro batches of one rank."""

    def __init__(self, dataset: Any, micro: int, eod_id: int, position_ids: bool, doc_ids: bool,
                 name: str, sources: bool = False) -> None:
        self.dataset = dataset
        self.sources = len(getattr(dataset, "datasets", ())) if sources else 0   # blended datasets
        self.micro = micro
        self.eod_id = eod_id
        self.position_ids = position_ids
        self.doc_ids = doc_ids
        self.name = name
        self._warned = False

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, idx: int) -> dict:
        n = len(self.dataset)
        if idx >= n and not self._warned:
            log.warning("%s data: sample %d is past the %d samples built; wrapping around "
                        "(the run is longer than the data was built for)", self.name, idx, n)
            self._warned = True
        return self.dataset[idx % n]

    def micro_batches(self, indices: range) -> list[Batch]:
        """Split one rank's slice of a global batch into micro batches, in order."""
        out = []
        for b in range(0, len(indices), self.micro):
            samples = [self.sample(i) for i in indices[b:b + self.micro]]
            out.append(collate(samples, self.eod_id, self.position_ids, self.doc_ids, self.sources))
        return out


# ----------------------------------------------------------------------------- loader

class TrainLoader:
    """Resumable training batches for one data-parallel rank, with background prefetch.

    ``next_step()`` returns the ``accum = G / (micro * D)`` micro batches of this rank
    for the next global step. ``state_dict()`` records the samples *consumed* through
    ``next_step`` (prefetched batches are not counted), so restoring it replays exactly
    the samples an uninterrupted run would see next.
    """

    def __init__(self, sampler: _Sampler, global_batch: int, dp_rank: int, dp_size: int,
                 prefetch: int, fingerprint: str, num_samples: int) -> None:
        self._sampler = sampler
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.prefetch = prefetch
        self.fingerprint = fingerprint
        self.num_samples = num_samples
        self.consumed_samples = 0
        self._worker: _Prefetcher | None = None

    @property
    def dataset(self) -> Any:
        """The underlying megatron-core dataset (GPTDataset or BlendedDataset)."""
        return self._sampler.dataset

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self._sampler.micro * self.dp_size)

    def build_step(self, start: int) -> list[Batch]:
        """Micro batches of this rank for the global step beginning at sample ``start``."""
        return self._sampler.micro_batches(rank_slice(start, self.global_batch, self.dp_rank, self.dp_size))

    def next_step(self) -> list[Batch]:
        """This rank's micro batches of the next global step; advances the position."""
        start = self.consumed_samples
        if self.prefetch > 0:
            if self._worker is None:
                self._worker = _Prefetcher(self.build_step, start, self.global_batch, self.prefetch)
            got_start, batches = self._worker.get()
            assert got_start == start, (got_start, start)
        else:
            batches = self.build_step(start)
        self.consumed_samples = start + self.global_batch
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        """Plain, JSON-safe position: consumed samples plus a fingerprint of the order."""
        return {"version": STATE_VERSION, "consumed_samples": int(self.consumed_samples),
                "fingerprint": self.fingerprint, "num_samples": int(self.num_samples)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state['consumed_samples']`` (valid for any data-parallel size)."""
        if "consumed_samples" not in state:
            raise DataError(f"data loader state has no 'consumed_samples': {sorted(state)}")
        if state.get("fingerprint") not in (None, self.fingerprint):
            log.warning("data loader state was saved with a different data configuration "
                        "(paths/weights/split/seed/seq_len/tokenizer); the resumed sample order "
                        "will not continue the saved run's order")
        elif state.get("num_samples") not in (None, self.num_samples):
            log.warning("data loader state was saved for %s training samples, now %d: datasets "
                        "spanning several epochs may order samples differently",
                        state.get("num_samples"), self.num_samples)
        self.close()
        self.consumed_samples = int(state["consumed_samples"])

    def close(self) -> None:
        """Stop the prefetch thread (restarted lazily by the next ``next_step``)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _Prefetcher:
    """Background thread building the next steps into a bounded queue."""

    def __init__(self, build: Callable[[int], list[Batch]], start: int, stride: int, depth: int) -> None:
        self._build = build
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, stride), daemon=True,
                                        name="polytron-data-prefetch")
        self._thread.start()

    def _run(self, start: int, stride: int) -> None:
        s = start
        while not self._stop.is_set():
            try:
                item: tuple = (s, self._build(s), None)
            except BaseException as e:  # hand the error to the consumer
                item = (s, None, e)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            s += stride

    def get(self) -> tuple[int, list[Batch]]:
        while True:
            try:
                s, batches, err = self._q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("data prefetch thread died without a result") from None
        if err is not None:
            raise err
        return s, batches

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._thread.join(timeout=10)


# ----------------------------------------------------------------------------- bundle

@dataclass
class DataBundle:
    """What :func:`build_data` returns to the trainer."""
    tokenizer: Tokenizer
    train: TrainLoader
    valid: Any | None
    test: Any | None
    prefixes: list[str]
    weights: list[float] | None
    infos: list[IndexInfo] = field(default_factory=list)
    _valid_sampler: _Sampler | None = None

    def valid_batches(self, n: int) -> Iterator[Batch]:
        """``n`` micro batches of this rank from the validation split, same every call."""
        s = self._valid_sampler
        if s is None or n <= 0:
            return iter(())
        return self._iter_valid(s, n)

    def _iter_valid(self, s: _Sampler, n: int) -> Iterator[Batch]:
        t = self.train
        step, made = 0, 0
        while made < n:
            for mb in s.micro_batches(rank_slice(step * t.global_batch, t.global_batch, t.dp_rank, t.dp_size)):
                if made == n:
                    return
                yield mb
                made += 1
            step += 1

    def describe(self) -> str:
        """One line for the log."""
        tok = sum(i.tokens for i in self.infos)
        return (f"data: {len(self.prefixes)} dataset(s), {tok} tokens, tokenizer {self.tokenizer.path} "
                f"(vocab {self.tokenizer.vocab_size}); train samples {len(self.train.dataset)}"
                + (f", valid samples {len(self.valid)}" if self.valid is not None else ""))


def _resolve(cfg: DataConfig) -> tuple[list[str], str]:
    """Dataset prefixes and tokenizer path (building the built-in corpus if asked)."""
    prefixes = [os.path.abspath(os.path.expanduser(p)) for p in cfg.paths]
    tok_path = cfg.tokenizer
    ensure_writable_dir(cfg.cache_dir, f"data.cache_dir {cfg.cache_dir}")
    if cfg.builtin_corpus:
        corpus = ensure_builtin_corpus(cfg.cache_dir, cfg.tokenizer_vocab_size)
        if not prefixes:
            prefixes = [corpus.prefix]
        if not tok_path:
            tok_path = corpus.tokenizer
    if not prefixes:
        raise DataError("no training data: set data.paths (Megatron PREFIX of PREFIX.bin/.idx "
                        "files) or data.builtin_corpus=true")
    for p in prefixes:
        if p.endswith((".bin", ".idx")):
            raise DataError(f"data path {p}: give the prefix, without .bin/.idx")
    return prefixes, tok_path


def _check_splits(infos: list[IndexInfo], split: str) -> None:
    """Every split with a non-zero share must get at least one document of each dataset."""
    from polytron.data._megatron import Split, convert_split_vector_to_split_matrix, parse_and_normalize_split

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for info in infos:
        for sp, bounds in zip(Split, matrix):
            if bounds is None:
                continue
            beg, end = (int(round(b * info.sequences)) for b in bounds)
            if end <= beg:
                raise DataError(f"dataset {info.prefix}: its {info.sequences} documents leave the "
                                f"{sp.name} split of data.split={split!r} empty; add data or change data.split")


def _check_eval(split: str, eval_interval: int) -> None:
    """Evaluation asked for (``eval_interval > 0``) needs a validation share in the split."""
    from polytron.data._megatron import parse_and_normalize_split

    if eval_interval > 0 and parse_and_normalize_split(split)[1] == 0:
        raise DataError(f"data.split={split!r} leaves no validation data, but training.eval_interval="
                        f"{eval_interval} asks for evaluation; give the validation part a share "
                        f"(e.g. data.split=98,2,0) or set training.eval_interval=0")


def _index_bytes(infos: list[IndexInfo], weights: list[float] | None, split: str, samples: int,
                 seq_len: int) -> tuple[int, float, IndexInfo]:
    """Peak bytes megatron-core needs to build the training sample indices, and the epochs
    of the most repeated dataset (with that dataset).

    Per dataset it builds a document index of ``epochs x documents`` entries (through a
    2 x epochs x documents int64 grid) plus sample and shuffle indices of ``samples``
    entries, where ``epochs`` is how often the split's tokens must repeat.
    """
    from polytron.data._megatron import parse_and_normalize_split

    share = parse_and_normalize_split(split)[0]
    total = sum(weights) if weights else 1.0
    need, worst = 0, (0.0, infos[0])
    for i, info in enumerate(infos):
        n = samples * (weights[i] / total if weights else 1.0)
        epochs = math.ceil((n * seq_len + 1) / max(info.tokens * share, 1))
        need += int(16 * epochs * max(info.sequences * share, 1) + 24 * n)
        worst = max(worst, (float(epochs), info), key=lambda w: w[0])
    return need, worst[0], worst[1]


def _check_index_memory(infos: list[IndexInfo], weights: list[float] | None, split: str,
                        samples: int, seq_len: int) -> None:
    """Refuse, before megatron-core tries, a run whose sample indices cannot fit in memory
    (a run far longer than its data: millions of passes over a small corpus)."""
    need, epochs, info = _index_bytes(infos, weights, split, samples, seq_len)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > host // 2:
        raise DataError(
            f"training on {samples} samples of {seq_len} tokens repeats dataset {info.prefix} "
            f"{epochs:.3g} times; megatron-core's sample index for that needs {need / 2**30:.1f} GiB, "
            f"more than half of this host's {host / 2**30:.0f} GiB: add data or lower training.iterations")


def _fingerprint(prefixes: list[str], weights: list[float] | None, cfg: DataConfig, seed: int,
                 tok: Tokenizer) -> str:
    key = {"prefixes": prefixes, "weights": weights, "split": cfg.split, "seq_len": cfg.seq_len,
           "seed": seed, "tokenizer_vocab": tok.vocab_size}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_data(cfg: DataConfig, *, model_vocab_size: int, seed: int, global_batch_size: int,
               micro_batch_size: int, dp_rank: int, dp_size: int, train_iterations: int,
               eval_iterations: int, eval_interval: int) -> DataBundle:
    """Validate the data against the model and build the train/valid/test datasets.

    Call on every rank. With an initialized ``torch.distributed`` process group,
    megatron-core builds its index caches on global rank 0 first (barrier), then the
    other ranks load them; without one, builders serialize on a file lock.
    """
    if global_batch_size % (micro_batch_size * dp_size):
        raise DataError(f"global batch {global_batch_size} is not divisible by micro batch "
                        f"{micro_batch_size} x data-parallel size {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"data-parallel rank {dp_rank} outside [0, {dp_size})")
    _check_eval(cfg.split, eval_interval)
    prefixes, tok_path = _resolve(cfg)
    tok = load_tokenizer(tok_path)
    check_tokenizer_fits(tok.path, tok.vocab_size, model_vocab_size)
    for p in prefixes:
        check_dataset_tokenizer(p, tok.fingerprint, tok.path, cfg.allow_tokenizer_mismatch)
    infos = [check_dataset(p, tok.vocab_size, model_vocab_size) for p in prefixes]
    _check_splits(infos, cfg.split)
    weights: list[float] | None = None
    if len(prefixes) > 1:  # empty weights: proportional to dataset size in tokens
        weights = list(cfg.weights) if cfg.weights else [float(i.tokens) for i in infos]
    G = global_batch_size
    sizes = [max(train_iterations, 1) * G, max(eval_iterations, 1) * G, G]
    _check_index_memory(infos, weights, cfg.split, sizes[0], cfg.seq_len)
    datasets = _build_megatron(cfg, prefixes, weights, tok, seed, sizes)
    sampler = partial(_Sampler, eod_id=tok.eod_id, position_ids=cfg.reset_position_ids,
                      doc_ids=cfg.reset_attention_mask, sources=cfg.per_source_loss)
    train = TrainLoader(sampler(datasets[0], micro_batch_size, name="train"), G, dp_rank,
                        dp_size, cfg.prefetch, _fingerprint(prefixes, weights, cfg, seed, tok), sizes[0])
    valid = datasets[1]
    vs = sampler(valid, micro_batch_size, name="valid") if valid is not None and len(valid) else None
    bundle = DataBundle(tok, train, valid, datasets[2], prefixes, weights, infos, vs)
    log.info(bundle.describe())
    return bundle


def _build_megatron(cfg: DataConfig, prefixes: list[str], weights: list[float] | None,
                    tok: Tokenizer, seed: int, sizes: list[int]) -> list:
    """Run megatron-core's BlendedMegatronDatasetBuilder for GPTDataset splits."""
    from polytron.data._megatron import GPTDatasetConfig
    from polytron.data.index_cache import CheckedGPTDataset
    from polytron.data.lossmask import MaskedGPTDataset, has_loss_mask

    cache = ensure_writable_dir(os.path.join(os.path.expanduser(cfg.cache_dir), "megatron-index"),
                                f"data.cache_dir {cfg.cache_dir}")
    mcfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=cfg.seq_len, blend=(prefixes, weights), split=cfg.split,
        path_to_cache=cache, tokenizer=tok, reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask, eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False, mmap_bin_files=True,
        fast_cache_load=False, defer_npy_index_mmap=False)  # CheckedGPTDataset reads the cache
    # per-token loss masks beside a prefix (data/lossmask.py); a blend needs one dataset class
    cls = MaskedGPTDataset if any(has_loss_mask(p) for p in prefixes) else CheckedGPTDataset
    builder = _Builder(cls, sizes, lambda: True, mcfg)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return builder.build()
    with file_lock(os.path.join(cache, "build.lock")):
        return builder.build()


def _builder_base():
    from polytron.data._megatron import BlendedMegatronDatasetBuilder

    return BlendedMegatronDatasetBuilder


class _Builder(_builder_base()):  # type: ignore[misc]
    """megatron-core's builder, keeping blend indices in memory (no rank-0 cache race).

    ``BlendedDataset`` with a cache path calls ``torch.distributed.get_rank()`` even
    without a process group; its indices are cheap to compute, so each rank builds them.
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):  # noqa: D102
        from polytron.data._megatron import BlendedDataset

        if cls is BlendedDataset:
            import copy

            args = list(args)
            local = copy.copy(args[-1])
            local.path_to_cache = None
            args[-1] = local
        return _builder_base().build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)
