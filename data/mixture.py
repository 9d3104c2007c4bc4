"""Instruction Pre-Training mixtures: instruction-augmented, raw and general instruction data
blended at configured token ratios.

A mixture config (YAML, :class:`MixtureConfig`) lists sources of three kinds:

* ``augmented``: records of ``tools/synthesize_instructions.py`` (a document, its
  synthesized pairs, its multi-round predecessor). Each multi-round chain becomes
  pre-training text through :mod:`data.instruct_templates` (raw text followed by its pairs
  in varied templates, several documents of a chain concatenated while the text fits
  ``seq_len``), deterministic in the records and ``seed``;
* ``raw``: untouched text (JSONL/text files, tokenized by :func:`data.preprocess.preprocess`)
  or an existing dataset prefix, used as it is;
* ``instruction``: general instruction data, JSONL with a question and a response field,
  joined as plain text (question, separator, response, end of document); with
  ``response_only_loss`` a loss mask beside the dataset (:mod:`data.lossmask`) trains only
  the response tokens and the end-of-document token.

:func:`build_mixture` writes one Megatron dataset per source under ``output``, the blend
(``data.paths`` in source order, ``data.weights`` = the normalized ratios: the loader draws
whole ``seq_len`` samples with these probabilities, so the ratios hold by tokens), a
manifest ``mixture.json`` and ``pretrain.yaml``: the recipe ``run_config`` with that
``data`` section, ready for ``launch/pretrain.py --config``. Source ``i`` is dataset index
``i`` of the blend: its training loss is logged as ``loss/source<i>``.
:func:`realized_composition` measures the token shares the training loader actually
draws.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, Optional

import yaml

from polytron.data.errors import DataError
from polytron.data.files import ensure_writable_dir
from polytron.data.instruct import Synthesized, chains, record_of
from polytron.data.instruct_templates import FormatStats, format_chain
from polytron.data.lossmask import has_loss_mask, remove_loss_mask, write_dataset
from polytron.data.tokenizer import Tokenizer, load_tokenizer
from polytron.model.configlib import ConfigError, bad, doc, from_dict, load_yaml

KINDS = ("augmented", "raw", "instruction")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SourceConfig:
    """One source of the mixture."""
    name: str = field(default="", metadata=doc(
        "Source name; its dataset is written to <output>/<name> (letters, digits, '_', '.', '-')."))
    kind: Literal["augmented", "raw", "instruction"] = field(default="raw", metadata=doc(
        "augmented: synthesize_instructions.py records; raw: untouched text or an existing "
        "dataset; instruction: general instruction data (question and response fields)."))
    ratio: float = field(default=0.0, metadata=doc(
        "Share of the training tokens drawn from this source (normalized over all sources)."))
    inputs: list[str] = field(default_factory=list, metadata=doc(
        "Input files: JSONL records (augmented, instruction), JSONL or text (raw)."))
    prefix: str = field(default="", metadata=doc(
        "raw only: an existing dataset prefix (PREFIX.bin/.idx, same tokenizer), used as it is."))
    json_key: str = field(default="text", metadata=doc("raw JSONL inputs: the text field."))
    question_key: str = field(default="question", metadata=doc("instruction inputs: the question field."))
    response_key: str = field(default="response", metadata=doc("instruction inputs: the response field."))
    separator: str = field(default="\n\n", metadata=doc(
        "instruction: text between the question and the response."))
    response_only_loss: bool = field(default=False, metadata=doc(
        "instruction: train only on response tokens (and the end of document); the question's "
        "tokens get loss mask 0."))


@dataclass
class MixtureConfig:
    """A mixture to build with tools/build_mixture.py."""
    output: str = field(default="", metadata=doc("Directory for the datasets, manifest and run config."))
    tokenizer: str = field(default="", metadata=doc(
        "SentencePiece .model or Hugging Face tokenizer directory (the model's tokenizer)."))
    seq_len: int = field(default=2048, metadata=doc(
        "Training sequence length: few-shot augmented texts are packed to fit it; written as data.seq_len."))
    seed: int = field(default=1234, metadata=doc("Seed of the template choices."))
    workers: int = field(default=1, metadata=doc("Tokenizer processes for raw and augmented text."))
    run_config: str = field(default="", metadata=doc(
        "Recipe (launch/configs/ipt-*.yaml) to write pretrain.yaml from; empty: a data-only config."))
    sources: list[SourceConfig] = field(default_factory=list, metadata=doc("The sources, in blend order."))

    def validate(self) -> None:
        for key in ("output", "tokenizer"):
            if not getattr(self, key):
                raise bad(key, getattr(self, key), "a non-empty path")
        if self.seq_len < 2:
            raise bad("seq_len", self.seq_len, "an integer >= 2")
        if self.workers < 1:
            raise bad("workers", self.workers, "an integer >= 1")
        if self.run_config and not os.path.isfile(self.run_config):
            raise bad("run_config", self.run_config, "an existing YAML run config")
        if not self.sources:
            raise bad("sources", self.sources, "one or more sources")
        names = [s.name for s in self.sources]
        for i, src in enumerate(self.sources):
            _check_source(f"sources[{i}].", src)
            if names.index(src.name) != i:
                raise bad(f"sources[{i}].name", src.name, "a name no other source uses")


def _check_source(key: str, src: SourceConfig) -> None:
    """Rules of one source (see the field docs)."""
    if not _NAME.match(src.name):
        raise bad(key + "name", src.name, "letters, digits, '_', '.', '-' (not starting with '.', '_', '-')")
    if not src.ratio > 0:
        raise bad(key + "ratio", src.ratio, "a number > 0")
    if src.prefix and src.kind != "raw":
        raise bad(key + "prefix", src.prefix, "empty unless kind is raw")
    if src.response_only_loss and src.kind != "instruction":
        raise bad(key + "response_only_loss", True, "false unless kind is instruction")
    if src.kind == "raw" and bool(src.prefix) == bool(src.inputs):
        raise bad(key + "inputs", src.inputs, "input files, or a dataset prefix instead (not both)")
    if src.kind != "raw" and not src.inputs:
        raise bad(key + "inputs", src.inputs, "one or more input files")
    for j, path in enumerate(src.inputs):
        if not os.path.isfile(path):
            raise bad(f"{key}inputs[{j}]", path, "an existing file")
    if src.prefix and not os.path.isfile(src.prefix + ".idx"):
        raise bad(key + "prefix", src.prefix, "the prefix of an existing PREFIX.bin/PREFIX.idx dataset")


def load_mixture(path: str, overrides: dict | None = None) -> MixtureConfig:
    """Load and validate a mixture YAML (``overrides``: top-level keys replaced)."""
    data = load_yaml(path)
    data.update(overrides or {})
    cfg = from_dict(MixtureConfig, data)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- reading


def iter_jsonl(path: str) -> Iterator[tuple[int, dict | None]]:
    """(line number, object or None when the line is not a JSON object) per non-empty line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            yield n, obj if isinstance(obj, dict) else None


def read_synthesized(path: str) -> tuple[list[Synthesized], int]:
    """The records of one synthesis output file, and the number of unreadable lines."""
    docs, bad_lines = [], 0
    for _, obj in iter_jsonl(path):
        if obj is None:  # not a JSON object
            bad_lines += 1
            continue
        try:
            docs.append(record_of(obj))
        except (TypeError, KeyError, ValueError, AttributeError):    # not a record (or not an object)
            bad_lines += 1
    return docs, bad_lines


# ----------------------------------------------------------------------------- sources


@dataclass
class SourceResult:
    """What one source contributed (a row of mixture.json)."""
    name: str
    kind: str
    prefix: str
    ratio: float
    documents: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    loss_mask: bool = False
    skipped: int = 0
    detail: dict = field(default_factory=dict)


def _fits(tok: Tokenizer, seq_len: int):
    """Whether a text and its end-of-document token fit in one training sequence."""
    return lambda text: len(tok.encode(text)) + 1 <= seq_len


def build_augmented(src: SourceConfig, prefix: str, cfg: MixtureConfig, tok: Tokenizer) -> SourceResult:
    """Format the synthesized records into pre-training texts and tokenize them."""
    from polytron.data.preprocess import preprocess

    stats, unreadable = FormatStats(), 0
    staged = os.path.join(os.path.dirname(prefix), f".{src.name}.formatted-{os.getpid()}.jsonl")
    try:
        with open(staged, "w", encoding="utf-8") as out:
            for path in src.inputs:
                docs, bad_lines = read_synthesized(path)
                unreadable += bad_lines
                for chain in chains(docs):
                    for text in format_chain(chain, cfg.seed, _fits(tok, cfg.seq_len), stats):
                        out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        if stats.texts == 0:
            raise DataError(f"source {src.name}: {', '.join(src.inputs)} hold no synthesized record")
        remove_loss_mask(prefix)
        summ = preprocess([staged], prefix, tok.path, workers=cfg.workers)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    return SourceResult(src.name, src.kind, prefix, src.ratio, summ.documents, summ.tokens, summ.tokens,
                        skipped=unreadable, detail=asdict(stats))


def build_raw(src: SourceConfig, prefix: str, cfg: MixtureConfig, tok: Tokenizer) -> SourceResult:
    """Tokenize raw text (or take an existing dataset as it is)."""
    from polytron.data.preprocess import preprocess
    from polytron.data.validate import check_dataset

    if src.prefix:
        prefix = os.path.abspath(os.path.expanduser(src.prefix))
        _check_tokenizer_of(src, prefix, tok)
        info = check_dataset(prefix, tok.vocab_size, tok.vocab_size)
        return SourceResult(src.name, src.kind, prefix, src.ratio, info.sequences, info.tokens,
                            info.tokens, loss_mask=has_loss_mask(prefix))
    remove_loss_mask(prefix)
    summ = preprocess(list(src.inputs), prefix, tok.path, workers=cfg.workers, json_key=src.json_key)
    return SourceResult(src.name, src.kind, prefix, src.ratio, summ.documents, summ.tokens, summ.tokens,
                        skipped=summ.skipped)


def _check_tokenizer_of(src: SourceConfig, prefix: str, tok: Tokenizer) -> None:
    """A dataset used as it is must be of the mixture's tokenizer (when its summary says)."""
    from polytron.data.validate import dataset_fingerprint

    recorded = dataset_fingerprint(prefix)
    if recorded and recorded != tok.fingerprint:
        raise DataError(f"source {src.name}: dataset {prefix} was tokenized with {recorded} "
                        f"({prefix}.summary.json), the mixture's tokenizer {tok.path} is {tok.fingerprint}; "
                        f"retokenize its text with the mixture's tokenizer (give inputs instead of prefix)")


def instruction_docs(src: SourceConfig, tok: Tokenizer,
                     skipped: list[int]) -> Iterator[tuple[list[int], Optional[list[int]]]]:
    """(token ids, loss mask) of each general instruction pair: question and separator, then
    the response and the end-of-document token (encoded apart, so the mask falls on a token
    boundary). Records without both fields as non-empty strings are counted in ``skipped``."""
    for path in src.inputs:
        for _, obj in iter_jsonl(path):
            q = obj.get(src.question_key) if obj else None
            r = obj.get(src.response_key) if obj else None
            if not (isinstance(q, str) and isinstance(r, str) and q.strip() and r.strip()):
                skipped[0] += 1
                continue
            head, tail = tok.encode(q + src.separator), tok.encode(r) + [tok.eod_id]
            mask = [0] * len(head) + [1] * len(tail) if src.response_only_loss else None
            yield head + tail, mask


def build_instruction(src: SourceConfig, prefix: str, cfg: MixtureConfig, tok: Tokenizer) -> SourceResult:
    """Write the general instruction data (with its loss mask when asked)."""
    skipped = [0]

    def empty() -> str:
        return (f"source {src.name}: no record of {', '.join(src.inputs)} has non-empty string fields "
                f"'{src.question_key}' and '{src.response_key}' ({skipped[0]} skipped)")
    n, tokens, kept = write_dataset(prefix, instruction_docs(src, tok, skipped), tok.vocab_size,
                                    src.response_only_loss, empty)
    _write(prefix + ".summary.json", json.dumps(
        {"output_prefix": prefix, "documents": n, "tokens": tokens, "loss_tokens": kept, "skipped": skipped[0],
         "input_files": [os.path.abspath(p) for p in src.inputs], "tokenizer": tok.path,
         "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id},
        indent=1) + "\n")
    return SourceResult(src.name, src.kind, prefix, src.ratio, n, tokens, kept,
                        loss_mask=src.response_only_loss, skipped=skipped[0])


BUILDERS = {"augmented": build_augmented, "raw": build_raw, "instruction": build_instruction}


# ----------------------------------------------------------------------------- mixture


def build_mixture(cfg: MixtureConfig) -> dict:
    """Build every source, then write ``mixture.json`` and ``pretrain.yaml``; returns the manifest."""
    out = ensure_writable_dir(os.path.abspath(os.path.expanduser(cfg.output)), f"output {cfg.output}")
    tok = load_tokenizer(cfg.tokenizer)
    _check_no_output_is_an_input(cfg, out)
    results = [BUILDERS[s.kind](s, os.path.join(out, s.name), cfg, tok) for s in cfg.sources]
    total = sum(r.ratio for r in results)
    weights = [r.ratio / total for r in results]
    manifest = {"tokenizer": tok.path, "tokenizer_fingerprint": tok.fingerprint, "seq_len": cfg.seq_len,
                "seed": cfg.seed,
                "paths": [r.prefix for r in results], "weights": weights,
                "sources": [dict(asdict(r), source_id=i, weight=w) for i, (r, w) in enumerate(zip(results, weights))]}
    _write(os.path.join(out, "mixture.json"), json.dumps(manifest, indent=1) + "\n")
    _write(os.path.join(out, "pretrain.yaml"), yaml.safe_dump(run_config(cfg, manifest), sort_keys=False))
    return manifest


def _check_no_output_is_an_input(cfg: MixtureConfig, out: str) -> None:
    """No source may read a file another source writes (``<out>/<name>.*``), compared as
    files (device and inode) and by real directory, not as path strings."""
    from polytron.data.files import refuse_outputs_as_inputs

    built = [os.path.join(out, s.name) for s in cfg.sources if not s.prefix]
    for i, src in enumerate(cfg.sources):
        reads = list(src.inputs) + [src.prefix + ext for ext in (".bin", ".idx") if src.prefix]
        for target in built:
            try:
                refuse_outputs_as_inputs(reads, target, "source name or output")
            except DataError as e:
                raise DataError(f"sources[{i}] ({src.name}): {e}") from None


def run_config(cfg: MixtureConfig, manifest: dict) -> dict:
    """The recipe (or an empty config) with the mixture's data section."""
    base = load_yaml(cfg.run_config) if cfg.run_config else {}
    data = dict(base.get("data") or {})
    data.update(paths=manifest["paths"], weights=manifest["weights"], tokenizer=manifest["tokenizer"],
                seq_len=cfg.seq_len, builtin_corpus=False)
    return {**base, "data": data}


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def realized_composition(paths: list[str], weights: list[float], tokenizer: str, seq_len: int,
                         samples: int, seed: int, cache_dir: str, split: str = "100,0,0") -> list[dict]:
    """Per dataset of a blend: the samples, tokens and loss tokens the training loader draws
    in its first ``samples`` samples (the real loader: blending, packing, loss masks)."""
    from polytron.data.config import DataConfig
    from polytron.data.loader import build_data

    cfg = DataConfig(paths=list(paths), weights=list(weights), tokenizer=tokenizer, seq_len=seq_len,
                     split=split, cache_dir=cache_dir, prefetch=0)
    cfg.validate()
    batch = 16
    steps = math.ceil(samples / batch)
    vocab = load_tokenizer(tokenizer).vocab_size
    bundle = build_data(cfg, model_vocab_size=vocab, seed=seed, global_batch_size=batch,
                        micro_batch_size=batch, dp_rank=0, dp_size=1, train_iterations=steps,
                        eval_iterations=0, eval_interval=0)
    counts = [{"samples": 0, "tokens": 0, "loss_tokens": 0} for _ in paths]  # per source
    for _ in range(steps):
        for mb in bundle.train.next_step():
            ids = mb["source"].argmax(1).tolist() if "source" in mb else [0] * len(mb["tokens"])
            for i, mask in zip(ids, mb["loss_mask"]):
                counts[i]["samples"] += 1
                counts[i]["tokens"] += int(mask.numel())
                counts[i]["loss_tokens"] += int(mask.sum())
    totals = {key: max(sum(c[key] for c in counts), 1) for key in ("tokens", "loss_tokens")}
    return [{"source_id": i, "prefix": p, **c, **{f"{key}_share": c[key] / total for key, total in totals.items()}}
            for i, (p, c) in enumerate(zip(paths, counts))]


__all__ = ["MixtureConfig", "SourceConfig", "ConfigError", "build_mixture", "load_mixture",
           "realized_composition"]
