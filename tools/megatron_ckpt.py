"""Megatron-LM / megatron-core GPT checkpoints to and from polytron (``convert_checkpoint.py
from-megatron`` / ``to-megatron``).

Formats read (``SRC`` is a checkpoint root with ``latest_checkpointed_iteration.txt``, an
``iter_*`` / ``release`` directory, or the directory holding the files):

* ``torch_dist``: megatron-core ``dist_checkpointing`` (``metadata.json``, ``.metadata``,
  ``*.distcp``, ``common.pt``). Tensors are global (any TP/PP/EP it was saved with): layer
  tensors are stacked on a leading layer axis (``decoder.layers.<name>``, experts on a second
  axis); they are read with torch.distributed.checkpoint in one process. Byte entries
  (``_extra_state``) are never read.
* legacy: ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` per rank. Tensor-parallel shards are
  merged (column-parallel ``linear_qkv`` / ``linear_fc1`` / vocabulary rows on dim 0, the
  ``linear_fc1`` halves of a gated unit per half; row-parallel ``linear_proj`` / ``linear_fc2``
  on dim 1), pipeline stages renumbered by the layers of the stages before them, expert-parallel
  ranks' ``local_experts`` offset by their expert count.

Pickles (``model_optim_rng.pt``, ``common.pt``) are loaded with ``torch.load(weights_only=True)``
and only :func:`safe_globals` allowed beyond tensors and plain containers, so a file that would
run code on unpickling is refused with one line before anything in it runs.

The GPT family of megatron-core's local and Transformer Engine layer specs maps onto ours
(``llama``, or ``moe`` with ``num_experts``): fused ``linear_qkv`` (per query group: its query
heads, then one key head, then one value head) and gated ``linear_fc1`` ([gate; up]) are split
into ``wq``/``wk``/``wv`` and ``w1``/``w3`` and fused back on export; routers, sequential
(``local_experts.N``), grouped (``experts.linear_fc1.weightN``) and stacked torch_dist experts,
and shared experts map onto model/moe. Model settings come from the checkpoint's stored
``args``; what our model cannot express (LayerNorm, biases, partial or interleaved RoPE, q/k
norm, ...) is refused naming the argument.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultSavePlanner

from polytron.model.hf import ConvertError
from polytron.pretrain.checkpoint.common import dcp_one_process

#: Megatron enums a stored ``args`` may hold: read as the text ``Name(value)`` by a stand-in,
#: so reading a checkpoint neither imports megatron-core nor constructs its classes.
MEGATRON_ENUMS = ("megatron.core.transformer.enums.AttnBackend", "megatron.core.enums.ModelType",
                  "megatron.core.transformer.enums.AttnMaskType")
CHECKPOINT_VERSION = 3.0
REPORT = "megatron_conversion.json"
MEGATRON_CONFIG = "megatron_config.json"
#: Legacy tensors sharded on dim 0 (column-parallel, vocabulary-parallel) and dim 1 (row-parallel).
_COLUMN = re.compile(r"(linear_qkv|linear_fc1)\.(weight|bias)$|^(embedding\.word_embeddings|output_layer)\.weight$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")
_GATED = re.compile(r"linear_fc1\.(weight|bias)$")


class _EnumText:
    """Stand-in for a Megatron enum class in a pickle: ``Name(value)`` -> the text ``Name(value)``."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, value: Any) -> str:
        return f"{self.name}({value!r})"


def safe_globals() -> list:
    """What a Megatron pickle may construct beyond tensors, dtypes and containers:
    ``argparse.Namespace`` and the :data:`MEGATRON_ENUMS` (as text)."""
    return [argparse.Namespace, *((_EnumText(n.rsplit(".", 1)[1]), n) for n in MEGATRON_ENUMS)]


def load_pickle(file: str) -> Any:
    """A Megatron ``.pt`` file, unpickled without running code (weights-only + allow-list)."""
    from polytron.tools.convert_checkpoint import load_data_pickle
    return load_data_pickle(file, safe_globals())


def _args_dict(args: Any, file: str) -> dict:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    raise ConvertError(f"{file}: no Megatron 'args' stored (needed for the model settings)")


# ====================================================================== reading

@dataclass
class MegatronCheckpoint:
    """Global tensors under per-layer megatron names (``decoder.layers.<i>.…``), the stored args."""
    tensors: dict[str, torch.Tensor]
    args: dict
    format: str
    path: str
    iteration: int = 0
    notes: list[str] = field(default_factory=list)


def checkpoint_dir(src: str) -> str:
    """The directory holding a checkpoint's files (root -> its latest iteration)."""
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: not a directory (a Megatron checkpoint is a directory)")
    tracker = os.path.join(src, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker) as f:
            it = f.read().strip()
        name = "release" if it == "release" else f"iter_{int(it):07d}" if it.isdigit() else ""
        if not name or not os.path.isdir(os.path.join(src, name)):
            raise ConvertError(f"{tracker}: names iteration {it!r}, which has no directory there")
        return os.path.join(src, name)
    return src


def read_megatron(src: str) -> MegatronCheckpoint:
    """Read a torch_dist or legacy Megatron checkpoint as global per-layer tensors."""
    path = checkpoint_dir(src)
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return _read_torch_dist(path)
    if any(re.fullmatch(r"mp_rank_\d\d(_\d\d\d){0,2}", n) for n in os.listdir(path)):
        return _read_legacy(path)
    raise ConvertError(f"{path}: neither a torch_dist checkpoint (metadata.json) nor legacy mp_rank_* directories")


def _read_torch_dist(path: str) -> MegatronCheckpoint:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    if meta.get("sharded_backend") != "torch_dist":
        raise ConvertError(f"{path}/metadata.json: sharded_backend={meta.get('sharded_backend')!r}; "
                           "only torch_dist is read (re-save with --ckpt-format torch_dist)")
    common_file = os.path.join(path, "common.pt")
    common = load_pickle(common_file) if os.path.isfile(common_file) else {}
    args = _args_dict(common.get("args") if isinstance(common, dict) else None, common_file)
    reader = dcp.FileSystemReader(path)
    md = reader.read_metadata()
    want = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
            for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and _is_model_key(k)}
    notes = []
    if any(k.startswith("optimizer.") for k in md.state_dict_metadata):
        notes.append("optimizer state not carried (Megatron's optimizer state is keyed by its parameter "
                     "layout); weights converted, the optimizer starts fresh")
    with dcp_one_process(True):
        dcp.load(want, storage_reader=reader,
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in want.items():
        tensors.update(_unstack(key, t))
    return MegatronCheckpoint(tensors, args, "torch_dist", path, int(common.get("iteration", 0) or 0), notes)


def _is_model_key(key: str) -> bool:
    return "_extra_state" not in key and not key.startswith(("optimizer.", "rng_state", "rerun_state"))


def _unstack(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch_dist's stacked layer tensors -> per-layer (per-expert) names."""
    key = _norm_name(key)
    if not key.startswith("decoder.layers."):
        return {key: t}
    rest = key[len("decoder.layers."):]
    m = re.fullmatch(r"mlp\.experts\.experts\.(linear_fc[12]\.(?:weight|bias))", rest)
    if m:                                                   # (L, E, ...)
        return {f"decoder.layers.{i}.mlp.experts.local_experts.{j}.{m.group(1)}": t[i, j].clone()
                for i in range(t.shape[0]) for j in range(t.shape[1])}
    return {f"decoder.layers.{i}.{rest}": t[i].clone() for i in range(t.shape[0])}


def _norm_name(name: str) -> str:
    """Transformer Engine's fused norm names -> the local spec's."""
    name = name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
    name = re.sub(r"(?<!experts\.)mlp\.linear_fc1\.layer_norm_weight", "pre_mlp_layernorm.weight", name)
    return name


def _read_legacy(path: str) -> MegatronCheckpoint:
    ranks = sorted(n for n in os.listdir(path) if re.fullmatch(r"mp_rank_\d\d(_\d\d\d){0,2}", n))
    first = os.path.join(path, ranks[0], "model_optim_rng.pt")
    state0 = _legacy_state(first)
    args = _args_dict(state0.get("args"), first)
    pp = int(args.get("pipeline_model_parallel_size") or 1)
    ep = int(args.get("expert_model_parallel_size") or 1)
    shards: dict[tuple[int, int, int], dict] = {}
    for name in ranks:
        nums = [int(x) for x in name[len("mp_rank_"):].split("_")]
        tp_r, pp_r, ep_r = nums[0], nums[1] if pp > 1 else 0, nums[-1] if ep > 1 else 0
        if len(nums) != 1 + (pp > 1) + (ep > 1):
            raise ConvertError(f"{path}/{name}: does not fit pipeline {pp} x expert {ep} of the stored args")
        file = os.path.join(path, name, "model_optim_rng.pt")
        state = state0 if name == ranks[0] else _legacy_state(file)
        shards[(tp_r, pp_r, ep_r)] = {_norm_name(k): v for k, v in state["model"].items()
                                      if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    tp = 1 + max(k[0] for k in shards)
    missing = [k for k in ((t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)) if k not in shards]
    if missing:
        raise ConvertError(f"{path}: rank files missing for (tp, pp, ep) {missing[0]}")
    etp = int(args.get("expert_tensor_parallel_size") or tp)
    if args.get("num_experts") and etp != tp:
        raise ConvertError(f"{path}: expert_tensor_parallel_size={etp} differs from tensor parallel {tp} (not read)")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for p in range(pp):
        stage: dict[str, torch.Tensor] = {}
        for e in range(ep):
            names = shards[(0, p, e)]
            for name in names:
                parts = [shards[(t, p, e)][name] for t in range(tp)]
                stage[_expert_global(name, e, args, ep)] = _merge_tp(name, parts)
        layers = sorted({int(m.group(1)) for n in stage for m in [re.match(r"decoder\.layers\.(\d+)\.", n)] if m})
        for name, t in stage.items():
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
            tensors[f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else name] = t
        offset += len(layers)
    notes = []
    if "optimizer" in state0:
        notes.append("optimizer state not carried (Megatron's optimizer state is keyed by its parameter "
                     "layout); weights converted, the optimizer starts fresh")
    return MegatronCheckpoint(tensors, args, "legacy", path, int(state0.get("iteration", 0) or 0), notes)


def _legacy_state(file: str) -> dict:
    if not os.path.isfile(file):
        raise ConvertError(f"{file}: missing")
    state = load_pickle(file)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ConvertError(f"{file}: no 'model' state dict (found {keys}; virtual pipeline 'model0' ... is not read)")
    return state


def _expert_global(name: str, ep_rank: int, args: dict, ep: int) -> str:
    """A legacy expert name with its expert-parallel rank's offset; grouped names -> sequential."""
    name = re.sub(r"mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$", r"mlp.experts.local_experts.\3.\1.\2", name)
    m = re.search(r"local_experts\.(\d+)\.", name)
    if not m or ep == 1:
        return name
    local = int(args["num_experts"]) // ep
    return name.replace(m.group(0), f"local_experts.{ep_rank * local + int(m.group(1))}.")


def _merge_tp(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if _GATED.search(name):                             # each rank: [gate_r; up_r]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if _COLUMN.search(name):
        return torch.cat(parts, dim=0)
    if _ROW.search(name):
        return torch.cat(parts, dim=1)
    return parts[0]


# ====================================================================== settings

def _get(args: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        if args.get(n) is not None:
            return args[n]
    return default


def _refuse_unless(args: dict, where: str, key: str, ok, want: str) -> None:
    if key in args and not ok(args[key]):
        raise ConvertError(f"{where}: args.{key}={args[key]!r} is not supported (polytron has {want})")


def model_config_from_args(ckpt: MegatronCheckpoint):
    """Our ModelConfig for a Megatron checkpoint's args (and its embedding's padded vocabulary)."""
    from polytron.model.config import ModelConfig, RopeScaling
    from polytron.model.configlib import ConfigError
    a, where = ckpt.args, f"{ckpt.path} ({ckpt.format})"
    checks = (("normalization", lambda v: v == "RMSNorm", "RMSNorm only, no LayerNorm"),
              ("position_embedding_type", lambda v: v == "rope", "rotary position embeddings only"),
              ("rotary_percent", lambda v: float(v) == 1.0, "full rotary only"),
              ("rotary_interleaved", lambda v: not v, "the rotate-half RoPE layout only"),
              ("swiglu", bool, "a SwiGLU MLP only"),
              ("add_bias_linear", lambda v: not v, "no biases on Megatron's linears"),
              ("add_qkv_bias", lambda v: not v, "no q/k/v bias without the others"),
              ("qk_layernorm", lambda v: not v, "no q/k norm"),
              ("multi_latent_attention", lambda v: not v, "grouped-query attention, not MLA"),
              ("softmax_scale", lambda v: v is None, "1/sqrt(head_dim) attention scaling"),
              ("moe_shared_expert_gate", lambda v: not v, "ungated shared experts"),
              ("moe_router_num_groups", lambda v: not v, "ungrouped top-k routing"),
              ("moe_expert_capacity_factor", lambda v: v is None or float(v) > 0, "dropless or a capacity"))
    for key, ok, want in checks:
        _refuse_unless(a, where, key, ok, want)
    emb = ckpt.tensors.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ConvertError(f"{where}: no embedding.word_embeddings.weight")
    heads = int(_get(a, "num_attention_heads"))
    kv = int(_get(a, "num_query_groups", default=heads)) if a.get("group_query_attention", True) else heads
    fields: dict[str, Any] = dict(
        vocab_size=int(emb.shape[0]), hidden_size=int(a["hidden_size"]), num_layers=int(a["num_layers"]),
        num_heads=heads, num_kv_heads=kv, head_dim=int(_get(a, "kv_channels", default=a["hidden_size"] // heads)),
        ffn_hidden_size=int(_get(a, "ffn_hidden_size", default=4 * a["hidden_size"])),
        max_seq_len=int(_get(a, "max_position_embeddings", "seq_length", default=2048)),
        rope_theta=float(_get(a, "rotary_base", default=10000)),
        norm_eps=float(_get(a, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
        tie_embeddings="output_layer.weight" not in ckpt.tensors,
        init_std=float(_get(a, "init_method_std", default=0.02)))
    if a.get("use_rope_scaling"):
        fields["rope_scaling"] = RopeScaling(type="llama3", factor=float(_get(a, "rope_scaling_factor", default=8.0)))
    if a.get("num_experts"):
        fields.update(arch="moe", moe=_moe_from_args(a, where, fields["ffn_hidden_size"]))
    try:
        cfg = ModelConfig(**fields)
        cfg.validate()
    except (ConfigError, ValueError, TypeError) as e:
        raise ConvertError(f"{where}: stored args give no valid polytron model ({e})") from None
    return cfg


def _moe_from_args(a: dict, where: str, ffn: int):
    from polytron.model.moe.config import MoEConfig
    experts, f = int(a["num_experts"]), int(_get(a, "moe_ffn_hidden_size", default=ffn))
    shared = int(_get(a, "moe_shared_expert_intermediate_size", default=0))
    if shared % f:
        raise ConvertError(f"{where}: args.moe_shared_expert_intermediate_size={shared} is not a multiple of "
                           f"moe_ffn_hidden_size={f} (polytron's shared experts have the routed width)")
    score = _get(a, "moe_router_score_function", default="softmax")
    if score not in ("softmax", "sigmoid"):
        raise ConvertError(f"{where}: args.moe_router_score_function={score!r} is not supported (softmax, sigmoid)")
    balance = _get(a, "moe_router_load_balancing_type", default="aux_loss")
    balance = balance[0] if isinstance(balance, list) and len(balance) == 1 else balance
    if balance not in ("aux_loss", "none"):
        raise ConvertError(f"{where}: args.moe_router_load_balancing_type={balance!r} is not supported "
                           "(aux_loss or none)")
    every, first_dense = _moe_layers(a, where)
    top_k = int(_get(a, "moe_router_topk", default=2))
    return MoEConfig(                  # sigmoid scores are renormalized over the top k when k > 1
        num_experts=experts, top_k=top_k, expert_ffn_hidden_size=f, shared_experts=shared // f, score=score,
        normalize_top_k=not a.get("moe_router_pre_softmax", False) if score == "softmax" else top_k > 1,
        route_scale=float(_get(a, "moe_router_topk_scaling_factor", default=1.0)),
        aux_loss_coeff=0.0 if balance == "none" else float(_get(a, "moe_aux_loss_coeff", default=0.0)),
        z_loss_coeff=float(_get(a, "moe_z_loss_coeff", default=0.0)),
        bias_update_rate=float(_get(a, "moe_router_bias_update_rate", default=1e-3))
        if a.get("moe_router_enable_expert_bias") else 0.0,
        capacity_factor=float(_get(a, "moe_expert_capacity_factor", default=0.0)),
        every=every, first_dense=first_dense)


def _moe_layers(a: dict, where: str) -> tuple[int, int]:
    """(every, first_dense) of ``moe_layer_freq``: an int N, or a 0/1 list of dense-then-MoE layers."""
    freq = _get(a, "moe_layer_freq", default=1)
    if isinstance(freq, int):
        return freq, 0
    if isinstance(freq, (list, tuple)) and set(freq) <= {0, 1} and 1 in freq:
        k = list(freq).index(1)
        if all(freq[k:]):
            return 1, k
    raise ConvertError(f"{where}: args.moe_layer_freq={freq!r} is not supported (every N-th layer, or dense "
                       "first layers then MoE)")


# ====================================================================== names

def megatron_to_ours(cfg, meg: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Megatron per-layer tensors -> ours (split qkv and gated fc1), every shape checked."""
    from polytron.model.hf import check_param_shapes
    from polytron.model.transformer import param_shapes
    out: dict[str, torch.Tensor] = {}
    top = {"embedding.word_embeddings.weight": "tok_embeddings.weight", "decoder.final_layernorm.weight":
           "norm.weight", "output_layer.weight": "output.weight"}
    used = set()
    for name, t in meg.items():
        if name in top:
            out[top[name]] = t
            used.add(name)
    q_per = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        get = _taker(meg, used, where)
        out[f"layers.{i}.attention_norm.weight"] = get(p + "input_layernorm.weight")
        out[f"layers.{i}.mlp_norm.weight"] = get(p + "pre_mlp_layernorm.weight")
        qkv = get(p + "self_attention.linear_qkv.weight")
        g = qkv.view(cfg.num_kv_heads, q_per + 2, cfg.head_dim, cfg.hidden_size)   # (G, q+2, hd, d)
        out[f"layers.{i}.attention.wq.weight"] = g[:, :q_per].reshape(-1, cfg.hidden_size)
        out[f"layers.{i}.attention.wk.weight"] = g[:, q_per].reshape(-1, cfg.hidden_size)
        out[f"layers.{i}.attention.wv.weight"] = g[:, q_per + 1].reshape(-1, cfg.hidden_size)
        out[f"layers.{i}.attention.wo.weight"] = get(p + "self_attention.linear_proj.weight")
        if cfg.arch == "moe" and _is_moe(cfg, i):
            out.update(_moe_in(cfg, i, get, meg, used))
        else:
            gate, up = get(p + "mlp.linear_fc1.weight").chunk(2, dim=0)
            out.update({f"layers.{i}.mlp.w1.weight": gate, f"layers.{i}.mlp.w3.weight": up,
                        f"layers.{i}.mlp.w2.weight": get(p + "mlp.linear_fc2.weight")})
    extra = sorted(set(meg) - used)
    if extra:
        raise ConvertError(f"{where}: tensor '{extra[0]}' does not fit the stored args (not converted)")
    expected = param_shapes(cfg)
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
    check_param_shapes(out, expected, where, lambda name: f"for our '{name}'", "the stored args")
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
        expected["output.weight"] = expected["tok_embeddings.weight"]
    return {k: out[k].float().contiguous() for k in expected if k in out}


def _taker(meg: dict, used: set, where: str):
    def get(name: str) -> torch.Tensor:
        if name not in meg:
            raise ConvertError(f"{where}: tensor '{name}' is missing")
        used.add(name)
        return meg[name]
    return get


def _is_moe(cfg, i: int) -> bool:
    from polytron.model.moe.config import is_moe_layer
    return is_moe_layer(cfg.moe, i)


def _moe_in(cfg, i: int, get, meg: dict, used: set) -> dict[str, torch.Tensor]:
    p, out = f"decoder.layers.{i}.mlp.", {}
    out[f"layers.{i}.mlp.router.weight"] = get(p + "router.weight")
    if p + "router.expert_bias" in meg:
        out[f"layers.{i}.mlp.router.expert_bias"] = get(p + "router.expert_bias")
    used.update(n for n in meg if n.startswith(p + "router.") and n.endswith(("local_tokens_per_expert",)))
    fc1 = [get(f"{p}experts.local_experts.{j}.linear_fc1.weight") for j in range(cfg.moe.num_experts)]
    fc2 = [get(f"{p}experts.local_experts.{j}.linear_fc2.weight") for j in range(cfg.moe.num_experts)]
    out[f"layers.{i}.mlp.experts.gate.weight"] = torch.stack([w.chunk(2)[0] for w in fc1])   # (E, f, d)
    out[f"layers.{i}.mlp.experts.up.weight"] = torch.stack([w.chunk(2)[1] for w in fc1])
    out[f"layers.{i}.mlp.experts.down.weight"] = torch.stack(fc2)                             # (E, d, f)
    if cfg.moe.shared_experts:
        gate, up = get(p + "shared_experts.linear_fc1.weight").chunk(2)
        out.update({f"layers.{i}.mlp.shared.w1.weight": gate, f"layers.{i}.mlp.shared.w3.weight": up,
                    f"layers.{i}.mlp.shared.w2.weight": get(p + "shared_experts.linear_fc2.weight")})
    return out


def ours_to_megatron(cfg, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors -> megatron-core per-layer names (local spec, sequential experts)."""
    out = {"embedding.word_embeddings.weight": t["tok_embeddings.weight"],
           "decoder.final_layernorm.weight": t["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = t["output.weight"]
    q_per, d = cfg.num_heads // cfg.num_kv_heads, cfg.hidden_size
    for i in range(cfg.num_layers):
        p, o = f"decoder.layers.{i}.", f"layers.{i}."
        q = t[o + "attention.wq.weight"].view(cfg.num_kv_heads, q_per, cfg.head_dim, d)
        k = t[o + "attention.wk.weight"].view(cfg.num_kv_heads, 1, cfg.head_dim, d)
        v = t[o + "attention.wv.weight"].view(cfg.num_kv_heads, 1, cfg.head_dim, d)
        out.update({p + "input_layernorm.weight": t[o + "attention_norm.weight"],
                    p + "pre_mlp_layernorm.weight": t[o + "mlp_norm.weight"],
                    p + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, d),
                    p + "self_attention.linear_proj.weight": t[o + "attention.wo.weight"]})
        if cfg.arch == "moe" and _is_moe(cfg, i):
            out[p + "mlp.router.weight"] = t[o + "mlp.router.weight"]
            if o + "mlp.router.expert_bias" in t:
                out[p + "mlp.router.expert_bias"] = t[o + "mlp.router.expert_bias"]
            for j in range(cfg.moe.num_experts):
                out[f"{p}mlp.experts.local_experts.{j}.linear_fc1.weight"] = torch.cat(
                    [t[o + "mlp.experts.gate.weight"][j], t[o + "mlp.experts.up.weight"][j]])
                out[f"{p}mlp.experts.local_experts.{j}.linear_fc2.weight"] = t[o + "mlp.experts.down.weight"][j]
            if cfg.moe.shared_experts:
                out[p + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                    [t[o + "mlp.shared.w1.weight"], t[o + "mlp.shared.w3.weight"]])
                out[p + "mlp.shared_experts.linear_fc2.weight"] = t[o + "mlp.shared.w2.weight"]
        else:
            out[p + "mlp.linear_fc1.weight"] = torch.cat([t[o + "mlp.w1.weight"], t[o + "mlp.w3.weight"]])
            out[p + "mlp.linear_fc2.weight"] = t[o + "mlp.w2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _moe_arguments(cfg) -> dict:
    """The router and expert settings Megatron-LM's arguments and megatron-core's
    TransformerConfig name alike."""
    m = cfg.moe
    return dict(moe_router_topk=m.top_k, moe_ffn_hidden_size=m.ffn(cfg),
                moe_shared_expert_intermediate_size=m.shared_experts * m.ffn(cfg) or None,
                moe_router_score_function=m.score,
                moe_router_pre_softmax=m.score == "softmax" and not m.normalize_top_k,
                moe_router_topk_scaling_factor=m.route_scale if m.route_scale != 1.0 else None,
                moe_router_enable_expert_bias=m.bias_update_rate > 0)


def args_for(cfg, seq_len: int) -> dict:
    """Megatron-LM arguments describing ``cfg`` (stored as the checkpoint's ``args``)."""
    a: dict[str, Any] = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, group_query_attention=cfg.num_kv_heads != cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, kv_channels=cfg.head_dim, padded_vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len, seq_length=seq_len, position_embedding_type="rope",
        rotary_base=cfg.rope_theta, rotary_percent=1.0, normalization="RMSNorm", norm_epsilon=cfg.norm_eps,
        swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        init_method_std=cfg.init_std, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        use_rope_scaling=cfg.rope_scaling.type == "llama3", rope_scaling_factor=cfg.rope_scaling.factor)
    if cfg.arch == "moe":
        m = cfg.moe
        a.update(num_experts=m.num_experts, **_moe_arguments(cfg),
                 moe_aux_loss_coeff=m.aux_loss_coeff, moe_z_loss_coeff=m.z_loss_coeff or None,
                 moe_router_bias_update_rate=m.bias_update_rate,
                 moe_expert_capacity_factor=m.capacity_factor or None,
                 moe_layer_freq=[0] * m.first_dense + [int((i - m.offset) % m.every == 0 and i >= m.offset)
                                                        for i in range(m.first_dense, cfg.num_layers)])
    return a


def transformer_config_kwargs(cfg) -> dict:
    """megatron-core ``TransformerConfig`` / ``GPTModel`` keyword arguments matching ``cfg``
    (written as ``megatron_config.json``; the activation is SiLU with ``gated_linear_unit``)."""
    tc: dict[str, Any] = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, num_query_groups=cfg.num_kv_heads, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True,
        activation_func="silu", add_bias_linear=False, init_method_std=cfg.init_std)
    if cfg.arch == "moe":
        m = cfg.moe
        tc.update(num_moe_experts=m.num_experts, **_moe_arguments(cfg),
                  moe_layer_freq=args_for(cfg, 0)["moe_layer_freq"])
    gpt = dict(vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_seq_len, position_embedding_type="rope",
               rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
               share_embeddings_and_output_weights=cfg.tie_embeddings)
    return {"TransformerConfig": tc, "GPTModel": gpt,
            "layer_spec": {"get_gpt_layer_local_spec": {"num_experts": cfg.moe.num_experts if cfg.arch == "moe"
                                                        else None, "normalization": "RMSNorm"}}}


# ====================================================================== writing torch_dist

def write_torch_dist(path: str, meg: dict[str, torch.Tensor], cfg, args: dict) -> None:
    """megatron-core ``dist_checkpointing`` torch_dist files of per-layer tensors, keyed as
    megatron-core's GPTModel.sharded_state_dict() keys them (layers stacked on a leading axis,
    experts on a second one; each linear's empty ``_extra_state`` object), written with
    torch.distributed.checkpoint in this one process, plus ``common.pt`` (args, version,
    iteration) and ``metadata.json``."""
    import io

    import torch.distributed.checkpoint as dcp
    L = cfg.num_layers
    stacked: dict[str, list] = {}
    for name, t in meg.items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.+)$", name)
        if not m:
            stacked[name] = [t]
            continue
        i, rest = int(m.group(1)), _te_name(m.group(2))
        e = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.(.+)", rest)
        key = f"decoder.layers.mlp.experts.experts.{e.group(2)}" if e else f"decoder.layers.{rest}"
        slots = stacked.setdefault(key, [None] * L)
        if e:
            if slots[i] is None:
                slots[i] = [None] * cfg.moe.num_experts
            slots[i][int(e.group(1))] = t
        else:
            slots[i] = t
    state: dict[str, Any] = {}
    for key, slots in stacked.items():
        if any(s is None for s in slots):
            raise ConvertError(f"to-megatron: '{key}' is not in every layer (layer-varying MLPs are not written)")
        state[key] = slots[0] if len(slots) == 1 and not key.startswith("decoder.layers.") else \
            torch.stack([torch.stack(s) if isinstance(s, list) else s for s in slots]).contiguous()
        linear = re.fullmatch(r"(decoder\.layers\.(.+\.)?linear_\w+)\.weight", key)
        if linear:
            empty = io.BytesIO()
            torch.save([None], empty)               # a ShardedObject: the list of its shards' data
            nested = "experts.experts." in key
            for i in range(L):
                for j in range(cfg.moe.num_experts if nested else 1):
                    shard = f"shard_{i}.{j}_{L}.{cfg.moe.num_experts}" if nested else f"shard_{i}_{L}"
                    state[f"{linear.group(1)}._extra_state/{shard}"] = io.BytesIO(empty.getvalue())
    os.makedirs(path, exist_ok=True)
    with dcp_one_process(True):
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path), planner=_RawBytesPlanner(), no_dist=True)
    torch.save({"args": argparse.Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0},
               os.path.join(path, "common.pt"))
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, f)


class _RawBytesPlanner(DefaultSavePlanner):
    """Byte entries written as given (already ``torch.save``d), as megatron-core's planner does."""

    def transform_object(self, write_item, object):  # noqa: A002 - the base class's parameter name
        return object


def _te_name(rest: str) -> str:
    """The local spec's norm names -> the keys its sharded state dict uses."""
    return {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}.get(rest, rest)


# ====================================================================== commands

def from_megatron(src: str, dst: str, overwrite: bool = False) -> str:
    """Megatron checkpoint -> DST/checkpoint + DST/config.yaml (+ report); returns the config path."""
    from polytron.pretrain.config import RunConfig
    from polytron.tools.convert_checkpoint import check_destination, write_converted_run
    check_destination(dst, overwrite, [src])
    ckpt = read_megatron(src)
    cfg = model_config_from_args(ckpt)
    tensors = megatron_to_ours(cfg, ckpt.tensors, f"{ckpt.path} ({ckpt.format})")
    run = RunConfig(model=cfg)
    _run_settings(run, ckpt.args, cfg)
    for note in ckpt.notes:
        print(f"note: {note}", file=sys.stderr)
    report = {"source": os.path.abspath(ckpt.path), "format": ckpt.format, "iteration": ckpt.iteration,
              "tensors": len(tensors), "notes": ckpt.notes}
    run.training.name = os.path.basename(os.path.abspath(src).rstrip("/"))
    write_converted_run(dst, run, cfg, tensors, os.path.abspath(ckpt.path), suffix="continued",
                        what="(tools/convert_checkpoint.py from-megatron)", report_name=REPORT, report=report)
    return os.path.join(dst, "config.yaml")


def _run_settings(run, a: dict, cfg) -> None:
    """Training settings of the stored args that our run config has (sequence, batch, optimizer)."""
    run.data.seq_len = int(min(_get(a, "seq_length", default=cfg.max_seq_len), cfg.max_seq_len))
    tok = _get(a, "tokenizer_model")
    if isinstance(tok, str) and os.path.exists(tok):
        run.data.tokenizer = os.path.abspath(tok)
    pairs = (("lr", run.optimizer, "lr"), ("min_lr", run.optimizer, "min_lr"),
             ("weight_decay", run.optimizer, "weight_decay"), ("adam_beta1", run.optimizer, "beta1"),
             ("adam_beta2", run.optimizer, "beta2"), ("adam_eps", run.optimizer, "eps"),
             ("clip_grad", run.optimizer, "grad_clip"), ("micro_batch_size", run.training, "micro_batch_size"),
             ("global_batch_size", run.training, "global_batch_size"), ("seed", run.training, "seed"))
    for key, obj, attr in pairs:
        if a.get(key) is not None:
            setattr(obj, attr, type(getattr(obj, attr))(a[key]))


def to_megatron(src: str, dst: str, overwrite: bool = False, plugins: tuple[str, ...] = ()) -> str:
    """Our checkpoint (or run directory) -> DST/iter_0000000 torch_dist (+ tracker and
    ``megatron_config.json``); returns the checkpoint used."""
    from polytron.pretrain import checkpoint as ckpt
    from polytron.tools.convert_checkpoint import check_destination, checkpoint_model_config, staged
    converted = os.path.join(src, "checkpoint")              # a from-megatron / from-hf output directory
    path = ckpt.resolve_checkpoint(converted if os.path.isfile(os.path.join(src, "config.yaml"))
                                   and os.path.isdir(converted) else src)
    check_destination(dst, overwrite, [src, path])
    cfg = checkpoint_model_config(path, plugins)
    state = ckpt.read_trainer_state(path)
    run_cfg = state.get("config") if isinstance(state, dict) else None
    if cfg.arch not in ("llama", "moe") or cfg.attention != "gqa" or cfg.linear != "linear" \
            or cfg.mlp not in ("swiglu", "moe") or cfg.attention_bias or cfg.mlp_bias \
            or cfg.rope_scaling.type == "linear" or (cfg.arch == "moe" and cfg.moe.heads > 1):
        raise ConvertError(f"checkpoint {path}: model.arch={cfg.arch} (attention {cfg.attention}, mlp {cfg.mlp}, "
                           f"linear {cfg.linear}) has no megatron-core GPT equivalent")
    tensors = ckpt.load_tensors(path)
    seq = int(((run_cfg or {}).get("data") or {}).get("seq_len") or cfg.max_seq_len)
    meg = ours_to_megatron(cfg, tensors)
    with staged(dst, ("iter_0000000", "latest_checkpointed_iteration.txt", MEGATRON_CONFIG)) as tmp:
        write_torch_dist(os.path.join(tmp, "iter_0000000"), meg, cfg, args_for(cfg, seq))
        with open(os.path.join(tmp, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("0")
        with open(os.path.join(tmp, MEGATRON_CONFIG), "w") as f:
            json.dump(transformer_config_kwargs(cfg), f, indent=1)
    return path
