"""tools/upcycle.py and model/moe/upcycle.py: sparse upcycling reproduces the dense logits (our
checkpoint and a Hugging Face Llama directory), UpIT grows K=2 intermediate checkpoints to
4 distinct experts and pre-optimizes the routers above chance, the result continues
training with launch/pretrain.py, and bad input gets one error line."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.transformer import build_model, param_shapes
from polytron.pretrain import checkpoint as ckpt
from polytron.tools import upcycle as tool
from polytron.tools.convert_mha_to_dha import load_source, source_model
from tests.checkpoint import runs
from tests.checkpoint.helpers import assert_close, hf_llama, hf_logits

#: a 2-layer dense model on the built-in corpus; checkpoints at iterations 8 and 16
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=128", "model.max_seq_len=64", "data.seq_len=64", "training.micro_batch_size=8",
         "training.global_batch_size=8", "training.eval_iters=2", "logging.wandb=false",
         "logging.progress_bar=false", "training.device=cpu", "precision.dtype=fp32", "schedule.warmup_iters=4",
         "optimizer.lr=0.01", "training.eval_interval=0", "training.log_interval=10",
         "checkpoint.interval=8", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    """The two intermediate checkpoints (iterations 8, 16) of a small dense run."""
    out = str(tmp_path_factory.mktemp("src") / "run")
    cmd = [sys.executable, runs.LAUNCH, "--config", os.path.join(runs.ROOT, "launch", "configs", "tiny.yaml"),
           *SMALL, "training.iterations=16", f"training.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=runs.env(), cwd=runs.ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    found = [os.path.join(out, "checkpoints", d) for d in runs.complete(out)]
    assert len(found) == 2, found
    return found


def load(path: str):
    mcfg = from_dict(ModelConfig, ckpt.read_trainer_state(path)["config"]["model"], prefix="model.")
    model = build_model(mcfg)
    ckpt.load(path, [model], expected_shapes=param_shapes(mcfg))
    return model.eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).float()


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


TOKENS = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))


def test_sparse_copies_and_partition_reproduce_the_dense_logits(checkpoints, tmp_path):
    dense = load(checkpoints[-1])
    ref = logits(dense, TOKENS)
    cases = {"copies": ["--experts", "4", "--top-k", "2", "--shared-experts", "1"],
             "copies_top1": ["--experts", "3", "--top-k", "1"],
             "partition": ["--experts", "4", "--top-k", "4", "--partition"],
             "partition_shared": ["--experts", "2", "--top-k", "2", "--shared-experts", "2", "--partition"]}
    for name, extra in cases.items():
        dst = str(tmp_path / name)
        assert tool.main(["sparse", checkpoints[-1], dst, *extra]) == 0
        moe = load(os.path.join(dst, "checkpoint"))
        assert moe.cfg.arch == "moe" and moe.cfg.mlp == "moe"
        err = rel_err(logits(moe, TOKENS), ref)
        assert err < 1e-6, (name, err)
        report = json.load(open(os.path.join(dst, "upcycle_report.json")))
        assert report["initial_output"].startswith("exact"), report["initial_output"]
    assert moe.cfg.moe.expert_ffn_hidden_size == 32                 # 128 / (2 routed + 2 shared)
    noisy = str(tmp_path / "noisy")
    assert tool.main(["sparse", checkpoints[-1], noisy, "--experts", "4", "--noise", "0.05"]) == 0
    assert 1e-5 < rel_err(logits(load(os.path.join(noisy, "checkpoint")), TOKENS), ref) < 0.2


def test_sparse_from_a_hugging_face_llama_directory(tmp_path):
    src = str(tmp_path / "hf")
    hf = hf_llama(src, tied=True)
    dst = str(tmp_path / "moe")
    assert tool.main(["sparse", src, dst, "--experts", "3", "--top-k", "2", "--shared-experts", "1",
                      "data.builtin_corpus=true"]) == 0
    run, tensors, _ = load_source(src, ["data.builtin_corpus=true"])
    dense = logits(source_model(run.model, tensors), TOKENS)
    moe = load(os.path.join(dst, "checkpoint"))
    assert moe.cfg.tie_embeddings and moe.cfg.moe.num_experts == 3
    assert rel_err(logits(moe, TOKENS), dense) < 1e-6
    assert_close(logits(moe, TOKENS), hf_logits(hf, TOKENS), tol=1e-4)


def test_bad_input_gets_one_error_line(checkpoints, tmp_path, capsys):
    hf = str(tmp_path / "hf")
    hf_llama(hf)
    capsys.readouterr()
    cases = [(["sparse", checkpoints[0], str(tmp_path / "a"), "--experts", "3", "--partition"], "ffn_hidden_size=128"),
             (["upit", checkpoints[0], hf, str(tmp_path / "b"), "--experts", "4", "data.builtin_corpus=true"],
              "must share one architecture"),
             (["upit", checkpoints[0], checkpoints[1], str(tmp_path / "c"), "--experts", "1", "--top-k", "1"],
              "fewer than the 2 source"),
             (["sparse", checkpoints[0], str(tmp_path / "d"), "--experts", "2", "--top-k", "3"], "--top-k 3")]
    for argv, needle in cases:
        assert tool.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def numbers_dataset(directory: str) -> str:
    """A second, very regular text domain: arithmetic progressions written as decimal numbers,
    tokenized with the built-in corpus's tokenizer by the project's preprocessing."""
    from polytron.data.builtin import ensure_builtin_corpus
    from polytron.data.preprocess import preprocess
    rng = random.Random(0)
    docs = []
    for _ in range(300):
        a, d = rng.randrange(1, 500), rng.randrange(1, 20)
        docs.append(" ".join(str(a + d * i) for i in range(60)))
    text = os.path.join(directory, "numbers.txt")
    with open(text, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    prefix = os.path.join(directory, "numbers")
    preprocess([text], prefix, ensure_builtin_corpus("~/.cache/polytron", 4096).tokenizer)
    return prefix


@pytest.fixture(scope="module")
def diverged(checkpoints, tmp_path_factory) -> tuple[list[str], str]:
    """Two checkpoints that differ in what they know: iteration 16 of the prose run, and that
    run continued 8 iterations on the numbers domain (as a continued-pretraining run on new
    data would save them); and the numbers dataset prefix."""
    root = tmp_path_factory.mktemp("numbers")
    prefix = numbers_dataset(str(root))
    out = str(root / "run")
    cmd = [sys.executable, runs.LAUNCH, "--config", os.path.join(runs.ROOT, "launch", "configs", "tiny.yaml"),
           *SMALL, "training.iterations=8", f"checkpoint.load={checkpoints[-1]}", f"data.paths=[{prefix}]",
           f"training.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=runs.env(), cwd=runs.ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [checkpoints[-1], os.path.join(out, "checkpoints", runs.complete(out)[-1])], prefix


@pytest.fixture(scope="module")
def upit_out(diverged, tmp_path_factory) -> str:
    sources, prefix = diverged
    dst = str(tmp_path_factory.mktemp("upit") / "moe")
    assert tool.main(["upit", *sources, dst, "--experts", "4", "--top-k", "2", "--seed-samples", "256",
                      "--router-steps", "100", "--router-lr", "0.02", "--seed-data", "builtin", prefix]) == 0
    return dst


def test_upit_expands_two_checkpoints_to_four_distinct_experts(upit_out, diverged):
    report = json.load(open(os.path.join(upit_out, "upcycle_report.json")))
    moe = load(os.path.join(upit_out, "checkpoint"))
    sources = [ckpt.load_tensors(c) for c in diverged[0]]
    for layer in report["layers"]:
        assert [o["expert"] for o in layer["offspring"]] == [2, 3]
        for o in layer["offspring"]:
            assert min(o["distance_to_parents"]) > 0 and o["diversity"] > 0
        i = layer["layer"]
        gate = moe.layers[str(i)].mlp.experts.gate.weight.detach()                    # (4, ffn, d)
        for e in range(2):                                                       # experts 0, 1: the checkpoints
            assert torch.equal(gate[e], sources[e][f"layers.{i}.mlp.w1.weight"])
        for e in range(2, 4):
            for p in range(e):
                assert not torch.allclose(gate[e], gate[p]), (i, e, p)
    r = report["router"]
    print(f"UpIT held-out routing accuracy {r['held_out_accuracy']:.3f} (before {r['held_out_accuracy_before']:.3f}, "
          f"chance {r['chance']}), top-2 {r['held_out_top_k_accuracy']:.3f} (chance 0.5), confusion "
          f"{r['held_out_confusion']}, per expert {r['per_expert']}, lowest-loss expert per seed dataset "
          f"{r['argmin_label_counts_per_seed_dataset']}, distances "
          f"{[o['distance_to_parents'] for layer in report['layers'] for o in layer['offspring']]})")
    assert r["train_accuracy"] > r["chance"] and r["loss"][-1] < r["loss"][0]
    assert r["held_out_per_expert"] == 8 and sum(map(sum, r["held_out_confusion"])) == 32
    # the sources diverged: each checkpoint is the lowest-loss expert on most of its own domain
    prose, numbers = r["argmin_label_counts_per_seed_dataset"]
    assert prose[0] > sum(prose) / 2 and numbers[1] > sum(numbers) / 2, (prose, numbers)
    # held-out routing well above chance: top-1 of 4 (chance 0.25; at most ~0.5 here, as the two
    # merged experts pick their seed samples in the numbers domain too: docs/upcycling.md) and
    # the label among the k=2 experts a sample is routed to (chance 0.5)
    assert r["held_out_accuracy"] >= 0.4 and r["held_out_accuracy"] > r["held_out_accuracy_before"]
    assert r["held_out_top_k_accuracy"] >= 0.7


def test_upcycled_checkpoint_trains_under_ep2_and_exports(upit_out, tmp_path):
    """The written config continues training under torchrun with parallel.expert=2, and the
    result converts to Hugging Face with the MoE adapter (transformers gives our logits)."""
    from transformers import AutoModelForCausalLM

    from polytron.tools.convert_checkpoint import to_hf
    from tests.checkpoint.helpers import assert_close, hf_logits, our_logits
    from tests.checkpoint.test_hf import _load_ours
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={runs.free_port()}",
           runs.LAUNCH, "--config", os.path.join(upit_out, "config.yaml"), "parallel.expert=2",
           "training.micro_batch_size=4",
           "training.iterations=2", "training.log_interval=1", "checkpoint.interval=0", f"training.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=runs.env(), cwd=runs.ROOT)
    assert r.returncode == 0, "\n".join(x for x in r.stderr.splitlines() if "error" in x) or r.stderr[-2000:]
    assert " ep=2" in r.stdout
    recs = [x for x in runs.records(out) if "loss" in x]
    assert [x["iteration"] for x in recs][-1] == 2 and all(x["loss"] < 10 for x in recs)
    hf_dir = str(tmp_path / "hf")
    to_hf(out, hf_dir)
    remote = any(f.startswith("modeling_") for f in os.listdir(hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, trust_remote_code=remote).float().eval()
    model = _load_ours(os.path.join(out, "checkpoints", runs.complete(out)[-1]))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))
    assert_close(our_logits(model, tokens), hf_logits(hf, tokens))
