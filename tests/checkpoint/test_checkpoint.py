"""Atomic saves, verification, retention, async save, extras, and the errors of bad checkpoints."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from polytron.model.transformer import param_shapes
from polytron.pretrain import checkpoint as ckpt
from tests.checkpoint import runs
from tests.checkpoint.helpers import build_model, tiny_model_config


def _model_and_opt(seed: int = 0, **kw):
    model = build_model(tiny_model_config(**kw), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _save(root: str, it: int, model, opt, keep_last: int = 3, **kw) -> str:
    state = {"iteration": it, "consumed_samples": 0, "consumed_tokens": 0}
    return ckpt.save(root, it, [model], opt, state, keep_last, **kw).finalize()


@pytest.fixture
def saved(tmp_path):
    model, opt = _model_and_opt()
    return _save(str(tmp_path / "ck"), 10, model, opt), model, opt


def test_complete_layout_pointer_and_retention(tmp_path):
    model, opt = _model_and_opt()
    root = str(tmp_path / "ck")
    for it in (1, 2, 3):
        _save(root, it, model, opt, keep_last=2)
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000003", "latest"]
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000003"
    files = set(os.listdir(os.path.join(root, "iter_0000003")))
    assert {".metadata", "manifest.json", "trainer_state.json", "__0_0.distcp"} <= files
    os.makedirs(os.path.join(root, "iter_0000009.tmp"))         # an interrupted save
    assert ckpt.latest_checkpoint(root).endswith("iter_0000003")
    assert ckpt.resolve_checkpoint(str(tmp_path / "ck")).endswith("iter_0000003")


def test_load_restores_model_and_optimizer_exactly(saved):
    path, model, opt = saved
    other, other_opt = _model_and_opt(seed=7)
    ckpt.load(path, [other], other_opt, expected_shapes=param_shapes(model.cfg))
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)


def test_truncated_shard_names_the_file(saved):
    path, model, opt = saved
    shard = os.path.join(path, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ckpt.CheckpointError, match="__0_0.distcp"):
        ckpt.load(path, [model], opt)


def test_corrupted_bytes_name_the_file(saved):
    path, model, opt = saved
    shard = os.path.join(path, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(ckpt.CheckpointError, match="__0_0.distcp"):
        ckpt.load(path, [model], opt)


def test_unfinished_save_is_refused(saved):
    path, model, opt = saved
    os.remove(os.path.join(path, "manifest.json"))
    assert ckpt.latest_checkpoint(os.path.dirname(path)) is None
    with pytest.raises(ckpt.CheckpointError, match="unfinished save"):
        ckpt.load(path, [model], opt)


@pytest.mark.parametrize("change,name", [
    (dict(ffn_hidden_size=160), "layers.0.mlp.w1.weight"),
    (dict(num_layers=3), "layers.2."),
    (dict(num_layers=1), "layers.1."),
])
def test_architecture_mismatch_names_first_tensor(saved, change, name):
    path, _, _ = saved
    model, opt = _model_and_opt(**change)
    with pytest.raises(ckpt.CheckpointError, match=name.replace(".", r"\.")):
        ckpt.load(path, [model], opt, expected_shapes=param_shapes(model.cfg))
    with pytest.raises(ckpt.CheckpointError, match=name.replace(".", r"\.")):
        ckpt.load(path, [model], opt)                       # local check, without the full shapes


def test_weights_only_checkpoint_cannot_resume_optimizer(tmp_path, saved):
    _, model, opt = saved
    path = ckpt.save_tensors(str(tmp_path / "w"), dict(model.state_dict()), {"iteration": 0})
    with pytest.raises(ckpt.CheckpointError, match="no optimizer entry"):
        ckpt.load(path, [model], opt)
    ckpt.load(path, [model])                                 # weights only: fine


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/polytron-pwned", "w"))


def test_pickled_code_in_rank_file_is_refused(saved):
    path, _, _ = saved
    if os.path.exists("/tmp/polytron-pwned"):
        os.remove("/tmp/polytron-pwned")
    torch.save({"python": _Evil()}, os.path.join(path, "rng_rank0.pt"))
    with pytest.raises(ckpt.CheckpointError, match="rng_rank0.pt"):
        ckpt.load_rank_file(path, "rng_rank0.pt")
    assert not os.path.exists("/tmp/polytron-pwned")


def test_pickled_code_in_metadata_is_refused(saved):
    path, model, opt = saved
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata.*refusing"):
        ckpt.read_metadata(path)
    assert not os.path.exists("/tmp/polytron-pwned")


class _Counter:
    """A Stateful extra, like an FP8 amax history would be."""

    def __init__(self, value: float):
        self.history = torch.full((4,), value)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, sd: dict) -> None:
        self.history.copy_(sd["history"])


def test_extras_round_trip(tmp_path):
    model, opt = _model_and_opt()
    path = _save(str(tmp_path), 1, model, opt, extras={"scaling": _Counter(3.0)})
    target = _Counter(0.0)
    ckpt.load(path, [model], opt, extras={"scaling": target})
    assert torch.equal(target.history, torch.full((4,), 3.0))
    with pytest.raises(ckpt.CheckpointError, match="extras.missing"):
        ckpt.load(path, [model], opt, extras={"missing": _Counter(0.0)})


def test_async_save_snapshots_state_before_training_continues(tmp_path):
    model, opt = _model_and_opt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"iteration": 1, "consumed_samples": 0, "consumed_tokens": 0}
    pending = ckpt.save(str(tmp_path), 1, [model], opt, state, 2, async_save=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)                                     # training goes on meanwhile
    assert not os.path.exists(os.path.join(str(tmp_path), "latest"))
    path = pending.finalize()
    loaded = ckpt.load_tensors(path)
    for k, v in before.items():
        assert torch.equal(loaded[k], v), k


def test_launcher_reports_truncated_checkpoint(tmp_path):
    out = str(tmp_path)
    assert runs.run(out, 2, "checkpoint.interval=1") == 0, runs.output(out)
    shard = os.path.join(out, "checkpoints", "iter_0000002", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(1000)
    p = runs.start(out, 3, "training.resume=auto")
    rc = p.wait(timeout=180)
    text = runs.output(out)
    assert rc == 2, text
    assert f"error: checkpoint file {shard} is truncated" in text and "Traceback" not in text


def test_run_config_hyperparameters_win_over_checkpoint(saved):
    path, _, _ = saved
    model, opt = _model_and_opt(seed=2)
    for g in opt.param_groups:
        g["weight_decay"] = 0.5
    ckpt.load(path, [model], opt)
    assert all(g["weight_decay"] == 0.5 for g in opt.param_groups)


# ---------------------------------------------------------------- retention, discovery, rollback

def _incomplete(root: str, it: int) -> str:
    """A checkpoint directory without its manifest, as a damaged copy leaves it."""
    path = os.path.join(root, ckpt.ckpt_name(it))
    os.makedirs(path)
    open(os.path.join(path, ".metadata"), "wb").close()
    return path


@pytest.mark.parametrize("keep_last", [1, 2])
def test_retention_counts_only_complete_checkpoints(tmp_path, keep_last):
    model, opt = _model_and_opt()
    root = str(tmp_path / "ck")
    for it in (2, 4):
        _save(root, it, model, opt, keep_last=3)
    broken = _incomplete(root, 9)                   # newer than every complete one
    assert ckpt.latest_checkpoint(root).endswith("iter_0000004")
    _save(root, 6, model, opt, keep_last=keep_last)
    s = ckpt.scan(root)
    assert s.complete == ["iter_0000004", "iter_0000006"][-keep_last:]
    assert s.incomplete == ["iter_0000009"] and os.path.isdir(broken)    # reported, kept
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000006"
    assert ckpt.latest_checkpoint(root).endswith("iter_0000006")


def test_retention_keeps_the_checkpoint_a_run_resumed_from(tmp_path):
    model, opt = _model_and_opt()
    root = str(tmp_path / "ck")
    for it in (2, 4, 6):
        _save(root, it, model, opt, keep_last=1, protect=(os.path.join(root, "iter_0000002"),))
    assert ckpt.scan(root).complete == ["iter_0000002", "iter_0000006"]


def test_save_over_an_incomplete_directory_sets_it_aside(tmp_path):
    model, opt = _model_and_opt()
    root = str(tmp_path / "ck")
    _incomplete(root, 3)
    _save(root, 3, model, opt)
    assert ckpt.scan(root).complete == ["iter_0000003"]
    aside = [d for d in os.listdir(os.path.join(root, "abandoned")) if d.startswith("incomplete-")]
    assert aside and os.listdir(os.path.join(root, "abandoned", aside[0])) == ["iter_0000003"]


def test_rollback_sets_the_newer_lineage_aside(tmp_path):
    model, opt = _model_and_opt()
    root = str(tmp_path / "ck")
    for it in (2, 4, 6):
        _save(root, it, model, opt)
    moved = ckpt.start_lineage(root, os.path.join(root, "iter_0000002"))
    assert [os.path.basename(m) for m in moved] == ["iter_0000004", "iter_0000006"]
    assert all(ckpt.is_complete(m) for m in moved)               # kept intact
    assert ckpt.scan(root).complete == ["iter_0000002"]
    assert ckpt.latest_checkpoint(root).endswith("iter_0000002")
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000002"


def test_rollback_to_another_root_is_remembered_until_the_first_save(tmp_path):
    model, opt = _model_and_opt()
    other, root = str(tmp_path / "other"), str(tmp_path / "ck")
    origin = _save(other, 4, model, opt)
    for it in (2, 6):
        _save(root, it, model, opt)
    moved = ckpt.start_lineage(root, origin)
    assert [os.path.basename(m) for m in moved] == ["iter_0000006"]
    assert ckpt.latest_checkpoint(root) == os.path.abspath(origin)   # not this root's iter_2
    _save(root, 5, model, opt)
    assert ckpt.latest_checkpoint(root).endswith(os.path.join("ck", "iter_0000005"))
    assert not os.path.exists(os.path.join(root, "lineage.json"))


def test_restart_from_scratch_sets_everything_aside(tmp_path):
    model, opt = _model_and_opt()
    root = str(tmp_path / "ck")
    _save(root, 2, model, opt)
    _incomplete(root, 5)
    moved = ckpt.start_lineage(root, None)
    assert sorted(os.path.basename(m) for m in moved) == ["iter_0000002", "iter_0000005"]
    assert ckpt.latest_checkpoint(root) is None and not os.path.exists(os.path.join(root, "latest"))


def test_save_into_an_unwritable_root_is_one_error_and_leaves_nothing(tmp_path):
    model, opt = _model_and_opt()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint .*iter_0000001"):
        _save(str(blocker / "ck"), 1, model, opt)


def test_dcp_failure_inside_a_byte_item_is_a_checkpoint_error(tmp_path):
    """A corrupted non-tensor item with a valid manifest (a crafted checkpoint): DCP raises
    its BaseException-derived CheckpointException, which must become one CheckpointError."""
    model, opt = _model_and_opt()
    path = _save(str(tmp_path), 1, model, opt, extras={"counters": {"steps": 7}})
    md = ckpt.read_metadata(path)
    (index, info), = [(k, v) for k, v in md.storage_data.items() if k.fqn == "extras.counters.steps"]
    with open(os.path.join(path, info.relative_path), "r+b") as f:
        f.seek(info.offset)
        f.write(b"\x00" * info.length)
    ckpt.common.write_json(os.path.join(path, "manifest.json"), ckpt.build_manifest(path))
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint"):
        ckpt.load(path, [model], opt, extras={"counters": {"steps": 0}})
