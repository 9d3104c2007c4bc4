#!/usr/bin/env python
"""Instruction synthesis throughput on this machine, against the released per-document loop,
and the token composition of a mixture built from the result.

    python tools/bench_synthesis.py [--workdir /tmp/ipt-bench] [--docs 48] [--chars 1000]
        [--max-new-tokens 64] [--batch-size 8] [--hidden 512 --layers 8] [--threads 2]
        [--mixture-samples 2048]

Offline and self-contained: a SentencePiece tokenizer with the synthesizer markers is
trained on Python's own documentation (cached in the workdir), a randomly initialized
Llama of the given shape is saved as a Hugging Face directory with it (the "small model";
random weights rarely stop early, so every document generates ``--max-new-tokens``
tokens), and ``--docs`` documents of ``--chars`` characters are synthesized twice in this
one process, greedy, same model and settings:

* ``reference``: the model card's loop (``get_instruction_response_pairs``): one prompt at
  a time through ``model.generate``, then the released parsing;
* ``tool``: ``tools/synthesize_instructions.py`` (batched, left-padded, resumable output).

Then a mixture of the tool's records (augmented), the raw documents (raw) and generated
arithmetic questions (instruction, response-only loss) at 2:1:1 is built with
``tools/build_mixture.py`` and its realized composition over ``--mixture-samples``
training samples is printed. Prints one JSON line with the figures and the machine.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import cast

from polytron.tools.cli import command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/ipt-bench")
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--chars", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--mixture-samples", type=int, default=2048)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(tokenizer .model, model directory, documents), built once per workdir and shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from polytron.data.builtin import iter_builtin_documents
    from polytron.data.tokenizer import INSTRUCTION_MARKERS, train_sentencepiece
    from polytron.tools.convert_checkpoint import write_tokenizer

    os.makedirs(args.workdir, exist_ok=True)
    docs = [d for d in itertools.islice(iter_builtin_documents(), 4000) if len(d) >= args.chars]
    tok = os.path.join(args.workdir, f"tok{args.vocab}.model")
    if not os.path.exists(tok):
        train_sentencepiece(docs[:2000], tok[:-len(".model")], args.vocab, special_tokens=INSTRUCTION_MARKERS)
    model = os.path.join(args.workdir, f"llama-h{args.hidden}-l{args.layers}-v{args.vocab}")
    if not os.path.exists(os.path.join(model, "config.json")):
        os.makedirs(model, exist_ok=True)
        bos, eos = write_tokenizer(tok, model)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=2048,
                          bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(model)
    return tok, model, [d[:args.chars] for d in docs[:args.docs]]


def reference(model_dir: str, texts: list[str], max_new: int) -> dict:
    """The model card's per-document loop (prompt string, generate, decode, parse)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polytron.data.instruct import parse_pairs, render_prompt, synthesis_prompt

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False).eval()
    new_tokens = pairs = 0
    t0 = time.perf_counter()
    for text in texts:
        prompt = render_prompt(synthesis_prompt(text), tok.bos_token, tok.eos_token)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0]
        new_tokens += out.shape[0] - ids.shape[1]
        text = cast(str, tok.decode(out[ids.shape[1]:], skip_special_tokens=True))   # one sequence: one string
        pairs += len(parse_pairs(text).pairs)
    took = time.perf_counter() - t0
    return {"seconds": took, "docs_per_s": len(texts) / took, "new_tokens": new_tokens, "pairs": pairs}


def ours(model_dir: str, raw: str, out: str, args: argparse.Namespace) -> dict:
    from polytron.tools import synthesize_instructions as tool

    for path in (out, out + ".meta.json"):
        if os.path.exists(path):
            os.remove(path)
    a = tool.parse_args(["--model", model_dir, "--input", raw, "--output", out, "--batch-size",
                         str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens), "--no-progress"])
    totals = tool.synthesize(a)
    return {"seconds": totals.seconds, "docs_per_s": totals.written / totals.seconds, "pairs": totals.pairs}


def mixture(tok: str, syn: str, raw: str, args: argparse.Namespace) -> list[dict]:
    import yaml

    from polytron.data.mixture import build_mixture, load_mixture, realized_composition

    instr = os.path.join(args.workdir, "general.jsonl")
    with open(instr, "w") as f:
        for i in range(400):
            f.write(json.dumps({"question": f"What is {i} times {i + 3}?", "response": f"{i * (i + 3)}."}) + "\n")
    cfg = {"output": os.path.join(args.workdir, "mix"), "tokenizer": tok, "seq_len": 512, "seed": 1,
           "sources": [{"name": "augmented", "kind": "augmented", "inputs": [syn], "ratio": 2},
                       {"name": "raw", "kind": "raw", "inputs": [raw], "ratio": 1},
                       {"name": "general", "kind": "instruction", "inputs": [instr], "ratio": 1,
                        "response_only_loss": True}]}
    path = os.path.join(args.workdir, "mixture.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    manifest = build_mixture(load_mixture(path))
    rows = realized_composition(manifest["paths"], manifest["weights"], tok, 512, args.mixture_samples, 1,
                                os.path.join(args.workdir, "cache"))
    for row, src in zip(rows, manifest["sources"]):
        row.update(name=src["name"], target=src["weight"], dataset_tokens=src["tokens"],
                   dataset_loss_tokens=src["loss_tokens"])
    return rows


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tok, model_dir, texts = prepare(args)
    raw = os.path.join(args.workdir, "raw.jsonl")
    with open(raw, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    load_before = os.getloadavg()[0]
    ref = reference(model_dir, texts, args.max_new_tokens)
    tool = ours(model_dir, raw, os.path.join(args.workdir, "syn.jsonl"), args)
    load_after = os.getloadavg()[0]
    rows = mixture(tok, os.path.join(args.workdir, "syn.jsonl"), raw, args)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=False).parameters())
    print(f"model: random Llama, {params / 1e6:.1f}M parameters; {len(texts)} documents of {args.chars} chars, "
          f"{args.max_new_tokens} new tokens each, greedy")
    print(f"reference (per document): {ref['docs_per_s']:.3f} docs/s ({ref['seconds']:.1f} s)")
    print(f"tool (batch {args.batch_size}):        {tool['docs_per_s']:.3f} docs/s ({tool['seconds']:.1f} s), "
          f"x{tool['docs_per_s'] / ref['docs_per_s']:.2f}")
    print("mixture composition:")
    for r in rows:
        print(f"  {r['name']:<10} target {r['target']:.3f}  token share {r['tokens_share']:.4f}  "
              f"loss-token share {r['loss_tokens_share']:.4f}  ({r['samples']} samples; dataset "
              f"{r['dataset_tokens']} tokens, {r['dataset_loss_tokens']} loss tokens)")
    print(json.dumps({"reference": ref, "tool": tool, "composition": rows, "params": params,
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "loadavg_before": load_before, "loadavg_after": load_after}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
