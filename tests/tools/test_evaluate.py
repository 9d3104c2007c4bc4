"""tools/evaluate.py: local lm-evaluation-harness tasks (multiple choice, perplexity) on the tiny
run's checkpoint and on YOCO and MoE checkpoints give the numbers of the harness's Hugging Face
backend on the same model exported with to-hf (1e-4 on every log-likelihood), offline; greedy
generation on the tiny run's checkpoint gives HF's text.

Each checkpoint is evaluated by one tool call (all its tasks at once: the tool indexes the
harness's built-in tasks, about 15 s of CPU, on every call) and by one HF-backend evaluation,
which loads the local task files only."""
from __future__ import annotations

import json
import os
import random

import lm_eval  # noqa: F401  (the eval extra, in dev: a missing install fails here, never skips)
import pytest
import torch

from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.evaluation import load_tasks
from polytron.tools import evaluate as ev
from polytron.tools.convert_checkpoint import to_hf
from tests.checkpoint import runs
from tests.checkpoint.helpers import build_model, train_spm

WORDS = ["river", "stone", "light", "paper", "music", "garden", "window", "silver", "winter", "market"]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "Python is a programming language that lets you work quickly and integrate systems.",
         "A list is a mutable sequence; a tuple is not. " * 12]   # longer than max_seq_len: windows


def write_tasks(root: str) -> str:
    """A multiple-choice task and a perplexity task over local JSONL files (absolute paths)."""
    os.makedirs(root, exist_ok=True)
    rng = random.Random(0)
    with open(os.path.join(root, "mc.jsonl"), "w") as f:
        for i in range(8):
            f.write(json.dumps({"question": f"The {rng.choice(WORDS)} is next to the",
                                "choices": [f" {w}" for w in rng.sample(WORDS, 4)], "answer": i % 4}) + "\n")
    with open(os.path.join(root, "ppl.jsonl"), "w") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    with open(os.path.join(root, "local_mc.yaml"), "w") as f:
        f.write(f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {os.path.join(root, 'mc.jsonl')}\ntest_split: test\noutput_type: multiple_choice\n"
                "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    with open(os.path.join(root, "local_ppl.yaml"), "w") as f:
        f.write(f"task: local_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {os.path.join(root, 'ppl.jsonl')}\ntest_split: test\n"
                "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                "  - metric: bits_per_byte\n")
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> str:
    os.environ["HF_DATASETS_OFFLINE"] = "1"          # local files only, as in a training job
    os.environ["HF_HUB_OFFLINE"] = "1"
    return write_generation_task(write_tasks(str(tmp_path_factory.mktemp("tasks"))))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    return train_spm(str(tmp_path_factory.mktemp("spm")))


def saved_checkpoint(tmp, spm_model: str, cfg: ModelConfig) -> str:
    """A model trained three AdamW steps (so no weight is at its initial value), saved."""
    from polytron.pretrain.config import RunConfig
    cfg.validate()
    model = build_model(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    run = RunConfig(model=cfg)
    run.data.tokenizer = spm_model
    state = {"iteration": 3, "consumed_samples": 6, "consumed_tokens": 96, "config": run.to_dict()}
    ckpt.save(os.path.join(tmp, "run", "checkpoints"), 3, [model], opt, state, keep_last=2).finalize()
    return os.path.join(tmp, "run")


def ours(run_dir: str, tasks: str, files: list[str], out: str, capsys) -> dict:
    """tools/evaluate.py on the run's checkpoint: the results JSON it writes (with samples)."""
    assert ev.main([run_dir, "--tasks", ",".join(f"{tasks}/{f}" for f in files), "--batch-size", "3",
                    "--output", out, "--log-samples"]) == 0
    printed = capsys.readouterr().out
    assert "|local_mc |" in printed and "bits_per_byte" in printed and f"wrote {out}" in printed, printed
    return json.load(open(out))


def harness_hf(hf_dir: str, tasks: str, remote: bool, files: list[str]) -> dict:
    """The harness's HF backend on the export, over the local task files only (builtin=False:
    the reference needs no index of the harness's own tasks)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=3, trust_remote_code=remote)
    return evaluate(lm=lm, task_dict=load_tasks([os.path.join(tasks, f) for f in files], [], builtin=False),
                    bootstrap_iters=0, log_samples=True, verbosity="ERROR")


def write_generation_task(root: str) -> str:
    """A greedy generate_until task (stop at a newline, at most 8 tokens) over prompts of
    different lengths."""
    prompts = ["The list", "A tuple is", "The quick brown fox jumps over", "Python is a programming"]
    with open(os.path.join(root, "gen.jsonl"), "w") as f:
        f.write("".join(json.dumps({"prompt": p, "target": " is"}) + "\n" for p in prompts))
    with open(os.path.join(root, "local_gen.yaml"), "w") as f:
        f.write(f"task: local_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {os.path.join(root, 'gen.jsonl')}\ntest_split: test\noutput_type: generate_until\n"
                "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
                "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def loglikelihoods(results: dict, task: str) -> list[float]:
    """Every log-likelihood the task's requests got, in document order."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            value = resp[0]
            out.append(float(value[0] if isinstance(value, (list, tuple)) else value))
    return out


def assert_same_as_hf(run_dir: str, tasks: str, tmp, remote: bool, capsys, generate: bool = False) -> None:
    """Our tool and the HF backend on the export give the same log-likelihoods and metrics; with
    ``generate`` also the same greedy generate_until text (ours through our KV cache, HF's
    generate)."""
    files = ["local_mc.yaml", "local_ppl.yaml", *(["local_gen.yaml"] if generate else [])]
    mine = ours(run_dir, tasks, files, os.path.join(tmp, "results.json"), capsys)
    to_hf(run_dir, os.path.join(tmp, "hf"))
    ref = harness_hf(os.path.join(tmp, "hf"), tasks, remote, files)
    for task in ("local_mc", "local_ppl"):
        a, b = loglikelihoods(mine, task), loglikelihoods(ref, task)
        assert len(a) == len(b) == (32 if task == "local_mc" else 3)
        worst = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))
        print(f"{task}: {len(a)} log-likelihoods, largest difference to the HF backend {worst:.2e}")
        assert worst < 1e-4, (task, a, b)
        for metric, value in ref["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert mine["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric
    if generate:
        texts = [[s["resps"][0][0] for s in sorted(r["samples"]["local_gen"], key=lambda s: s["doc_id"])]
                 for r in (mine, ref)]
        print("generated:", texts[0])
        assert len(texts[0]) == 4 and texts[0] == texts[1] and any(texts[0]), texts


def test_tiny_run_checkpoint_equals_hf_backend(tmp_path, tasks, capsys):
    out = str(tmp_path / "run")
    assert runs.run(out, 2, "checkpoint.interval=0") == 0, runs.output(out)
    assert_same_as_hf(out, tasks, str(tmp_path), False, capsys, generate=True)


def test_yoco_checkpoint_equals_hf_backend(tmp_path, tasks, spm_model, capsys):
    cfg = from_dict(ModelConfig, dict(arch="yoco", vocab_size=384, hidden_size=64, num_layers=4, num_heads=4,
                                      num_kv_heads=2, ffn_hidden_size=96, max_seq_len=64, rope_theta=500.0,
                                      yoco=dict(self_decoder="swa", sliding_window=7)), prefix="model.")
    assert_same_as_hf(saved_checkpoint(str(tmp_path), spm_model, cfg), tasks, str(tmp_path), True, capsys)


def test_moe_checkpoint_equals_hf_backend(tmp_path, tasks, spm_model, capsys):
    from polytron.model.moe.config import MoEConfig
    cfg = ModelConfig(arch="moe", vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=96, max_seq_len=64, rope_theta=500.0, mlp="moe",
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=48))
    assert_same_as_hf(saved_checkpoint(str(tmp_path), spm_model, cfg), tasks, str(tmp_path), False, capsys)


def test_task_names_resolve_locally_first_then_among_the_harness_tasks(tasks):
    """A local name loads without the harness's index; a name only the harness defines is
    found there (offline, its dataset then fails to load: one line); an unknown name is
    'not found' after both."""
    from polytron.pretrain.evaluation import TaskError
    assert set(load_tasks(["local_mc"], [tasks])) == {"local_mc"}
    with pytest.raises(TaskError, match=r"task lambada_openai: does not load"):
        load_tasks(["lambada_openai"], [tasks])
    with pytest.raises(TaskError, match=r"task 'no_such_task_xyz': not found"):
        load_tasks(["no_such_task_xyz"], [tasks])


def test_generate_until_samples_as_the_hf_backend_reads_its_settings(spm_model):
    """do_sample picks sampling (a temperature alone stays greedy, as in the harness's HF
    backend); temperature and top_p reach the sampler (top_p near 0 keeps only the top token:
    greedy; a hot temperature differs from greedy and repeats under the same torch seed); any
    other setting is one GenerationError line."""
    from polytron.data.tokenizer import load_tokenizer
    from polytron.model.generate import GenerationError
    from polytron.pretrain.lm_eval_model import ModelScorer
    from tests.checkpoint.helpers import tiny_model_config
    tok = load_tokenizer(spm_model)
    scorer = ModelScorer(build_model(tiny_model_config(vocab_size=tok.vocab_size), seed=5), batch_size=4)
    prompts = [tok.encode(t) for t in ("The list", "A tuple is", "Python is a")]

    def gen(**kw) -> list[str]:
        return scorer.generate([(ids, 6, [], dict(kw)) for ids in prompts], tok, None)

    greedy = gen()
    assert gen(do_sample=False, temperature=0.8) == greedy
    assert gen(do_sample=True, temperature=1.0, top_p=1e-9) == greedy
    torch.manual_seed(0)
    hot = gen(do_sample=True, temperature=5.0)
    torch.manual_seed(0)
    assert gen(do_sample=True, temperature=5.0) == hot != greedy
    with pytest.raises(GenerationError, match=r"setting top_k is not served"):
        gen(do_sample=True, top_k=5)
    with pytest.raises(GenerationError, match=r"must be numbers"):
        gen(do_sample=True, temperature="hot")
