"""tools/synthesize_instructions.py: pairs per document from a local Hugging Face synthesizer or
one of our checkpoints, multi-round prompts, resume after kill -9 with no duplicate and no gap,
and the end-to-end path: synthesize -> build the mixture -> train with per-source loss.

The synthesizer is built offline with transformers and our tokenizer: an "echo" Llama whose
weights make each token predict a fixed next token, so that after the prompt's closing
blank line it writes exactly one well-formed pair (``<QUE> the <ANS> of </END>``) whatever
the batch; everything else about it is a real transformers model directory.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from polytron.data.builtin import iter_builtin_documents
from polytron.data.tokenizer import INSTRUCTION_MARKERS, train_sentencepiece
from polytron.tools import build_mixture
from polytron.tools import synthesize_instructions as tool
from tests.checkpoint import runs

ROOT = runs.ROOT
TOOL = os.path.join(ROOT, "tools", "synthesize_instructions.py")
#: The echo synthesizer's walk: the prompt ends in a newline; then one pair, then end of sequence.
ECHO = ("<0x0A>", "<QUE>", "▁the", "<ANS>", "▁of", "</END>")


def _echo_model(directory: str, tokenizer_model: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from polytron.tools.convert_checkpoint import write_tokenizer

    os.makedirs(directory)
    bos, eos = write_tokenizer(tokenizer_model, directory)
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    V = len(tok)
    cfg = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=512, bos_token_id=bos, eos_token_id=eos,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    step = torch.zeros(V, V)                               # [next, current]: every token -> end of sequence
    step[eos] = 1
    ids = tok.convert_tokens_to_ids(list(ECHO)) + [eos]
    for a, b in zip(ids, ids[1:]):
        step[:, a] = 0
        step[b, a] = 1
    with torch.no_grad():                                  # one-hot residual stream read by the head
        model.model.embed_tokens.weight.copy_(torch.eye(V) * 10)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(step)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synth")
    docs = [d for d in itertools.islice(iter_builtin_documents(), 120) if len(d) > 400]
    tokenizer = train_sentencepiece(docs[:60], str(root / "tok"), 512, special_tokens=INSTRUCTION_MARKERS,
                                    threads=2)
    _echo_model(str(root / "echo"), tokenizer)
    long = next(d for d in docs if len(d) > 2000)
    texts = [d[:120 + 40 * (i % 4)] for i, d in enumerate(docs[:10])] + [long[:3000]]   # the last: too long
    raw = root / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:5]) + "{broken\n"
                   + "".join(json.dumps({"text": t}) + "\n" for t in texts[5:]))
    return {"root": root, "tokenizer": tokenizer, "model": str(root / "echo"), "raw": str(raw), "texts": texts,
            "long": long}


def _args(s: dict, output, *extra: str) -> list[str]:
    return ["--model", s["model"], "--input", s["raw"], "--output", str(output), "--rounds", "2",
            "--batch-size", "3", "--max-new-tokens", "8", "--max-model-len", "320", "--no-progress", *extra]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def uninterrupted(setup) -> str:
    out = setup["root"] / "full.jsonl"
    assert tool.main(_args(setup, out)) == 0
    return str(out)


def test_one_record_per_document_with_multi_round_history(setup, uninterrupted, capsys) -> None:
    recs = _records(uninterrupted)
    texts = setup["texts"]
    assert [r["id"] for r in recs] == list(range(len(texts))) and [r["text"] for r in recs] == texts
    assert all(r["pairs"] == [{"question": "the", "answer": "of"}] and r["malformed"] == 0 for r in recs)
    # window of 6 documents: rounds of 3; the second round follows the first (when it fits)
    assert [r["prev"] for r in recs[:6]] == [None, None, None, 0, 1, 2]
    assert [r["history"] for r in recs[:6]] == [0, 0, 0, 1, 1, 1]
    # last window (5 documents): rounds of 3 and 2; the long document is cut and shown to nobody
    assert recs[10]["truncated"] and recs[10]["prev"] is None and recs[9]["prev"] == 6
    assert not any(r["truncated"] for r in recs[:10])
    meta = json.loads(open(uninterrupted + ".meta.json").read())
    assert meta["rounds"] == 2 and meta["max_model_len"] == 320


def test_resumes_after_kill_9_with_no_duplicate_and_no_gap(setup, uninterrupted) -> None:
    out = setup["root"] / "killed.jsonl"
    env = dict(runs.env(), POLYTRON_KILL_AT="synthesize.record:4")   # SIGKILL after the 4th record
    proc = subprocess.run([sys.executable, TOOL, *_args(setup, out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    before = open(out, "rb").read()
    assert before.count(b"\n") == 4                       # killed mid-batch, mid-round
    with open(out, "ab") as f:                            # and as if the kill had torn a line
        f.write(b'{"id": 4, "text": "Rec')
    assert tool.main(_args(setup, out)) == 0
    after = open(out, "rb").read()
    assert after.startswith(before)                      # nothing written before is rewritten
    assert after == open(uninterrupted, "rb").read()     # the same records as an uninterrupted run
    assert tool.main(_args(setup, out)) == 0             # a finished output stays as it is
    assert open(out, "rb").read() == after


def test_bad_input_is_one_error_line(setup, uninterrupted, capsys) -> None:
    cases = [(_args(setup, uninterrupted, "--seed", "1"), "seed"),           # resume with other settings
             (_args(setup, setup["root"] / "x.jsonl", "--top-p", "0"), "--top-p"),
             (["--model", str(setup["root"] / "none"), "--input", setup["raw"], "--output",
               str(setup["root"] / "y.jsonl")], "--model"),
             (_args(setup, setup["root"] / "z.jsonl", "--max-model-len", "4096"), "at most 512"),
             (_args(setup, setup["root"] / "w.jsonl", "--max-model-len", "12"), "budget")]
    for argv, needle in cases:
        assert tool.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and needle in err[-1], err
    assert tool.main(_args(setup, uninterrupted)) == 0    # the refused resume left it usable


def test_synthesize_build_mixture_train_with_per_source_loss(setup, uninterrupted, tmp_path) -> None:
    instr = tmp_path / "general.jsonl"
    instr.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "response": f"{2 * i}."}) + "\n"
                             for i in range(30)))
    mixture = {"output": str(tmp_path / "mix"), "tokenizer": setup["tokenizer"], "seq_len": 64,
               "run_config": os.path.join(ROOT, "launch", "configs", "tiny.yaml"),
               "sources": [{"name": "augmented", "kind": "augmented", "inputs": [uninterrupted], "ratio": 2},
                           {"name": "raw", "kind": "raw", "inputs": [setup["raw"]], "ratio": 1},
                           {"name": "general", "kind": "instruction", "inputs": [str(instr)], "ratio": 1,
                            "response_only_loss": True}]}
    (tmp_path / "mixture.yaml").write_text(yaml.safe_dump(mixture))
    assert build_mixture.main(["--config", str(tmp_path / "mixture.yaml")]) == 0
    run_dir = tmp_path / "run"
    cmd = [sys.executable, runs.LAUNCH, "--config", str(tmp_path / "mix" / "pretrain.yaml"), *runs.TINY,
           "training.iterations=3", f"training.output_dir={run_dir}", "data.split=100,0,0"]
    proc = subprocess.run(cmd, env=runs.env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]
    assert len(logged) == 3
    for i in range(3):                                  # every source's loss, over the whole run
        tokens = sum(r.get(f"loss_tokens/source{i}", 0) for r in logged)
        assert tokens > 0 and all(math.isfinite(r[f"loss/source{i}"]) for r in logged if f"loss/source{i}" in r)
    assert "loss/source0" in proc.stdout                # in the console line too

    # the trained checkpoint as a synthesizer (our model, batched with padding): prompts cut to 64 tokens
    out = tmp_path / "from_checkpoint.jsonl"
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": setup["long"][i:i + 600]}) + "\n" for i in (0, 600, 1200)))
    argv = ["--model", str(run_dir), "--input", str(small), "--output", str(out), "--batch-size", "2",
            "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3", "--no-progress"]
    assert tool.main(argv) == 0
    recs = _records(out)
    assert [r["id"] for r in recs] == [0, 1, 2] and all(r["truncated"] for r in recs)
