"""The typed config system: YAML, dotted overrides, and one clear error per bad input."""
import os
import subprocess
import sys

import pytest

from polytron.model.configlib import ConfigError
from polytron.pretrain.config import RunConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.yaml")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_tiny_loads_and_overrides_apply():
    cfg = load_config(TINY, ["optimizer.lr=1e-3", "training.iterations=7", "model.tie_embeddings=true"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optimizer.lr == 1e-3 and cfg.training.iterations == 7 and cfg.model.tie_embeddings
    assert cfg.training.output_dir == os.path.abspath(os.path.join("runs", "tiny"))


def test_int_widens_to_float_and_derived_fields():
    cfg = load_config(None, ["optimizer.lr=1", "data.builtin_corpus=true", "model.hidden_size=96",
                             "model.num_heads=3"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.head_dim == 32 and cfg.model.num_kv_heads == 3 and cfg.model.ffn_hidden_size == 256


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(TINY, [])
    again = load_config(write(tmp_path, cfg.to_yaml()), [])
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides, words", [
    (["optimizer.lrr=1"], ["unknown config key 'optimizer.lrr'", "lr"]),
    (["nosuch.key=1"], ["unknown config key 'nosuch'"]),
    (["optimizer.lr=-0.1"], ["optimizer.lr", "-0.1", "positive"]),
    (["training.iterations=ten"], ["training.iterations", "'ten'", "integer"]),
    (["model.tie_embeddings=maybe"], ["model.tie_embeddings", "true or false"]),
    (["schedule.kind=linear"], ["schedule.kind", "'cosine'"]),
    (["model.num_kv_heads=3"], ["model.num_kv_heads", "divisor"]),
    (["data.seq_len=100000"], ["data.seq_len", "max_seq_len"]),
    (["optimizer=3"], ["'optimizer'", "mapping"]),
    (["optimizer.lr"], ["section.key=value"]),
])
def test_bad_values_name_key_value_and_allowed(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"YAML syntax error in .*c.yaml at line \d+, column \d+"):
        load_config(write(tmp_path, "model:\n  hidden_size: [1, 2\n"), [])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), [])


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_launcher(*args, timeout=120):
    """launch/pretrain.py as a single process, whatever launch variables this shell has."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["WANDB_MODE"] = "disabled"
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("args, needle", [
    (["--config", "launch/configs/does-not-exist.yaml"], "config file not found"),
    (["--config", "launch/configs/tiny.yaml", "optimizer.lr=-1"], "optimizer.lr"),
    (["--config", "launch/configs/tiny.yaml", "model.bogus=1"], "unknown config key 'model.bogus'"),
    (["--config", "launch/configs/tiny.yaml", "training.micro_batch_size=abc"], "training.micro_batch_size"),
])
def test_launcher_bad_input_is_one_line_exit_2(args, needle):
    res = run_launcher(*args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_launcher_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  iterations: [\n")
    res = run_launcher("--config", str(bad))
    assert res.returncode == 2 and "YAML syntax error" in res.stderr and "Traceback" not in res.stderr


def test_launcher_missing_data_path(tmp_path):
    import sentencepiece as spm
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of some english text about trains and tokens" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=64,
                                   model_type="bpe", minloglevel=2)
    res = run_launcher("--config", "launch/configs/tiny.yaml", "data.builtin_corpus=false",
                       f"data.tokenizer={tmp_path}/sp.model",
                       f"data.paths=[{tmp_path}/missing_prefix]", f"training.output_dir={tmp_path}/run")
    assert res.returncode == 2, res.stderr
    assert "missing_prefix" in res.stderr and "Traceback" not in res.stderr


def test_print_config_and_help_config():
    res = run_launcher("--config", "launch/configs/tiny.yaml", "--print-config", "optimizer.lr=0.5")
    assert res.returncode == 0 and "lr: 0.5" in res.stdout
    res = run_launcher("--help-config")
    assert res.returncode == 0 and "optimizer.lr" in res.stdout and "Peak learning rate" in res.stdout


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=inf", "optimizer.lr"), ("optimizer.lr=nan", "optimizer.lr"),
    ("optimizer.lr=.nan", "optimizer.lr"), ("optimizer.grad_clip=nan", "optimizer.grad_clip"),
    ("optimizer.weight_decay=-inf", "optimizer.weight_decay"), ("model.rope_theta=1e999", "model.rope_theta"),
    ("training.loss_spike_ratio=.inf", "training.loss_spike_ratio"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert f"config key '{key}'" in str(e.value) and "finite" in str(e.value)


def test_duplicate_yaml_key_is_refused(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 1.0e-3\n  beta1: 0.9\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"line 4.*duplicate key 'lr' \(first at line 2\)"):
        load_config(path, [])


def test_absurd_run_lengths_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="training.iterations.*at most 1e\\+09"):
        load_config(TINY, ["training.iterations=1000000001"])
    from polytron.pretrain.config import check_run_length
    check_run_length(10**6, 1024, 4096)                        # 4.3e12 tokens: a real run
    with pytest.raises(ConfigError, match="training.iterations.*1e\\+15 tokens"):
        check_run_length(10**9, 4096, 8192)
