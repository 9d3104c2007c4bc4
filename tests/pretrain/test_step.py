"""The training step's extension points, end to end through the trainer.

* no host synchronization inside the steps between log intervals;
* a post-optimizer hook whose state lives in a persistent buffer survives kill -9 and
  resume with bitwise-equal losses;
* per-step statistics that modules report reach the log line, ``metrics.jsonl`` and the
  (offline) wandb run, reduced over data-parallel ranks and pipeline stages.

The model is the test-only architecture of ``tests/distributed/hetero_spec.py`` (loaded
through ``model.plugins``): it adds auxiliary losses, reports statistics and keeps a
post-optimizer-hook buffer.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import threading

import pytest
import torch

from polytron.pretrain import step as step_module
from tests.checkpoint import runs

HETERO = ["model.plugins=[tests.distributed.hetero_spec]", "model.arch=test_hetero", "model.num_layers=4"]
ITERS = 8


# ---------------------------------------------------------------- no host synchronization

#: Tensor methods that read a value back to the host (a device synchronization on a GPU).
READBACKS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


class ReadbackCounter:
    """Counts device-to-host reads on the main thread outside ``pretrain.step.host_sync``."""

    def __init__(self) -> None:
        self.count = 0
        self.where: list[str] = []
        self.main = threading.get_ident()
        self.saved = {}

    def __enter__(self):
        for name in READBACKS:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            if threading.get_ident() == counter.main and not step_module.in_host_sync():
                import traceback
                counter.count += 1
                counter.where.append(f"{name}: " + "".join(traceback.format_stack(limit=6)[:-1]))
            return original(tensor, *args, **kwargs)
        return counted


def test_no_host_sync_between_log_intervals(tmp_path, monkeypatch):
    """Run the trainer in this process; count reads during every step that is not at a log,
    eval or save boundary (those are the marked host_sync points)."""
    from polytron.model.configlib import ConfigError  # noqa: F401  (config import before the counter)
    from polytron.pretrain.config import load_config
    from polytron.pretrain.trainer import Trainer
    cfg = load_config(os.path.join(runs.ROOT, "launch", "configs", "tiny.yaml"),
                      runs.TINY + HETERO + [f"training.output_dir={tmp_path}", "training.iterations=8",
                                            "training.log_interval=4", "checkpoint.interval=0",
                                            "checkpoint.save_final=false"])
    trainer = Trainer(cfg, 0, 1, 0, "gloo")
    per_step: list[int] = []
    original = trainer._train_step

    def counted_step():
        with ReadbackCounter() as c:
            result = original()
        per_step.append(c.count)
        assert c.count == 0, "\n".join(c.where)
        return result
    monkeypatch.setattr(trainer, "_train_step", counted_step)
    with ReadbackCounter() as whole:
        assert trainer.run() == 0
    assert per_step == [0] * 8
    # the loop around the steps reads only at its marked points: control flags and logs
    assert whole.count == 0, "\n".join(whole.where)


def test_clipping_still_matches_after_removing_syncs():
    """The device-side clip gives the reference norm: covered per layout by the
    equivalence suite; here a direct check that the coefficient is applied on the device."""
    from polytron.model.config import ModelConfig
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64,
                      max_seq_len=16)
    engine = build_engine(cfg, ParallelConfig(), ParallelDims.resolve(ParallelConfig(), cfg, 1), None,
                          torch.device("cpu"), torch.float32, 0)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    engine.forward_backward([{"tokens": ids[:, :-1], "labels": ids[:, 1:]}])
    norm = engine.clip_grad_norm_(0.1)
    after = torch.nn.utils.get_total_norm([p.grad for p in engine.model.parameters()])
    assert isinstance(norm, torch.Tensor) and float(norm) > 0.1
    assert abs(float(after) - 0.1) < 1e-6


# ---------------------------------------------------------------- hooks and their state

@pytest.fixture(scope="module")
def hetero_reference(tmp_path_factory) -> dict[int, float]:
    out = str(tmp_path_factory.mktemp("hetero-ref"))
    assert runs.run(out, ITERS, *HETERO, "checkpoint.interval=2") == 0, runs.output(out)
    return {it: v[0] for it, v in runs.losses(out).items()}


def test_post_optimizer_hook_state_survives_kill_and_resume(tmp_path, hetero_reference):
    out = str(tmp_path)
    assert runs.run(out, ITERS, *HETERO, "checkpoint.interval=2",
                    env_extra={"POLYTRON_KILL_AT": "step:5"}) == -signal.SIGKILL, runs.output(out)
    assert runs.run(out, ITERS, *HETERO, "checkpoint.interval=2") == 0, runs.output(out)
    assert "resumed from checkpoint" in runs.last_output(out)
    got = runs.losses(out)
    assert sorted(got) == list(range(1, ITERS + 1))
    for it, values in got.items():
        assert values == [hetero_reference[it]], (it, values, hetero_reference[it])
    # the hook's buffer is in the checkpoint, and its value is the number of updates
    from polytron.pretrain import checkpoint as ckpt
    tensors = ckpt.load_tensors(os.path.join(out, "checkpoints", f"iter_{ITERS:07d}"))
    assert float(tensors["layers.2.updates"]) == ITERS


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_step_statistics_reach_log_jsonl_and_wandb(tmp_path, layout):
    out = str(tmp_path)
    par = ["parallel.pipeline=2"] if layout == "pp2" else []
    rc = runs.run(out, 4, *HETERO, *par, "logging.wandb=true", "logging.wandb_mode=offline",
                  "training.log_interval=2", "checkpoint.interval=0", nproc=2, timeout=400)
    assert rc == 0, runs.output(out)
    recs = runs.records(out)
    assert [r["iteration"] for r in recs] == [2, 4]
    global_batch = 4                                   # runs.TINY: training.global_batch_size=4
    for r in recs:
        assert r["test/sequences"] == 2 * global_batch, r    # sum over micro-batches, dp ranks, 2 steps
        assert r["test/max_layer"] == 3.0, r                 # from the last pipeline stage
        assert 0 < r["aux/gate_l2_2"] < 10 and 0 < r["aux/gate_l2_3"] < 10, r
    text = runs.output(out)
    assert "| test/sequences 8" in text and "| aux/gate_l2_2 " in text, text
    history = wandb_history(out)
    assert [h["test/sequences"] for h in history] == [2 * global_batch] * 2, history
    assert all(h["test/max_layer"] == 3.0 and "aux/gate_l2_3" in h for h in history), history


def wandb_history(out: str) -> list[dict]:
    """The history rows of the run's offline wandb file (``run-<id>.wandb``: a LevelDB-style
    log of 32 KiB blocks whose records are wandb ``Record`` protobufs; wandb 0.31 ships no
    Python reader)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    files = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    data = open(files[0], "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:              # a block's tail too short for a header
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk       # full/first, middle/last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows
