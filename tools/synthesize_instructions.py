#!/usr/bin/env python
"""Synthesize instruction-response pairs from raw text with an instruction synthesizer.

    python tools/synthesize_instructions.py --model SYNTH --input raw.jsonl [more.jsonl ...]
        --output pairs.jsonl [--json-key text] [--batch-size 8] [--rounds 1]
        [--max-new-tokens 400] [--max-model-len 0] [--temperature 0] [--top-p 1.0] [--seed 0]
        [--device cpu] [--dtype fp32|bf16|fp16] [--tokenizer PATH] [--keep-generation] [--no-progress]
        [--trust-remote-code]

SYNTH is a local Hugging Face causal-LM directory (``config.json`` + weights + tokenizer,
loaded offline with ``local_files_only``; e.g. a downloaded copy of the released
instruction synthesizer) or one of our checkpoints (a checkpoint directory, root or run
directory; its run's tokenizer unless ``--tokenizer``).

A model directory is data, never code: its weights are read from safetensors only (a
directory holding only pickled ``pytorch_model.bin`` weights is refused before anything is
unpickled), and transformers is called with ``trust_remote_code=False``, so custom
modeling/tokenizer files named by ``auto_map`` are not run unless ``--trust-remote-code`` is
given; the tool never prompts and never reads stdin.

Each input document gets the released prompt (data/instruct.py); generation is batched
(greedy at ``--temperature 0``, else temperature + top-p sampling seeded per batch) and
parsed into pairs, malformed ones counted and dropped. Multi-round synthesis
(``--rounds M``) follows the released scheme over windows of ``batch x M`` documents:
round ``r`` of a window is one batch, and its ``i``-th document is prompted after the
``i``-th document of round ``r - 1`` with its pairs (and the documents that one
continued), as many of those as fit ``--max-model-len - --max-new-tokens`` tokens. A
document too long for the prompt is cut to fit (recorded as ``truncated``).

OUTPUT gets one JSON line per input document, in input order: ``id`` (0-based among the
valid input documents), ``text``, ``pairs`` ([{question, answer}]), ``prev`` (the
document prompted right before it, or null), ``history``, ``malformed``, ``duplicates``,
``unfinished``, ``truncated`` (and ``generation`` with ``--keep-generation``).
``OUTPUT.meta.json`` records the settings. The run is resumable: after a kill (even -9)
the same command drops a torn last line, checks the settings and the documents already
written, and continues with the next document, so no document is done twice and none is
skipped. Records are flushed one by one and synced after every batch.

Exit status 0; 2 with one ``error:`` line for bad input (no such model or input, settings
differing from the output being resumed, a prompt budget too small).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, cast

from polytron.data.instruct import (
    Synthesized,
    encode_prompt,
    history_of,
    parse_pairs,
    record_of,
    render_prompt,
    synthesis_prompt,
)
from polytron.model.errors import BadInput
from polytron.pretrain.faults import fault_point
from polytron.tools.cli import command

META_VERSION = 1
#: Settings a resumed run must share with the run that wrote the output.
RESUME_KEYS = ("model", "inputs", "json_key", "rounds", "batch_size", "max_new_tokens", "max_model_len",
               "temperature", "top_p", "seed")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Synthesize instruction-response pairs from raw text.")
    p.add_argument("--model", required=True, help="Hugging Face causal-LM directory or polytron checkpoint")
    p.add_argument("--input", nargs="+", required=True, help="raw JSONL files (.jsonl or .jsonl.gz)")
    p.add_argument("--output", required=True, help="JSONL of pairs per document (resumed if present)")
    p.add_argument("--json-key", default="text", help="text field of the input records")
    p.add_argument("--batch-size", type=int, default=8, help="documents per generation batch")
    p.add_argument("--rounds", type=int, default=1, help="multi-round synthesis rounds (M)")
    p.add_argument("--max-new-tokens", type=int, default=400, help="generated tokens per document at most")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="prompt + generation budget in tokens (0: the model's maximum)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept when sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per batch: seed and first document)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype")
    p.add_argument("--tokenizer", help="checkpoints only: tokenizer instead of the run's")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Hugging Face directories only: run the directory's own Python files (auto_map); "
                        "off by default, and the tool never asks")
    p.add_argument("--keep-generation", action="store_true", help="store the raw generation in each record")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible settings before loading anything."""
    for name in ("batch_size", "rounds", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.max_model_len < 0:
        raise BadInput(f"--max-model-len {args.max_model_len}: must be >= 0")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise BadInput(f"--temperature {args.temperature} / --top-p {args.top_p}: need temperature >= 0 "
                       "and 0 < top-p <= 1")
    for path in args.input:
        if not os.path.isfile(path):
            raise BadInput(f"--input {path}: no such file")
    if not os.path.exists(args.model):
        raise BadInput(f"--model {args.model}: no such file or directory")


# ---------------------------------------------------------------- input documents

@dataclass
class InputCounts:
    """Input lines that are not documents (invalid JSON, no non-empty string text field)."""
    skipped: int = 0


def read_documents(paths: list[str], json_key: str, counts: InputCounts) -> Iterator[str]:
    """The text of every valid input record, in order."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                text = obj.get(json_key) if isinstance(obj, dict) else None
                if isinstance(text, str) and text.strip():
                    yield text
                else:
                    counts.skipped += 1


# ---------------------------------------------------------------- synthesizers

class HFSynthesizer:
    """A Hugging Face causal LM directory: left-padded batched ``generate`` with its KV cache."""

    def __init__(self, path: str, device: str, dtype, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        check_safetensors(path)
        opts = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        try:
            with no_stdin():
                self.tok = AutoTokenizer.from_pretrained(path, **opts)
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **opts)
        except Exception as e:                  # a foreign directory: whatever transformers raises is bad input
            raise BadInput(hf_load_error(path, e)) from None
        # transformers wraps ``to`` with functools.wraps; mypy then reads it as unbound (self missing)
        self.model.to(device).eval()  # type: ignore[arg-type]
        self.device = torch.device(device)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos or 0)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        vocab = int(getattr(self.model.config, "vocab_size", 0) or len(self.tok))
        self.beyond = list(range(len(self.tok), vocab)) or None   # padded embedding rows: never generated

    def encode_prompt(self, prompt: list) -> list[int]:
        """The released tokenization: the prompt string with the tokenizer's own BOS/EOS text,
        special tokens parsed by the tokenizer, none added."""
        text = render_prompt(prompt, self.tok.bos_token or "", self.tok.eos_token or "")
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return cast(str, self.tok.decode(ids, skip_special_tokens=False))   # one sequence: one string

    def generate(self, rows: list[list[int]], max_new: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows], device=self.device)   # (B, T0)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        sampling = temperature > 0
        if sampling:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                      do_sample=sampling, temperature=temperature if sampling else None,
                                      top_p=top_p if sampling else None, top_k=0 if sampling else None,
                                      pad_token_id=self.pad, eos_token_id=self.eos,
                                      suppress_tokens=self.beyond)
        return [cut_at(row.tolist(), self.eos) for row in out[:, width:]]


class CheckpointSynthesizer:
    """One of our checkpoints: left-padded batches recomputed every step with per-row
    positions and a document mask that hides the padding (exact for any spec)."""

    def __init__(self, path: str, device: str, dtype, tokenizer: Optional[str]):
        from polytron.pretrain import checkpoint as ckpt
        from polytron.tools.generate import bos_id, load_model, load_run_tokenizer, model_config

        path = ckpt.resolve_checkpoint(path)
        state = ckpt.read_trainer_state(path)
        cfg = model_config(state, path)           # a checkpoint listing model.plugins is refused
        self.tok = load_run_tokenizer(state.get("config", {}), tokenizer, path, state.get("tokenizer_fingerprint"))
        self.model = load_model(path, cfg, device).to(dtype)
        self.bos, self.eos = bos_id(self.tok), self.tok.eod_id
        self.max_len = cfg.max_seq_len
        self.vocab = self.tok.vocab_size          # the model's embedding may have more rows

    def encode_prompt(self, prompt: list) -> list[int]:
        return encode_prompt(prompt, self.tok.encode, self.bos, self.eos)

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def generate(self, rows: list[list[int]], max_new: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]:
        import torch

        from polytron.model.generate import sample_next

        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)     # (B, T0)
        first = torch.tensor([width - len(r) for r in rows], device=device)[:, None]         # (B, 1)
        gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)                      # (B,)
        with torch.no_grad():
            for _ in range(max_new):
                pos = torch.arange(tokens.shape[1], device=device)[None] - first               # (B, T)
                docs = (pos >= 0).long()                                                       # padding: doc 0
                logits = self.model(tokens, position_ids=pos.clamp_min(0), doc_ids=docs)[:, -1].float()  # (B, V)
                logits[:, self.vocab:] = float("-inf")                                   # no such token
                nxt = sample_next(logits, temperature, top_p, gen).masked_fill(done, self.eos)
                done |= nxt == self.eos
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                if bool(done.all()):
                    break
        return [cut_at(row.tolist(), self.eos) for row in tokens[:, width:]]


#: Weight files that are pickles: unpickling can run code, so they are never read.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(path: str) -> None:
    """A Hugging Face directory is data: its weights must be safetensors; one holding only
    pickled weights (``pytorch_model.bin``) is refused before anything is unpickled."""
    names = os.listdir(path)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHTS))
    if pickled:
        raise BadInput(f"--model {path}: its weights are pickled ({', '.join(pickled[:3])}), which can run code "
                       "when loaded and are never read; convert them to safetensors")


def hf_load_error(path: str, e: Exception) -> str:
    """The one line for a Hugging Face directory transformers could not load."""
    text = str(e).strip()
    if "trust_remote_code" in text or "custom code" in text:
        return (f"--model {path}: the directory names custom code (auto_map: its own modeling/tokenizer "
                "Python files), which is not run; pass --trust-remote-code to run it if you trust its author")
    return (f"--model {path}: not a loadable Hugging Face causal LM "
            f"({text.splitlines()[0] if text else type(e).__name__})")


@contextlib.contextmanager
def no_stdin() -> Iterator[None]:
    """Nothing a library does while loading may read stdin (transformers' "run the custom
    code? [y/N]" prompt): stdin is an empty stream meanwhile."""
    saved = sys.stdin
    with open(os.devnull, encoding="utf-8") as empty:
        sys.stdin = empty
        try:
            yield
        finally:
            sys.stdin = saved


def cut_at(ids: list[int], eos: Optional[int]) -> list[int]:
    """Generated ids up to (not including) the first end-of-sequence token."""
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


def load_synthesizer(args: argparse.Namespace):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if os.path.isfile(os.path.join(args.model, "config.json")):
        if args.tokenizer:
            raise BadInput("--tokenizer applies to polytron checkpoints; a Hugging Face directory brings its own")
        return HFSynthesizer(args.model, args.device, dtype, args.trust_remote_code)
    return CheckpointSynthesizer(args.model, args.device, dtype, args.tokenizer)


# ---------------------------------------------------------------- output and resume

def settings_of(args: argparse.Namespace, max_model_len: int) -> dict:
    return {"version": META_VERSION, "model": os.path.abspath(args.model),
            "inputs": [os.path.abspath(p) for p in args.input], "json_key": args.json_key,
            "rounds": args.rounds, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "max_model_len": max_model_len, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}


def check_meta(path: str, settings: dict, resuming: bool) -> None:
    """Write ``OUTPUT.meta.json``, or on resume require the recorded settings."""
    meta = path + ".meta.json"
    if resuming and os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            old = json.load(f)
        for key in RESUME_KEYS:
            if old.get(key) != settings[key]:
                raise BadInput(f"{path} was written with {key}={old.get(key)!r}, this run has "
                               f"{settings[key]!r}; use the same settings to resume, or a new --output")
        return
    if resuming:
        raise BadInput(f"{path} exists but has no {os.path.basename(meta)}: not an output of this tool")
    tmp = f"{meta}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, meta)


@dataclass
class Totals:
    """Counts over every record of the output (resumed ones included)."""
    documents: int = 0
    pairs: int = 0
    malformed: int = 0
    duplicates: int = 0
    unfinished: int = 0
    truncated: int = 0
    written: int = 0            # records this run wrote
    seconds: float = 0.0        # this run's time in synthesis (prompts, generation, parsing, writing)
    skipped_inputs: int = 0     # input lines that are no document

    def add(self, rec: dict) -> None:
        self.documents += 1
        self.pairs += len(rec.get("pairs") or ())
        for key in ("malformed", "duplicates"):
            setattr(self, key, getattr(self, key) + int(rec.get(key) or 0))
        self.unfinished += bool(rec.get("unfinished"))
        self.truncated += bool(rec.get("truncated"))


def read_done(path: str, totals: Totals) -> list[dict]:
    """Complete records of an existing output (a torn last line from a kill is cut off)."""
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        print(f"note: {path}: dropping an incomplete last line ({len(data) - keep} bytes) from an "
              "interrupted run", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(keep)
    records = []
    for n, line in enumerate(data[:keep].decode("utf-8", "replace").splitlines()):
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and rec.get("id") == n and isinstance(rec.get("text"), str)
        except ValueError:
            ok = False
        if not ok:
            raise BadInput(f"{path} line {n + 1}: not record {n} of this tool; use a new --output")
        totals.add(rec)
        records.append(rec)
    return records


class Writer:
    """Appends records, flushed one by one and synced after every batch."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        fault_point("synthesize.record")

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------- synthesis


@dataclass
class Run:
    """What one synthesis run needs besides the documents."""
    synth: Any
    args: argparse.Namespace
    budget: int                       # prompt tokens at most
    writer: Writer
    totals: Totals
    progress: Any
    records: dict[int, Synthesized] = field(default_factory=dict)   # this window's, by id


def fit_prompt(run: Run, doc_id: int, text: str, prev: Optional[int]) -> tuple[list[int], Optional[int], int, bool]:
    """(prompt ids, predecessor shown, documents of history, text cut) for one document:
    the nearest earlier documents of its chain while the prompt fits the budget."""
    history = history_of(run.records, prev)
    for k in range(len(history), -1, -1):
        shown = [(d.text, d.pairs) for d in reversed(history[:k])]
        ids = run.synth.encode_prompt(synthesis_prompt(text, shown))
        if len(ids) <= run.budget:
            return ids, (history[0].id if k else None), k, False
    return truncated_prompt(run, doc_id, text)


def truncated_prompt(run: Run, doc_id: int, text: str) -> tuple[list[int], None, int, bool]:
    """The prompt of a document cut to the budget (no history)."""
    text_ids = run.synth.encode_text(text)
    keep = len(text_ids) - (len(run.synth.encode_prompt(synthesis_prompt(text))) - run.budget)
    while keep > 0:
        ids = run.synth.encode_prompt(synthesis_prompt(run.synth.decode(text_ids[:keep])))
        if len(ids) <= run.budget:
            return ids, None, 0, True
        keep -= max(1, len(ids) - run.budget)
    raise BadInput(f"document {doc_id}: the prompt budget of {run.budget} tokens (--max-model-len minus "
                   "--max-new-tokens) holds not even the prompt markers")


def round_size(n: int, rounds: int) -> int:
    """Documents per round of a window of ``n`` documents (the released ceil(N / M))."""
    return math.ceil(n / rounds)


def synthesize_batch(run: Run, start: int, texts: list[str], prevs: list[Optional[int]]) -> None:
    """Prompt, generate, parse and write the documents ``start .. start + len(texts) - 1``."""
    args = run.args
    fitted = [fit_prompt(run, start + i, t, p) for i, t, p in zip(range(len(texts)), texts, prevs)]
    outputs = run.synth.generate([f[0] for f in fitted], args.max_new_tokens, args.temperature, args.top_p,
                                 args.seed * 1_000_003 + start)
    for i, (text, (_, prev, shown, cut), out) in enumerate(zip(texts, fitted, outputs)):
        generation = run.synth.decode(out)
        parsed = parse_pairs(generation)
        doc = Synthesized(start + i, text, parsed.pairs, prev)
        rec = {"id": doc.id, "text": text, "prev": prev, "history": shown,
               "pairs": [{"question": p.question, "answer": p.answer} for p in parsed.pairs],
               "malformed": parsed.malformed, "duplicates": parsed.duplicates,
               "unfinished": parsed.unfinished, "truncated": cut}
        if args.keep_generation:
            rec["generation"] = generation
        run.writer.write(rec)
        run.records[doc.id] = doc
        run.totals.add(rec)
        run.totals.written += 1
        run.progress.update(1)
    run.writer.sync()


def synthesize_window(run: Run, start: int, texts: list[str]) -> None:
    """All rounds of one window; documents already in ``run.records`` are skipped."""
    size = round_size(len(texts), run.args.rounds)
    for r in range(run.args.rounds):
        lo = r * size
        ids = [i for i in range(lo, min(lo + size, len(texts))) if start + i not in run.records]
        for b in range(0, len(ids), run.args.batch_size):
            chunk = ids[b:b + run.args.batch_size]
            first = chunk[0]
            assert chunk == list(range(first, first + len(chunk))), "documents resume in order"
            prevs = [start + i - size if r else None for i in chunk]
            synthesize_batch(run, start + first, [texts[i] for i in chunk], prevs)


def windows(docs: Iterator[str], width: int, first: int) -> Iterator[tuple[int, list[str]]]:
    """(start id, texts) of each window of ``width`` documents from window start ``first``."""
    window: list[str] = []
    start = 0
    for i, text in enumerate(docs):
        if i < first:
            continue
        if not window:
            start = i
        window.append(text)
        if len(window) == width:
            yield start, window
            window = []
    if window:
        yield start, window


def resume_window(run: Run, done: list[dict], width: int) -> int:
    """Load the records of the window being resumed into ``run.records``; its start."""
    first = (len(done) // width) * width
    for rec in done[first:]:
        run.records[rec["id"]] = record_of(rec)
    return first


def synthesize(args: argparse.Namespace) -> Totals:
    """The whole run (see the module docstring); returns the totals of the output."""
    check_args(args)
    synth = load_synthesizer(args)
    max_len = args.max_model_len or synth.max_len
    if max_len > synth.max_len:
        raise BadInput(f"--max-model-len {max_len}: the model handles at most {synth.max_len} tokens")
    resuming = os.path.exists(args.output) and os.path.getsize(args.output) > 0
    check_meta(args.output, settings_of(args, max_len), resuming)
    totals = Totals()
    done = read_done(args.output, totals) if resuming else []
    counts = InputCounts()
    total_docs = sum(1 for _ in read_documents(args.input, args.json_key, InputCounts()))
    if len(done) > total_docs:
        raise BadInput(f"{args.output} holds {len(done)} records, the inputs only {total_docs} documents")
    from tqdm import tqdm

    progress = tqdm(total=total_docs, initial=len(done), unit="doc", file=sys.stderr, dynamic_ncols=True,
                    disable=args.no_progress, desc="synthesizing")
    run = Run(synth, args, max_len - args.max_new_tokens, Writer(args.output), totals, progress)
    width = args.batch_size * args.rounds
    first = resume_window(run, done, width)
    t0 = time.perf_counter()
    try:
        for start, texts in windows(read_documents(args.input, args.json_key, counts), width, first):
            for i, text in enumerate(texts):
                if start + i in run.records and run.records[start + i].text != text:
                    raise BadInput(f"{args.output}: record {start + i} holds another text than input "
                                   f"document {start + i}; the inputs changed since it was written")
            synthesize_window(run, start, texts)
            run.records.clear()
    finally:
        totals.seconds = time.perf_counter() - t0
        progress.close()
        run.writer.close()
    totals.skipped_inputs = counts.skipped
    return totals


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    totals = synthesize(args)
    took = totals.seconds
    print(f"{args.output}: {totals.documents} documents ({totals.written} this run, "
          f"{totals.written / max(took, 1e-9):.2f} documents/s over {took:.1f} s of synthesis), {totals.pairs} pairs; "
          f"dropped {totals.malformed} malformed and {totals.duplicates} duplicate pairs; "
          f"{totals.unfinished} generations unfinished, {totals.truncated} documents cut to fit, "
          f"{totals.skipped_inputs} input lines skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
