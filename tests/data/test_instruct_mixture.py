"""Instruction Pre-Training mixtures: datasets per source, the blend at configured token ratios
(measured through the training loader), response-only loss masks, bad configs."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from polytron.data.config import DataConfig
from polytron.data.instruct import Pair, Synthesized, record_json
from polytron.data.loader import build_data
from polytron.data.lossmask import has_loss_mask
from polytron.data.mixture import build_mixture, load_mixture, realized_composition
from polytron.data.tokenizer import load_tokenizer
from polytron.model.configlib import ConfigError
from polytron.pretrain.config import load_config
from polytron.tools import build_mixture as tool

SEQ = 256
QUESTION_WORDS = "the of and to in is"          # questions and responses use disjoint words
RESPONSE_WORDS = "module function class returns value"


def _write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _sources(tmp_path, corpus) -> dict:
    """Synthesized records (two-round chains), raw text, and general instructions."""
    docs = corpus.docs[:24]
    records = []
    for i, text in enumerate(docs):
        pairs = [Pair(f"What does part {k} of text {i} say?", text.split()[k]) for k in range(1 + i % 3)]
        prev = i - 12 if i >= 12 else None
        records.append(record_json(Synthesized(i, text[:100], pairs, prev)))
    syn = _write_jsonl(tmp_path / "syn.jsonl", records + ["not json"])
    instr = [{"question": " ".join(QUESTION_WORDS.split()[: 2 + i % 4]),
              "response": " ".join(RESPONSE_WORDS.split()[: 1 + i % 5])} for i in range(60)]
    instr_path = _write_jsonl(tmp_path / "instr.jsonl", instr + [{"question": "no response"}])
    return {"syn": syn, "raw": os.path.join(corpus.root, "b.jsonl"), "instr": instr_path}


def _mixture(tmp_path, corpus, **over) -> dict:
    src = _sources(tmp_path, corpus)
    cfg = {"output": str(tmp_path / "mix"), "tokenizer": corpus.tokenizer, "seq_len": SEQ, "seed": 7,
           "run_config": os.path.join(os.path.dirname(__file__), "..", "..", "launch", "configs", "tiny.yaml"),
           "sources": [
               {"name": "augmented", "kind": "augmented", "inputs": [src["syn"]], "ratio": 5},
               {"name": "raw", "kind": "raw", "inputs": [src["raw"]], "ratio": 3},
               {"name": "general", "kind": "instruction", "inputs": [src["instr"]], "ratio": 2,
                "response_only_loss": True}]}
    cfg.update(over)
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"path": str(path), "cfg": cfg}


def test_built_mixture_realizes_the_configured_token_ratios(tmp_path, corpus, capsys) -> None:
    mix = _mixture(tmp_path, corpus)
    assert tool.main(["--config", mix["path"]]) == 0
    out = tmp_path / "mix"
    manifest = json.loads((out / "mixture.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["augmented", "raw", "general"]
    assert manifest["weights"] == pytest.approx([0.5, 0.3, 0.2])
    aug, raw, gen = manifest["sources"]
    assert aug["documents"] >= 12 and aug["detail"]["pairs"] == sum(1 + i % 3 for i in range(24))
    assert aug["detail"]["documents"] == 24 and aug["detail"]["texts"] < 24      # chains of 2 shots
    assert aug["skipped"] == 1 and gen["documents"] == 60 and gen["skipped"] == 1
    assert gen["loss_mask"] and 0 < gen["loss_tokens"] < gen["tokens"] and has_loss_mask(gen["prefix"])
    run = load_config(str(out / "pretrain.yaml"))
    assert run.data.paths == manifest["paths"] and run.data.seq_len == SEQ and not run.data.builtin_corpus
    assert run.model.hidden_size == 256                                          # the recipe's model

    rows = realized_composition(manifest["paths"], manifest["weights"], corpus.tokenizer, SEQ, 640, 7,
                                str(tmp_path / "cache"))
    for row, want in zip(rows, manifest["weights"]):
        assert abs(row["tokens_share"] - want) <= 0.01, rows
    assert rows[2]["loss_tokens_share"] < 0.8 * rows[2]["tokens_share"]       # questions carry no loss
    assert "general" in capsys.readouterr().out


def test_response_only_loss_trains_exactly_the_responses(tmp_path, corpus) -> None:
    mix = _mixture(tmp_path, corpus)
    manifest = build_mixture(load_mixture(mix["path"]))
    tok = load_tokenizer(corpus.tokenizer)
    question_ids = set(tok.encode(QUESTION_WORDS) + tok.encode("\n\n"))
    response_ids = set(tok.encode(RESPONSE_WORDS)) | {tok.eod_id}
    assert not question_ids & response_ids
    general = manifest["paths"][2]
    cfg = DataConfig(paths=[manifest["paths"][0], general], weights=[0.5, 0.5], tokenizer=corpus.tokenizer,
                     seq_len=SEQ, split="100,0,0", cache_dir=str(tmp_path / "cache"), prefetch=0)
    bundle = build_data(cfg, model_vocab_size=tok.vocab_size, seed=3, global_batch_size=8, micro_batch_size=4,
                        dp_rank=0, dp_size=1, train_iterations=6, eval_iterations=0, eval_interval=0)
    trained = masked = 0
    for _ in range(6):
        for mb in bundle.train.next_step():
            for src, labels, mask in zip(mb["source"].argmax(1), mb["labels"], mb["loss_mask"]):
                off = set(labels[mask == 0].tolist())
                if int(src) != 1:
                    assert off <= {0}, "unmasked sources train on every token (but padding, label 0)"
                    continue
                on = set(labels[mask == 1].tolist())
                assert on <= response_ids and off <= question_ids | {0}, (on, off)
                trained, masked = trained + len(on), masked + len(off)
    assert trained and masked


def test_a_mask_left_from_an_earlier_build_is_removed(tmp_path, corpus) -> None:
    mix = _mixture(tmp_path, corpus)
    manifest = build_mixture(load_mixture(mix["path"]))
    assert has_loss_mask(manifest["paths"][2])
    cfg = dict(mix["cfg"])
    cfg["sources"] = [dict(s, response_only_loss=False) for s in cfg["sources"]]
    (tmp_path / "mixture.yaml").write_text(yaml.safe_dump(cfg))
    manifest = build_mixture(load_mixture(mix["path"]))
    assert not has_loss_mask(manifest["paths"][2]) and manifest["sources"][2]["loss_tokens"] == \
        manifest["sources"][2]["tokens"]


@pytest.mark.parametrize("change,key", [
    ({"sources": [{"name": "a", "kind": "raw", "inputs": ["missing.jsonl"], "ratio": 1}]}, "sources[0].inputs[0]"),
    ({"sources": [{"name": "a", "kind": "raw", "inputs": [], "ratio": 1}]}, "sources[0].inputs"),
    ({"sources": [{"name": "a", "kind": "raw", "prefix": "p", "inputs": ["x"], "ratio": 1}]}, "sources[0].inputs"),
    ({"sources": [{"name": "a", "kind": "augmented", "ratio": -1}]}, "sources[0].ratio"),
    ({"sources": [{"name": "a", "kind": "chat", "ratio": 1}]}, "sources[0].kind"),
    ({"sources": [{"name": "a", "kind": "raw", "ratio": 1, "colour": 1}]}, "sources[0].colour"),
    ({"sources": [{"name": "../x", "kind": "raw", "ratio": 1}]}, "sources[0].name"),
    ({"sources": [{"name": "a", "kind": "raw", "ratio": 1, "response_only_loss": True}]},
     "sources[0].response_only_loss"),
    ({"sources": []}, "sources"),
    ({"seq_len": 1}, "seq_len"),
])
def test_bad_mixture_configs_name_the_key(tmp_path, corpus, capsys, change, key) -> None:
    mix = _mixture(tmp_path, corpus, **change)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_mixture(mix["path"])
    assert tool.main(["--config", mix["path"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and key in err[0]


def test_duplicate_names_and_data_errors_are_one_line(tmp_path, corpus, capsys) -> None:
    src = _sources(tmp_path, corpus)
    dup = [{"name": "a", "kind": "raw", "inputs": [src["raw"]], "ratio": 1}] * 2
    assert tool.main(["--config", _mixture(tmp_path, corpus, sources=dup)["path"]]) == 2
    assert "sources[1].name" in capsys.readouterr().err
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"question": "q"}])
    bad = [{"name": "g", "kind": "instruction", "inputs": [empty], "ratio": 1}]
    assert tool.main(["--config", _mixture(tmp_path, corpus, sources=bad)["path"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source g" in err[0]
    assert not os.path.exists(tmp_path / "mix" / "g.bin") and \
        not [f for f in os.listdir(tmp_path / "mix") if ".tmp-" in f]
