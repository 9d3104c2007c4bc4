"""Impossible layouts fail before any process group exists, with one clear line.

``ParallelDims.resolve`` is checked directly for each rule, and end to end through
``launch/pretrain.py``: under a fake 6-rank environment (no peers exist, so a rank
that tried to rendezvous would hang) and under a real 2-process ``torchrun``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from polytron.model.config import ModelConfig
from polytron.parallel.config import ParallelConfig
from polytron.parallel.mesh import LayoutError, ParallelDims
from polytron.parallel.pipeline import split_layers, stage_ids
from tests.distributed.harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.yaml")


def _model(**kw) -> ModelConfig:
    base = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                ffn_hidden_size=704)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("par,model,world,needle", [
    ({"tensor": 3}, {}, 6, "parallel.tensor=3 must divide model.num_heads=8"),
    ({"tensor": 2}, {}, 3, "does not divide the world size 3"),
    ({"tensor": 2, "data_parallel_shard": 2}, {}, 8, "degrees multiply to 4"),
    ({"tensor": 4}, {"num_heads": 12, "num_kv_heads": 6, "hidden_size": 384}, 4, "num_kv_heads=6"),
    ({"tensor": 2}, {"vocab_size": 4097}, 2, "model.vocab_size=4097"),
    ({"tensor": 2}, {"ffn_hidden_size": 705}, 2, "model.ffn_hidden_size=705"),
    ({"pipeline": 2, "virtual_stages": 4}, {}, 2, "8 stages but model.num_layers=4"),
    ({"pipeline": 2, "pipeline_split": [3, 2]}, {}, 2, "pipeline_split=[3, 2]"),
    ({"virtual_stages": 2}, {}, 1, "needs parallel.pipeline > 1"),
    ({"pipeline": 2, "virtual_stages": 2, "pipeline_schedule": "gpipe"}, {}, 2, "gpipe"),
    ({"context": 2, "expert": 4}, {"arch": "moe", "mlp": "moe"}, 2,
     "parallel.expert=4 must divide the data-parallel shard degree 1 x parallel.context=2 = 2"),
    ({"context": 4, "expert": 8}, {"arch": "moe", "mlp": "moe"}, 12,
     "parallel.expert=8 must divide the data-parallel shard degree 3 x parallel.context=4 = 12"),
])
def test_resolve_rejects(par: dict, model: dict, world: int, needle: str) -> None:
    with pytest.raises(LayoutError) as e:
        ParallelDims.resolve(ParallelConfig(**par), _model(**model), world)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_resolve_accepts_replicated_kv_heads() -> None:
    dims = ParallelDims.resolve(ParallelConfig(tensor=8), _model(num_kv_heads=2), 16)
    assert (dims.tp, dims.dp_shard) == (8, 2)


def test_resolve_accepts_tied_embeddings_under_pipelining() -> None:
    """Once refused ("tied embeddings need pp=1"): the stages now sum the tied pair's gradients."""
    dims = ParallelDims.resolve(ParallelConfig(pipeline=2, virtual_stages=2, tensor=2),
                                _model(tie_embeddings=True), 4)
    assert (dims.pp, dims.tp) == (2, 2)


@pytest.mark.parametrize("par,world,ep_dp,ep_cp", [
    ({"context": 2, "expert": 2}, 2, 1, 2),       # the two cp ranks are one expert group
    ({"context": 2, "expert": 2}, 4, 2, 1),       # ep divides dp_shard: carved from dp only, as before
    ({"context": 2, "expert": 4}, 4, 2, 2),
    ({"context": 4, "expert": 2}, 4, 1, 2),
    ({"context": 4, "expert": 8}, 8, 2, 4),
])
def test_resolve_accepts_expert_groups_across_context(par: dict, world: int, ep_dp: int, ep_cp: int) -> None:
    dims = ParallelDims.resolve(ParallelConfig(**par), _model(arch="moe", mlp="moe"), world)
    assert (dims.ep_dp, dims.ep_cp) == (ep_dp, ep_cp)


def test_split_layers_even_uneven_and_placement() -> None:
    assert split_layers(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split_layers(4, 2, [3, 1]) == [[0, 1, 2], [3]]
    with pytest.raises(LayoutError):
        split_layers(4, 2, [2, 1])
    assert stage_ids(1, 2, 2) == [1, 3]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID")}
    env.update(PYTHONPATH=ROOT, **extra)
    return env


@pytest.mark.timeout(120)
def test_launcher_exits_2_with_one_line_before_rendezvous() -> None:
    """Rank 0 of a 6-rank world whose peers never start: TP=3 vs 8 heads must not wait."""
    env = _env(RANK="0", WORLD_SIZE="6", LOCAL_RANK="0", LOCAL_WORLD_SIZE="6",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", TINY,
                           "parallel.tensor=3"], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: parallel.tensor=3 must divide model.num_heads=8"], proc.stderr


@pytest.mark.timeout(180)
def test_torchrun_bad_layout_every_rank_exits_2_fast() -> None:
    """Under torchrun each rank prints the same single line and exits 2; nobody hangs."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", os.path.join(ROOT, "launch", "pretrain.py"),
                           "--config", TINY,
                           "parallel.tensor=2", "parallel.pipeline=2"],
                          env=_env(), capture_output=True, text=True, timeout=170)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    expected = ("error: parallel layout: replicate=1 x context=1 x tensor=2 x pipeline=2 = 4 "
                "does not divide the world size 2")
    assert errors and all(line == expected for line in errors), out
    assert proc.returncode != 0
    assert "exitcode: 2" in out, out
    assert elapsed < 150, f"took {elapsed:.0f}s: a rank waited for peers"
