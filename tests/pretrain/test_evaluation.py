"""In-loop downstream evaluation (evaluation.tasks): local multiple-choice and perplexity tasks
scored inside the training job give the same metrics under TP2, PP2 and DP2 as in one process;
a broken task file and a generation task are one line each and the run goes on; the config
section is validated."""
from __future__ import annotations

import os

import lm_eval  # noqa: F401  (the eval extra, in dev: a missing install fails here, never skips)
import pytest

from polytron.model.configlib import ConfigError
from polytron.pretrain.config import load_config
from tests.checkpoint import runs
from tests.tools.test_evaluate import write_generation_task, write_tasks

METRICS = ("downstream/local_mc/acc", "downstream/local_mc/acc_norm", "downstream/local_ppl/bits_per_byte",
           "downstream/local_ppl/word_perplexity")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> str:
    return write_tasks(str(tmp_path_factory.mktemp("tasks")))


def downstream(out: str) -> dict[int, dict]:
    """The downstream records of metrics.jsonl by iteration."""
    import json
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")).read().splitlines()]
    return {r["iteration"]: r for r in recs if "downstream_time_s" in r}


def run_with_tasks(out: str, task_list: str, *extra: str, nproc: int = 1) -> dict[int, dict]:
    rc = runs.run(out, 2, "checkpoint.interval=0", "checkpoint.save_final=false", f"evaluation.tasks={task_list}",
                  "evaluation.interval=1", *extra, nproc=nproc, timeout=400)
    assert rc == 0, runs.output(out)
    got = downstream(out)
    assert sorted(got) == [1, 2], runs.output(out)
    return got


def write_broken(root) -> tuple[str, str]:
    """A task file whose data file does not exist and a file that is not YAML."""
    broken = root / "broken.yaml"
    broken.write_text("task: broken\ndataset_path: json\ndataset_kwargs: {data_files: {test: /no/such.jsonl}}\n"
                      "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n")
    bad_yaml = root / "bad_yaml.yaml"
    bad_yaml.write_text("task: [unclosed\n")
    return str(broken), str(bad_yaml)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tasks) -> tuple[dict[int, dict], str]:
    """The one-process run (records by iteration, console output), its task list led by the two
    broken files of :func:`write_broken` and a generation task: one run serves as the layouts'
    reference and as the refused-task test."""
    root = tmp_path_factory.mktemp("one")
    broken, bad_yaml = write_broken(root)
    gen = os.path.join(write_generation_task(str(root)), "local_gen.yaml")
    out = str(root / "run")
    got = run_with_tasks(out, f"[{broken},{bad_yaml},{gen},{tasks}/local_mc.yaml,{tasks}/local_ppl.yaml]")
    text = runs.output(out)
    assert "downstream at iter 2 | local_mc acc " in text and "bits_per_byte" in text, text
    return got, text


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.pipeline=2"],
                                    ["training.global_batch_size=4", "training.micro_batch_size=1"]],
                         ids=["tp2", "pp2", "dp2"])
def test_layout_gives_the_one_process_metrics(tmp_path, tasks, one_process, layout):
    # dp2: each data-parallel rank scores its own half of the requests (micro batch 1: 4 rows a call)
    got = run_with_tasks(str(tmp_path), f"[{tasks}]", *layout, nproc=2)     # the directory: both tasks
    ref, _ = one_process
    for it in (1, 2):
        for key in METRICS:
            assert got[it][key] == pytest.approx(ref[it][key], rel=1e-5), (it, key)
    print({k: got[2][k] for k in METRICS})


def test_broken_task_file_and_generation_task_are_one_line_and_the_run_goes_on(one_process):
    got, text = one_process                     # its first two entries are broken, the third generates
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("evaluation: ")]
    assert len(lines) == 3 and all("broken" in line or "bad_yaml" in line for line in lines[:2]), lines
    assert "task local_gen generates text" in lines[2] and "tools/evaluate.py" in lines[2], lines
    assert all(k in got[it] for it in (1, 2) for k in METRICS)
    assert not any("broken" in k or "bad_yaml" in k or "local_gen" in k for it in (1, 2) for k in got[it])


def test_config_section(tmp_path, tasks):
    base = ["data.builtin_corpus=true"]
    cfg = load_config(None, [*base, "evaluation.tasks=[local_mc.yaml]", "evaluation.interval=5"], base=tasks)
    assert cfg.evaluation.tasks == [os.path.join(tasks, "local_mc.yaml")]     # resolved like other paths
    assert cfg.evaluation.due(5, 7) and cfg.evaluation.due(7, 7) and not cfg.evaluation.due(6, 7)
    assert not load_config(None, base).evaluation.due(7, 7)           # no tasks: never
    with pytest.raises(ConfigError, match="evaluation.interval"):
        load_config(None, [*base, "evaluation.interval=-1"])


def test_plot_tool_draws_downstream_panels(tmp_path, capsys):
    import json

    from polytron.tools import plot_metrics
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for it in range(1, 11):
            f.write(json.dumps({"iteration": it, "loss": 5.0 - 0.1 * it, "lr": 1e-3}) + "\n")
            if it % 5 == 0:
                f.write(json.dumps({"iteration": it, "downstream/local_mc/acc": 0.1 * it,
                                    "downstream/local_ppl/bits_per_byte": 4.0 - 0.1 * it,
                                    "downstream_time_s": 0.5}) + "\n")
    assert plot_metrics.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "downstream/local_mc/acc" in out and "downstream/local_ppl/bits_per_byte" in out, out
