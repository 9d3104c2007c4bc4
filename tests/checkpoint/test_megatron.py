"""Megatron checkpoints in and out, checked against megatron-core's own GPTModel (local spec).

megatron-core builds and runs its model on CPU/gloo here; the CUDA-only calls on its path
(a device query, a synchronize, the RNG tracker's fork, the TE router GEMM probe) and the
torch_dist writer's process start (a harness rank is a daemon) are patched inside the worker
processes only. Its forward is the reference: our logits after
``from-megatron`` must match it within 1e-5, and ``to-megatron``'s torch_dist must load into
its model (under TP2) with the same logits.
"""
from __future__ import annotations

import argparse
import os
import re

import megatron.core  # noqa: F401  (a dev dependency: a missing install fails here, never skips)
import pytest
import torch
import yaml

from polytron.model.hf import ConvertError
from polytron.model.transformer import build_model
from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.config import config_from_dict
from polytron.tools.convert_checkpoint import main
from polytron.tools.megatron_ckpt import from_megatron, load_pickle
from tests.distributed.harness import Call, run_batch

TOL = 1e-5
B, T = 2, 8
DENSE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
             vocab_size=64)
MOE = dict(DENSE, num_experts=4, topk=2, moe_ffn=16, shared=16)


def _patch_for_cpu_worker() -> None:
    import contextlib
    import multiprocessing
    import queue

    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core.tensor_parallel import random as mrandom
    torch.cuda.current_device = lambda: "cpu"              # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None          # type: ignore[assignment]
    moe_utils.te_general_gemm = None                       # type: ignore[attr-defined]
    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # type: ignore[method-assign]
    # the torch_dist writer forks file writers, and in a synchronous save hands their results
    # over in this process on a spawned Manager's queue: a harness rank is a daemon process, so
    # let it fork, and use an in-process queue (put and get happen here)
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    fs_async._get_write_results_queue = queue.Queue


def _megatron_model(spec: dict, tp: int, pp: int = 1):
    """megatron-core's GPTModel (local spec, RMSNorm, SwiGLU, GQA, RoPE) under TP ``tp``
    (weights perturbed per shard), or this rank's stage of it under PP ``pp``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    _patch_for_cpu_worker()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(7)
    moe = {}
    if "num_experts" in spec:
        moe = dict(num_moe_experts=spec["num_experts"], moe_router_topk=spec["topk"],
                   moe_ffn_hidden_size=spec["moe_ffn"], moe_shared_expert_intermediate_size=spec["shared"],
                   moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0,
                   moe_router_score_function=spec.get("score", "softmax"),
                   moe_router_topk_scaling_factor=spec.get("scale"))
    cfg = TransformerConfig(
        num_layers=spec["num_layers"], hidden_size=spec["hidden_size"], num_attention_heads=spec["num_attention_heads"],
        num_query_groups=spec["num_query_groups"], ffn_hidden_size=spec["ffn_hidden_size"], normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        layernorm_epsilon=1e-5, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, **moe)
    layer_spec = get_gpt_layer_local_spec(num_experts=spec.get("num_experts"), normalization="RMSNorm")
    model = GPTModel(config=cfg, transformer_layer_spec=layer_spec, vocab_size=spec["vocab_size"],
                     max_sequence_length=32, position_embedding_type="rope", rotary_base=500000,
                     share_embeddings_and_output_weights=spec.get("tied", False), parallel_output=False,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    gen = torch.Generator().manual_seed(11 + ps.get_tensor_model_parallel_rank())
    with torch.no_grad():               # norms away from 1, every shard distinct (replicated ones equal)
        for name, p in model.named_parameters():
            if "layernorm" in name or "router" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(T)[None].expand(B, T)
    mask = torch.triu(torch.ones(T, T), 1).bool()[None, None]
    with torch.no_grad():
        return model(tokens, pos, mask).float()          # (B, T, V)


def _args(spec: dict, tp: int) -> argparse.Namespace:
    """What Megatron-LM stores as a checkpoint's ``args`` for this model."""
    a = dict(num_layers=spec["num_layers"], hidden_size=spec["hidden_size"], ffn_hidden_size=spec["ffn_hidden_size"],
             num_attention_heads=spec["num_attention_heads"], group_query_attention=True,
             num_query_groups=spec["num_query_groups"], kv_channels=None, padded_vocab_size=spec["vocab_size"],
             max_position_embeddings=32, seq_length=16, position_embedding_type="rope", rotary_base=500000,
             rotary_percent=1.0, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, add_bias_linear=False,
             untie_embeddings_and_output_weights=not spec.get("tied", False), tensor_model_parallel_size=tp,
             pipeline_model_parallel_size=1, expert_model_parallel_size=1, lr=2e-4, micro_batch_size=2,
             params_dtype=torch.float32, num_experts=spec.get("num_experts"))
    if "num_experts" in spec:
        a.update(moe_router_topk=spec["topk"], moe_ffn_hidden_size=spec["moe_ffn"],
                 moe_shared_expert_intermediate_size=spec["shared"], moe_router_load_balancing_type="aux_loss",
                 moe_aux_loss_coeff=0.0, moe_layer_freq=1, moe_router_score_function=spec.get("score", "softmax"),
                 moe_router_topk_scaling_factor=spec.get("scale"))
    return argparse.Namespace(**a)


def _labels(spec: dict) -> torch.Tensor:
    return torch.randint(0, spec["vocab_size"], (B, T), generator=torch.Generator().manual_seed(6))


def save_megatron(spec: dict, tp: int, out: str, pp: int = 1) -> dict:
    """Build, save (torch_dist under out/dist, legacy under out/legacy); rank 0's logits and the
    mean cross-entropy of megatron-core's logits against :func:`_labels` (fp32).

    With ``pp`` > 1 the logits are the whole TP1 model's, whose weights each pipeline stage
    then takes (its layers renumbered from 0) before the stages save."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    model = _megatron_model(spec, tp)
    tokens = torch.randint(0, spec["vocab_size"], (B, T), generator=torch.Generator().manual_seed(5))
    logits = _megatron_logits(model, tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), _labels(spec).flatten())
    if pp > 1:
        whole = model.state_dict()
        model = _megatron_model(spec, tp, pp)
        first = ps.get_pipeline_model_parallel_rank() * spec["num_layers"] // pp
        renumber = lambda k: re.sub(r"^decoder\.layers\.(\d+)\.",   # noqa: E731
                                    lambda m: f"decoder.layers.{int(m.group(1)) + first}.", k)
        model.load_state_dict({k: whole[renumber(k)] for k in model.state_dict()})
    args = _args(spec, tp)
    args.pipeline_model_parallel_size = pp
    state = {"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": 9}
    os.makedirs(os.path.join(out, "dist"), exist_ok=True)
    dist_checkpointing.save(state, os.path.join(out, "dist"))
    if ps.get_data_parallel_rank() == 0:
        name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}" + \
            (f"_{ps.get_pipeline_model_parallel_rank():03d}" if pp > 1 else "")
        rank_dir = os.path.join(out, "legacy", name)
        os.makedirs(rank_dir, exist_ok=True)
        torch.save({"model": model.state_dict_for_save_checkpoint(), "args": args,
                    "checkpoint_version": 3.0, "iteration": 9}, os.path.join(rank_dir, "model_optim_rng.pt"))
    dist.barrier()
    return {"logits": logits, "loss": float(loss)}


def load_megatron(spec: dict, tp: int, path: str) -> torch.Tensor:
    """Load a torch_dist checkpoint into megatron-core's model under TP ``tp``; its logits."""
    from megatron.core import dist_checkpointing
    model = _megatron_model(spec, tp)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)    # as Megatron-LM loads
    assert loaded["args"].num_layers == spec["num_layers"] and loaded["checkpoint_version"] == 3.0
    model.load_state_dict(loaded["model"])
    tokens = torch.randint(0, spec["vocab_size"], (B, T), generator=torch.Generator().manual_seed(5))
    return _megatron_logits(model, tokens)


def read_run(file: str):
    """The written run config, validated once data.paths (left for the user) is set."""
    with open(file) as f:
        data = yaml.safe_load(f)
    assert data["data"]["paths"] == []
    data["data"]["paths"] = ["/corpus/prefix"]
    return config_from_dict(data)


def our_logits(dst: str) -> torch.Tensor:
    cfg = read_run(os.path.join(dst, "config.yaml")).model
    model = build_model(cfg)
    missing, _ = model.load_state_dict(ckpt.load_tensors(os.path.join(dst, "checkpoint")), strict=False)
    assert not missing, missing
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(tokens).float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


CASES = {"tp1_dense": (DENSE, 1, 1), "tp2_dense": (DENSE, 2, 1), "tp1_moe": (MOE, 1, 1), "tp2_moe": (MOE, 2, 1),
         "pp2_dense": (DENSE, 1, 2), "pp2_moe": (MOE, 1, 2), "tp2_tied": (dict(DENSE, tied=True), 2, 1),
         "tp1_moe_sigmoid": (dict(MOE, score="sigmoid", scale=2.0), 1, 1)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case saved by megatron-core (one spawn of 2 gloo ranks) with its reference logits."""
    root = tmp_path_factory.mktemp("megatron")
    calls = [Call(name, save_megatron, (spec, tp, str(root / name), pp), budget_s=120)
             for name, (spec, tp, pp) in CASES.items()]
    batch = run_batch(calls, 2, base_s=120)
    return root, {name: batch.get(name)[0]["logits"] for name in CASES}, \
        {name: batch.get(name)[0]["loss"] for name in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", ["dist", "legacy"])
def test_from_megatron_matches_megatron_core(saved, tmp_path, case, fmt):
    root, ref, _ = saved
    from_megatron(str(root / case / fmt), str(tmp_path / "ours"))
    diff = max_diff(our_logits(str(tmp_path / "ours")), ref[case])
    print(f"{case} {fmt}: max |dlogit| {diff:.3g}")
    assert diff < TOL


def test_config_continues_pretraining(saved, tmp_path):
    root, _, _ = saved
    out = from_megatron(str(root / "tp2_moe" / "dist"), str(tmp_path / "ours"))
    run = read_run(out)
    assert run.model.arch == "moe" and run.model.moe.num_experts == 4 and run.model.moe.shared_experts == 1
    assert run.model.num_kv_heads == 2 and run.model.rope_theta == 500000 and not run.model.tie_embeddings
    assert run.optimizer.lr == 2e-4 and run.training.micro_batch_size == 2 and run.data.seq_len == 16
    assert run.checkpoint.load == os.path.join(str(tmp_path / "ours"), "checkpoint")


def _edited_legacy(root, tmp_path, **changes) -> str:
    """A copy of the TP1 dense legacy checkpoint with ``changes`` to its stored state / args."""
    state = load_pickle(str(root / "tp1_dense" / "legacy" / "mp_rank_00" / "model_optim_rng.pt"))
    for key, value in changes.items():
        if key == "optimizer":
            state["optimizer"] = value
        else:
            setattr(state["args"], key, value)
    out = tmp_path / "edited" / "mp_rank_00"
    out.mkdir(parents=True)
    torch.save(state, out / "model_optim_rng.pt")
    return str(tmp_path / "edited")


def test_optimizer_state_noted_and_weights_converted(saved, tmp_path, capsys):
    root, ref, _ = saved
    src = _edited_legacy(root, tmp_path, optimizer={"state": {0: {"exp_avg": torch.zeros(3)}}})
    from_megatron(src, str(tmp_path / "ours"))
    assert "note: optimizer state not carried" in capsys.readouterr().err
    assert max_diff(our_logits(str(tmp_path / "ours")), ref["tp1_dense"]) < TOL


@pytest.mark.parametrize("key,value,named", [("normalization", "LayerNorm", "RMSNorm only"),
                                             ("add_bias_linear", True, "no biases"),
                                             ("rotary_interleaved", True, "rotate-half")])
def test_unsupported_settings_refused_in_one_line(saved, tmp_path, key, value, named):
    root, _, _ = saved
    with pytest.raises(ConvertError) as e:
        from_megatron(_edited_legacy(root, tmp_path, **{key: value}), str(tmp_path / "ours"))
    assert f"args.{key}={value!r}" in str(e.value) and named in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ours").exists()


def test_tensor_that_does_not_fit_the_args_refused_naming_it(saved, tmp_path):
    root, _, _ = saved
    with pytest.raises(ConvertError) as e:
        from_megatron(_edited_legacy(root, tmp_path, ffn_hidden_size=64), str(tmp_path / "ours"))
    assert str(e.value).endswith("tensor for our 'layers.0.mlp.w1.weight' has shape (48, 32), expected (64, 32) "
                                 "from the stored args"), str(e.value)
    assert not (tmp_path / "ours").exists()


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    """One spawn of 4 gloo ranks over converted checkpoints: the TP2 dense case (from-megatron)
    continued under our TP2 x PP2 (call ``train``, :func:`first_step_loss_tp2_pp2`), then our
    to-megatron exports of the converted TP1 dense and MoE cases loaded into megatron-core's
    model under TP2 (x DP2), :func:`load_megatron` (calls named by case)."""
    root, _, _ = saved
    tmp = tmp_path_factory.mktemp("converted")
    from_megatron(str(root / "tp2_dense" / "dist"), str(tmp / "ours"))
    calls = [Call("train", first_step_loss_tp2_pp2, (str(tmp / "ours"),))]
    for case in ("tp1_dense", "tp1_moe"):
        from_megatron(str(root / case / "dist"), str(tmp / case))
        main(["to-megatron", str(tmp / case), str(tmp / f"{case}-back")])   # the from-megatron DST
        calls.append(Call(case, load_megatron, (CASES[case][0], 2, str(tmp / f"{case}-back" / "iter_0000000"))))
    return run_batch(calls, 4, base_s=120)


def test_to_megatron_loads_into_megatron_core(saved, converted):
    """Our export of the converted TP1 checkpoints (dense, MoE) loads into megatron-core's model
    under TP2 with megatron-core's original logits."""
    _, ref, _ = saved
    batch = converted
    for case in ("tp1_dense", "tp1_moe"):
        diff = max_diff(batch.get(case)[0], ref[case])
        print(f"{case} to-megatron, loaded under TP2: max |dlogit| {diff:.3g}")
        assert diff < TOL


def first_step_loss_tp2_pp2(dst: str) -> float:
    """Continue pre-training the converted checkpoint under our TP2 x PP2 (4 ranks) with the
    written run config; the loss of its first step on the batch megatron-core saw."""
    from polytron.parallel.config import ParallelConfig
    from polytron.parallel.engine import build_engine
    from polytron.parallel.mesh import ParallelDims
    from polytron.pretrain.config import ScheduleConfig
    from polytron.pretrain.optim import build_optimizer
    from polytron.pretrain.step import TrainStep
    run = read_run(os.path.join(dst, "config.yaml"))
    pcfg = ParallelConfig(tensor=2, pipeline=2)
    dims = ParallelDims.resolve(pcfg, run.model, 4)
    engine = build_engine(run.model, pcfg, dims, dims.build_mesh("cpu"), torch.device("cpu"), torch.float32, 1)
    ckpt.load(run.checkpoint.load, engine.model_parts)
    step = TrainStep(engine, build_optimizer(engine.model_parts, run.optimizer), run.optimizer,
                     ScheduleConfig(kind="constant", warmup_iters=0), 1)
    tokens = torch.randint(0, run.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(5))
    labels = _labels({"vocab_size": run.model.vocab_size})
    return float(step([{"tokens": tokens[i:i + 1], "labels": labels[i:i + 1]} for i in range(B)], 0).loss)


def test_held_out_tp2_checkpoint_continues_under_tp2_pp2(saved, converted):
    """A checkpoint megatron-core saved under TP2 imports and trains under our TP2 x PP2: the
    first step's loss equals megatron-core's loss on the same batch."""
    _, _, losses = saved
    ours = converted.get("train")
    print(f"first-step loss: ours (TP2 x PP2) {ours[0]:.7f}, megatron-core (TP2) {losses['tp2_dense']:.7f}")
    assert abs(ours[0] - losses["tp2_dense"]) < TOL


def test_megatron_enums_in_args_read_as_text(tmp_path):
    from megatron.core.transformer.enums import AttnBackend
    file = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(attention_backend=AttnBackend.auto)}, file)
    got = load_pickle(str(file))["args"].attention_backend
    # the stand-in's text; megatron-core allow-lists its own enums globally once some of its
    # modules are imported (megatron/core/safe_globals.py), and then the enum itself comes back
    assert got in (f"AttnBackend({AttnBackend.auto.value!r})", AttnBackend.auto), got


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MEGATRON_HOSTILE_MARKER']}",))


def test_hostile_legacy_pickle_refused(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    monkeypatch.setenv("MEGATRON_HOSTILE_MARKER", str(marker))
    rank_dir = tmp_path / "ck" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    torch.save({"model": {}, "args": _Payload()}, rank_dir / "model_optim_rng.pt")
    with pytest.raises(ConvertError) as e:
        from_megatron(str(tmp_path / "ck"), str(tmp_path / "out"))
    assert "refused" in str(e.value) and "\n" not in str(e.value)
    assert main(["from-megatron", str(tmp_path / "ck"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model_optim_rng.pt: refused" in err[0], err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
