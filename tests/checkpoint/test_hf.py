"""Hugging Face conversion: logits equivalence both ways, exact round trip, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from polytron.model.transformer import param_shapes
from polytron.pretrain import checkpoint as ckpt
from polytron.tools.convert_checkpoint import from_hf, hf_config_to_model, main, to_hf
from tests.checkpoint.helpers import (
    assert_close,
    build_model,
    hf_llama,
    hf_logits,
    our_logits,
    tiny_model_config,
    train_spm,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    return train_spm(str(tmp_path_factory.mktemp("spm")))


def _load_ours(path: str):
    state = ckpt.read_trainer_state(path)
    from polytron.model.config import ModelConfig
    from polytron.model.configlib import from_dict
    mcfg = from_dict(ModelConfig, state["config"]["model"])
    model = build_model(mcfg)
    ckpt.load(path, [model], expected_shapes=param_shapes(mcfg))
    return model.eval()


@pytest.mark.parametrize("variant", [
    dict(tied=False, kv_heads=2),
    dict(tied=True, kv_heads=1, rope=LLAMA3),
    dict(tied=False, kv_heads=4, rope={"rope_type": "linear", "factor": 2.0}, bias=True),
], ids=["gqa-untied", "mqa-tied-llama3", "mha-linear-bias"])
def test_from_hf_logits_match(tmp_path, variant):
    hf = hf_llama(str(tmp_path / "hf"), **variant)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours = _load_ours(str(tmp_path / "ours" / "checkpoint"))
    tokens = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(1))
    assert_close(our_logits(ours, tokens), hf_logits(hf, tokens))


def _trained_checkpoint(tmp, spm_model: str, tied: bool) -> tuple[str, torch.nn.Module]:
    """A tiny model trained a few AdamW steps, saved as a complete checkpoint."""
    from polytron.pretrain.config import RunConfig
    mcfg = tiny_model_config(tie_embeddings=tied,
                             rope_scaling=__import__("polytron.model.config").model.config.RopeScaling(
                                 type="llama3", factor=4.0, original_max_position_embeddings=32))
    model = build_model(mcfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 384, (2, 33), generator=gen)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    run = RunConfig(model=mcfg)
    run.data.tokenizer = spm_model
    state = {"iteration": 3, "consumed_samples": 6, "consumed_tokens": 192, "config": run.to_dict()}
    ckpt.save(str(tmp / "run" / "checkpoints"), 3, [model], opt, state, keep_last=2).finalize()
    return str(tmp / "run"), model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_to_hf_round_trip(tmp_path, spm_model, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run_dir, model = _trained_checkpoint(tmp_path, spm_model, tied)
    to_hf(run_dir, str(tmp_path / "hf"), max_shard_size="60KB")      # run dir -> newest checkpoint
    files = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(5))
    assert_close(our_logits(model, tokens), hf_logits(hf, tokens))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    text = " Leading space, two  spaces, digits 2024 and ünïcode.\nNext line."
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert json.load(open(tmp_path / "hf" / "generation_config.json"))["eos_token_id"] == sp.eos_id()
    # and back: identical tensors
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back = ckpt.load_tensors(str(tmp_path / "back" / "checkpoint"))
    orig = ckpt.load_tensors(ckpt.resolve_checkpoint(run_dir))
    assert back.keys() == orig.keys()
    for k in orig:
        assert torch.equal(back[k], orig[k]), k


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def test_unsupported_field_named(tmp_path):
    hf_llama(str(tmp_path / "hf"), rope={"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 32})
    r = _cli("from-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "rope_type" in r.stderr and "yarn" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_checks_name_field():
    with pytest.raises(ValueError, match="sliding_window"):
        hf_config_to_model({"model_type": "mistral", "sliding_window": 4096, "vocab_size": 8,
                            "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                            "num_attention_heads": 2}, "config.json")
    with pytest.raises(ValueError, match="model_type"):
        hf_config_to_model({"model_type": "gpt2"}, "config.json")


def test_shape_mismatch_names_tensor(tmp_path, capsys):
    hf_llama(str(tmp_path / "hf"))
    capsys.readouterr()                      # drop save_pretrained's progress bar
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.load(open(cfg_file))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(cfg_file, "w"))
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.layers.0.mlp.gate_proj.weight" in err
    assert "has shape (96, 64), expected (128, 64) from config.json" in err, err


@pytest.mark.parametrize("seq_len", ["-5", "129"])
def test_seq_len_outside_the_model_is_one_line_and_writes_nothing(tmp_path, capsys, seq_len):
    hf_llama(str(tmp_path / "hf"))                      # max_position_embeddings 128
    capsys.readouterr()
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out"), "--seq-len", seq_len]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --seq-len {seq_len}: must be between 1 and"), err
    assert not (tmp_path / "out").exists()


def test_to_hf_of_incomplete_checkpoint_refused(tmp_path, capsys):
    os.makedirs(tmp_path / "checkpoints" / "iter_0000004.tmp")
    assert main(["to-hf", str(tmp_path), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_hf_model_continues_pretraining_and_exports(tmp_path, spm_model):
    """HF dir -> from-hf -> 5 steps of our trainer on data tokenized by its tokenizer -> to-hf."""
    import pydoc_data.topics as topics

    from transformers import AutoModelForCausalLM

    from tests.checkpoint import runs
    hf_dir, conv, out = str(tmp_path / "hf"), str(tmp_path / "conv"), str(tmp_path / "out")
    orig = hf_llama(hf_dir, tied=True, tokenizer=spm_model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(list(topics.topics.values())[:150]))
    prefix = str(tmp_path / "data" / "corpus")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                        str(corpus), "--output-prefix", prefix, "--tokenizer", hf_dir, "--workers", "1",
                        "--no-progress"], capture_output=True, text=True, timeout=300, env=runs.env())
    assert r.returncode == 0, r.stderr
    config = from_hf(hf_dir, conv, seq_len=64)
    cmd = [sys.executable, runs.LAUNCH, "--config", config, f"data.paths=[{prefix}]",
           "training.iterations=5", "training.micro_batch_size=2", "training.global_batch_size=2",
           "training.eval_interval=0", "training.log_interval=1", "logging.wandb=false",
           "logging.progress_bar=false", "training.device=cpu", "precision.dtype=fp32",
           "checkpoint.interval=0", "data.split=98,2,0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=runs.env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "initialized model weights from" in r.stdout
    to_hf(os.path.join(conv, "run"), out)
    trained = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).float().eval()
    tokens = torch.randint(0, 384, (1, 32), generator=torch.Generator().manual_seed(2))
    ours = _load_ours(ckpt.resolve_checkpoint(os.path.join(conv, "run")))
    assert_close(our_logits(ours, tokens), hf_logits(trained, tokens))
    assert not torch.allclose(hf_logits(trained, tokens), hf_logits(orig, tokens)), "no training happened"


# ---------------------------------------------------------------- destination hygiene

def _snapshot(root) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: (mtime_ns, content), to prove a refused run touched nothing."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


def _no_staging_left(dst) -> None:
    parent, name = os.path.split(str(dst).rstrip("/"))
    assert [n for n in os.listdir(parent) if n.startswith(name + ".")] == []


def _one_error_line(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and all(w in r.stderr for w in words), r.stderr


def test_to_hf_overwrite_replaces_earlier_export(tmp_path, spm_model):
    """A single-file export, then a sharded one of other weights: only the new weights remain."""
    from transformers import AutoModelForCausalLM
    run_a, model_a = _trained_checkpoint(tmp_path / "a", spm_model, tied=False)
    run_b, model_b = _trained_checkpoint(tmp_path / "b", spm_model, tied=True)
    dst = tmp_path / "hf"
    to_hf(run_a, str(dst))
    assert "model.safetensors" in os.listdir(dst)
    (dst / "pytorch_model.bin").write_bytes(b"stale pickle")
    (dst / "README.md").write_text("notes the user keeps")
    assert main(["to-hf", run_b, str(dst), "--max-shard-size", "60KB", "--overwrite"]) == 0
    files = set(os.listdir(dst))
    index = json.load(open(dst / "model.safetensors.index.json"))
    shards = {n for n in files if n.endswith(".safetensors")}
    assert shards == set(index["weight_map"].values()) and len(shards) > 1
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files
    assert (dst / "README.md").read_text() == "notes the user keeps"
    assert json.load(open(dst / "config.json"))["tie_word_embeddings"] is True
    _no_staging_left(dst)
    hf = AutoModelForCausalLM.from_pretrained(str(dst), local_files_only=True).float().eval()
    tokens = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(5))
    assert_close(our_logits(model_b, tokens), hf_logits(hf, tokens))
    assert not torch.allclose(our_logits(model_a, tokens), hf_logits(hf, tokens), atol=1e-3)


def test_to_hf_refuses_non_empty_destination(tmp_path, spm_model):
    run_dir, _ = _trained_checkpoint(tmp_path, spm_model, tied=False)
    dst = tmp_path / "hf"
    to_hf(run_dir, str(dst))
    before = _snapshot(dst)
    _one_error_line(_cli("to-hf", run_dir, str(dst)), str(dst), "not empty", "--overwrite")
    assert _snapshot(dst) == before
    _no_staging_left(dst)


def test_to_hf_failure_leaves_destination_as_it_was(tmp_path, spm_model):
    """A refused export (here: the tokenizer, checked before anything is written) leaves DST
    untouched and no staging dir; test_provenance's full-disk case fails while writing."""
    run_dir, _ = _trained_checkpoint(tmp_path, spm_model, tied=False)
    dst = tmp_path / "hf"
    to_hf(run_dir, str(dst))
    before = _snapshot(dst)
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(ValueError, match="not a loadable Hugging Face tokenizer directory"):
        to_hf(run_dir, str(dst), tokenizer=str(tmp_path / "empty_tok"), overwrite=True)
    assert _snapshot(dst) == before
    _no_staging_left(dst)


def test_from_hf_refuses_then_overwrites(tmp_path, capsys):
    import shutil
    hf_a, hf_b, dst = tmp_path / "hf_a", tmp_path / "hf_b", tmp_path / "ours"
    hf_llama(str(hf_a), seed=0)
    hf_llama(str(hf_b), seed=1)
    from_hf(str(hf_a), str(dst))
    weights_a = ckpt.load_tensors(str(dst / "checkpoint"))
    before = _snapshot(dst)
    _one_error_line(_cli("from-hf", str(hf_b), str(dst)), str(dst), "not empty", "--overwrite")
    assert _snapshot(dst) == before
    shutil.copy(hf_a / "model.safetensors", dst / "model.safetensors")     # a stray weight file
    (dst / "run").mkdir()                                                 # a run continued from A
    capsys.readouterr()
    assert main(["from-hf", str(hf_b), str(dst), "--overwrite"]) == 0
    assert "set aside the earlier run" in capsys.readouterr().out and not (dst / "run").exists()
    listing = sorted(os.listdir(dst))                  # the run of A kept, out of the way of B's
    assert listing[:2] == ["checkpoint", "config.yaml"] and len(listing) == 3
    assert listing[2].startswith("run.superseded-") and (dst / listing[2]).is_dir()
    _no_staging_left(dst)
    from_hf(str(hf_b), str(tmp_path / "fresh"))
    got = ckpt.load_tensors(str(dst / "checkpoint"))
    want = ckpt.load_tensors(str(tmp_path / "fresh" / "checkpoint"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["tok_embeddings.weight"], weights_a["tok_embeddings.weight"])


def test_from_hf_into_its_source_refused(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf_llama(str(hf))
    before = _snapshot(hf)
    capsys.readouterr()
    assert main(["from-hf", str(hf), str(hf), "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("error: destination") and _snapshot(hf) == before


def test_from_hf_into_an_alias_of_its_source_refused(tmp_path, capsys):
    """DST given through a symlinked parent directory that resolves to SRC (another path
    string, the same directory): refused by file identity, SRC untouched."""
    hf = tmp_path / "models" / "hf"
    hf_llama(str(hf))
    os.symlink(tmp_path / "models", tmp_path / "alias")
    before = _snapshot(hf)
    capsys.readouterr()
    assert main(["from-hf", str(hf), str(tmp_path / "alias" / "hf"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: destination") and "is the source" in err and err.count("\n") == 1, err
    assert _snapshot(hf) == before


def test_from_hf_tie_flag_with_a_distinct_head(tmp_path, capsys):
    """config.json says tie_word_embeddings but the weights hold their own lm_head.weight:
    transformers keeps both (untied); from-hf does the same, so the logits agree."""
    from transformers import AutoModelForCausalLM
    src = tmp_path / "hf"
    hf_llama(str(src), tied=False)
    cfg = json.load(open(src / "config.json"))
    cfg["tie_word_embeddings"] = True
    json.dump(cfg, open(src / "config.json", "w"))
    hf = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True).float().eval()
    capsys.readouterr()
    assert main(["from-hf", str(src), str(tmp_path / "ours")]) == 0
    assert "untied" in capsys.readouterr().err
    ours = _load_ours(str(tmp_path / "ours" / "checkpoint"))
    assert ours.cfg.tie_embeddings is False
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(4))
    assert_close(our_logits(ours, tokens), hf_logits(hf, tokens))
