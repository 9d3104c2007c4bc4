"""Hugging Face export and import of the ``moe`` decoder.

A config is exported to the transformers class that computes exactly what it computes,
else to a self-contained ``trust_remote_code`` model (``modeling_polytron_moe.py``):

* ``MixtralForCausalLM``: softmax scores, normalized top-k, every layer MoE, no shared
  experts, no balancing bias, no biases, ``route_scale`` 1, dropless outside training;
* ``Glm4MoeForCausalLM`` (GLM-4.5's class, DeepSeek-V3's MoE on GQA attention): sigmoid
  scores with the balancing bias (``e_score_correction_bias``; zeros without
  ``bias_update_rate``), one or more shared experts, dense first layers, any
  ``normalize_top_k`` / ``route_scale``; one group (``n_group = topk_group = 1``), no
  q/k norm, full rotary, no attention bias, dropless outside training;
* otherwise ``polytron_moe`` remote code: MH-MoE, softmax with shared experts,
  MoE every N layers (any ``offset``), biases, an evaluation capacity (``eval_capacity``
  that drops), BitLinear (or any other linear kind with a piece). The
  modeling file is assembled (:mod:`model.hf_remote`) from the MoE piece
  (:mod:`model.moe.modeling_polytron_moe`) and the pieces of the other kinds used.

The MoE fields (``moe``, ``balance_bias``, ``polytron_moe``) are registered with
:func:`model.hf_remote.register_fields`, so any remote-code export whose layers use
``moe`` / ``mh_moe`` (YOCO, DHA) writes and reads them the same way.

``DeepseekV3ForCausalLM`` would match the routing but its attention is multi-head latent
attention (compressed, normalized keys and values, interleaved RoPE), not this model's
GQA; ``Qwen3MoeForCausalLM`` always normalizes q and k; ``Qwen2MoeForCausalLM`` always
gates its shared expert with a sigmoid. None of the three computes what this model
computes, so none is an export target.

Routed experts are written per expert under each class's checkpoint names
(``...experts.<j>.w1.weight`` for Mixtral, ``...experts.<j>.gate_proj.weight`` for GLM),
which is what ``save_pretrained`` writes and what every transformers version reads;
``from-hf`` also reads the fused ``experts.gate_up_proj`` / ``experts.down_proj`` layout.
Training-only MoE settings (loss coefficients, bias update rate, capacity) travel in a
``polytron_moe`` entry of ``config.json``, so ``from-hf`` of our own export restores them.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from polytron.model.hf import ConvertError, check_param_shapes, require_fields
from polytron.model.hf_remote import Family, RemoteAdapter, register_fields, register_piece
from polytron.model.llama.hf import llama_config_fields, llama_model_fields

REMOTE_FILE = "modeling_polytron_moe.py"
REMOTE_TYPE = "polytron_moe"
#: MoE settings that only matter for training, carried in config.json["polytron_moe"] (the
#: capacity keys too: a native class computes without them, so they travel here for from-hf).
TRAINING_FIELDS = ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate", "balance_choices", "gemm",
                   "log_expert_load", "reference", "capacity_factor", "capacity_rounding", "eval_capacity",
                   "eval_capacity_fraction")
#: MoE settings the remote-code model reads (config.json["moe"]); the capacity keys decide
#: its (evaluation) capacity, as ``MoE.capacity`` does outside training.
ROUTING_FIELDS = ("num_experts", "top_k", "expert_ffn_hidden_size", "shared_experts", "score",
                  "normalize_top_k", "route_scale", "every", "offset", "first_dense", "heads",
                  "capacity_factor", "capacity_rounding", "eval_capacity", "eval_capacity_fraction")

_ATTN = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
         "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
         "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_DENSE = {"mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}
_SHARED = {"mlp.shared.w1": "mlp.shared_experts.gate_proj", "mlp.shared.w3": "mlp.shared_experts.up_proj",
           "mlp.shared.w2": "mlp.shared_experts.down_proj"}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
#: Per-expert names of our stacked projections: (gate, up, down) in each class.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "glm4_moe": ("gate_proj", "up_proj", "down_proj")}
_PROJ = ("gate", "up", "down")
_MUST_BE = {"hidden_act": "silu", "sliding_window": None, "use_sliding_window": False,
            "quantization_config": None, "layer_types": None, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, "router_jitter_noise": 0.0, "use_qk_norm": False}


def target(cfg) -> str:
    """The export target of ``cfg``: ``mixtral``, ``glm4_moe`` or the remote-code ``polytron_moe``."""
    m = cfg.moe
    plain = (cfg.linear == "linear" and cfg.attention == "gqa" and not cfg.attention_bias
             and not cfg.mlp_bias and (cfg.mlp == "moe" or m.heads == 1) and m.every == 1 and m.offset == 0
             and not m.eval_drops())
    if plain and m.score == "softmax" and m.normalize_top_k and m.route_scale == 1.0 and m.shared_experts == 0 \
            and m.bias_update_rate == 0 and m.first_dense == 0:
        return "mixtral"
    if plain and m.score == "sigmoid" and m.shared_experts > 0 and m.num_experts >= 2:
        return "glm4_moe"
    return REMOTE_TYPE


def moe_config_fields(cfg) -> dict:
    """config.json fields of the MoE kinds: routing (``moe``), the balancing bias flag, and the
    training-only settings (``polytron_moe``, which also carries the dense width)."""
    m = cfg.moe
    return {"moe": {k: (m.ffn(cfg) if k == "expert_ffn_hidden_size" else getattr(m, k)) for k in ROUTING_FIELDS},
            "balance_bias": m.bias_update_rate > 0,
            REMOTE_TYPE: {**{k: getattr(m, k) for k in TRAINING_FIELDS}, "ffn_hidden_size": cfg.ffn_hidden_size}}


def moe_from_config(hf: dict, file: str) -> dict:
    """``{"moe": MoEConfig}`` from the fields :func:`moe_config_fields` writes."""
    from polytron.model.moe.config import MoEConfig
    return {"moe": MoEConfig(**_moe_fields(hf, file, REMOTE_TYPE))}


for _kind in ("moe", "mh_moe"):
    register_piece("mlp", _kind, "polytron.model.hf_remote.pieces:swiglu",
                   "polytron.model.moe.modeling_polytron_moe:moe")
    register_fields(_kind, moe_config_fields, moe_from_config)


class _Remote(RemoteAdapter):
    """The ``polytron_moe`` family (its tensors are named by :class:`MoEAdapter`)."""
    family = Family(REMOTE_TYPE, REMOTE_FILE, "PolytronMoEConfig", "PolytronMoEForCausalLM")


REMOTE = _Remote()


def moe_layer(cfg, i: int) -> bool:
    from polytron.model.moe.config import is_moe_layer
    return is_moe_layer(cfg.moe, i)


class MoEAdapter:
    """Mixtral / GLM-4-MoE / remote-code export; Mixtral, GLM-4-MoE and our remote type import."""
    model_types = ("mixtral", "glm4_moe", REMOTE_TYPE)

    def exportable(self, cfg) -> str:
        """Why ``cfg`` has no export ('' when it has one)."""
        return REMOTE.exportable(cfg) if target(cfg) == REMOTE_TYPE else ""

    # ------------------------------------------------------------ names

    def layer_map(self, cfg, i: int, kind: str) -> dict[str, str]:
        """Our path inside ``layers.<i>.`` -> the path inside ``model.layers.<i>.`` (non-expert tensors)."""
        out = dict(_ATTN)
        if not moe_layer(cfg, i):
            return {**out, **_DENSE}
        if kind == "mixtral":
            return {**out, "mlp.router": "block_sparse_moe.gate"}
        out.update({"mlp.router": "mlp.gate", **_SHARED})
        if kind == REMOTE_TYPE:
            out.update({"mlp.split": "mlp.split", "mlp.merge": "mlp.merge"})
        return out

    def _rename(self, cfg, kind: str, name: str) -> str:
        if name in _TOP:
            return _TOP[name]
        m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m and m.group(2) in self.layer_map(cfg, int(m.group(1)), kind):
            return f"model.layers.{m.group(1)}.{self.layer_map(cfg, int(m.group(1)), kind)[m.group(2)]}.{m.group(3)}"
        raise ConvertError(f"tensor '{name}' has no Hugging Face equivalent in {kind}")

    # ------------------------------------------------------------ export

    def to_hf_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind = target(cfg)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name == "output.weight" and cfg.tie_embeddings or name.endswith("router.expert_load"):
                continue
            m = re.match(r"^layers\.(\d+)\.mlp\.experts\.(gate|up|down)\.(weight|bias)$", name)
            if m:
                out.update(self._experts_out(kind, m.group(1), m.group(2), m.group(3), t))
            elif name.endswith("router.expert_bias"):
                out[f"model.layers.{name.split('.')[1]}.mlp.gate.e_score_correction_bias"] = t
            else:
                out[self._rename(cfg, kind, name)] = t
        if kind == "glm4_moe" and cfg.moe.bias_update_rate == 0:    # GLM always has the bias: zeros
            for i in range(cfg.num_layers):
                if moe_layer(cfg, i):
                    out[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = torch.zeros(cfg.moe.num_experts)
        return out

    def _experts_out(self, kind: str, i: str, proj: str, suffix: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if kind == REMOTE_TYPE:                        # stacked: experts.gate_proj, experts.gate_proj_bias
            return {f"model.layers.{i}.mlp.experts.{proj}_proj{'_bias' if suffix == 'bias' else ''}": t}
        if kind == "mixtral":
            return {f"model.layers.{i}.block_sparse_moe.experts.{j}.{_EXPERT_NAMES[kind][_PROJ.index(proj)]}"
                    f".{suffix}": t[j].contiguous() for j in range(t.shape[0])}
        return {f"model.layers.{i}.mlp.experts.{j}.{_EXPERT_NAMES[kind][_PROJ.index(proj)]}.{suffix}":
                t[j].contiguous() for j in range(t.shape[0])}

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        kind, m = target(cfg), cfg.moe
        base = {**llama_config_fields(cfg), "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
                "torch_dtype": dtype_name, "dtype": dtype_name, "output_router_logits": False,
                REMOTE_TYPE: {**{k: getattr(m, k) for k in TRAINING_FIELDS}, "ffn_hidden_size": cfg.ffn_hidden_size}}
        for key in ("rope_scaling",) if base["rope_scaling"] is None else ():
            base.pop(key)
        if kind == "mixtral":
            return {**base, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                    "intermediate_size": m.ffn(cfg), "num_local_experts": m.num_experts,
                    "num_experts_per_tok": m.top_k, "sliding_window": None, "router_jitter_noise": 0.0,
                    "router_aux_loss_coef": m.aux_loss_coeff}
        if kind == "glm4_moe":
            rope = dict(base["rope_parameters"], partial_rotary_factor=1.0)
            return {**base, "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
                    "rope_parameters": rope, "partial_rotary_factor": 1.0, "moe_intermediate_size": m.ffn(cfg),
                    "n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k,
                    "n_shared_experts": m.shared_experts, "first_k_dense_replace": m.first_dense,
                    "routed_scaling_factor": m.route_scale, "norm_topk_prob": m.normalize_top_k,
                    "n_group": 1, "topk_group": 1, "use_qk_norm": False, "num_nextn_predict_layers": 0}
        return {**base, **REMOTE.composition_fields(cfg)}

    def remote_code(self, cfg) -> dict[str, str]:
        """``{modeling_polytron_moe.py: source}`` when the config has no native class, else ``{}``."""
        return REMOTE.remote_code(cfg) if target(cfg) == REMOTE_TYPE else {}

    # ------------------------------------------------------------ import

    def from_hf_config(self, hf: dict, file: str):
        from polytron.model.config import ModelConfig
        from polytron.model.configlib import ConfigError
        from polytron.model.moe.config import MoEConfig
        kind = hf.get("model_type")
        routed = () if kind == REMOTE_TYPE else ("num_experts_per_tok",)
        require_fields(hf, file, _MUST_BE, ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads", *routed))
        moe = MoEConfig(**_moe_fields(hf, file, kind))
        composed = REMOTE.composition_from_hf({"mlp_kind": "moe", **hf}, file) if kind == REMOTE_TYPE else {}
        composed.update(moe=moe, mlp=composed.get("mlp", "moe"))
        fields = llama_model_fields(hf, file)
        if kind == "mixtral":            # no dense layer: our dense width travels in polytron_moe
            ours = hf.get(REMOTE_TYPE) or {}
            fields["ffn_hidden_size"] = int(ours.get("ffn_hidden_size", fields["ffn_hidden_size"]))
        try:
            cfg = ModelConfig(arch="moe", **fields, **composed)
            cfg.validate()
        except (ValueError, ConfigError, TypeError) as e:
            raise ConvertError(f"{file}: {e}") from None
        return cfg

    def from_hf_tensors(self, cfg, hf: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
        """Our tensors from a Mixtral / GLM-4-MoE / polytron_moe directory; every name and shape checked."""
        from polytron.model.transformer import param_shapes
        kind = target(cfg)
        expected = param_shapes(cfg)
        ours: dict[str, torch.Tensor] = {}
        stacks: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
        for name, t in hf.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if not self._expert_in(kind, name, t, ours, stacks):
                ours[self._from_name(cfg, kind, name)] = t
        for (i, proj, suffix), parts in stacks.items():
            if sorted(parts) != list(range(cfg.moe.num_experts)):
                missing = sorted(set(range(cfg.moe.num_experts)) - set(parts))
                raise ConvertError(f"{src}: layer {i} has no tensor for expert {missing[0] if missing else '?'} "
                                   f"({proj}); config.json implies {cfg.moe.num_experts} experts")
            ours[f"layers.{i}.mlp.experts.{proj}.{suffix}"] = torch.stack([parts[j] for j in range(len(parts))])
        self._bias_in(cfg, ours, src)
        if cfg.tie_embeddings and "tok_embeddings.weight" in ours:
            ours["output.weight"] = ours["tok_embeddings.weight"]
        return _checked(ours, expected, src)

    def _from_name(self, cfg, kind: str, name: str) -> str:
        for ours, theirs in _TOP.items():
            if name == theirs:
                return ours
        m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias|e_score_correction_bias)$", name)
        if m:
            i = int(m.group(1))
            if m.group(3) == "e_score_correction_bias":
                return f"layers.{i}.mlp.router.expert_bias"
            for ours, theirs in self.layer_map(cfg, i, kind).items():
                if m.group(2) == theirs:
                    return f"layers.{i}.{ours}.{m.group(3)}"
        raise ConvertError(f"tensor '{name}' is not part of a model this converter supports")

    def _expert_in(self, kind: str, name: str, t: torch.Tensor, ours: dict, stacks: dict) -> bool:
        """Collect a routed-expert tensor (per expert, fused, or stacked); False if ``name`` is none."""
        m = re.match(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.(weight|bias)$", name)
        if m and kind in _EXPERT_NAMES and m.group(3) in _EXPERT_NAMES[kind]:
            proj = _PROJ[_EXPERT_NAMES[kind].index(m.group(3))]
            stacks.setdefault((int(m.group(1)), proj, m.group(4)), {})[int(m.group(2))] = t
            return True
        m = re.match(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj|"
                     r"gate_proj|up_proj)(_bias)?$", name)          # fused, or stacked (polytron_moe)
        if not m:
            return False
        i, what = int(m.group(1)), m.group(2)
        suffix = "bias" if m.group(3) else "weight"
        if what == "gate_up_proj":                                     # fused (E, 2f, d)
            gate, up = t.chunk(2, dim=1)
            ours[f"layers.{i}.mlp.experts.gate.{suffix}"], ours[f"layers.{i}.mlp.experts.up.{suffix}"] = gate, up
        else:
            ours[f"layers.{i}.mlp.experts.{what[:-5]}.{suffix}"] = t
        return True

    def _bias_in(self, cfg, ours: dict, src: str) -> None:
        """The balancing bias: kept with ``bias_update_rate > 0`` (its load counter starts at
        zero); without it, a file's all-zero bias is dropped and any other is refused."""
        for i in range(cfg.num_layers):
            name = f"layers.{i}.mlp.router.expert_bias"
            if name not in ours:
                continue
            if cfg.moe.bias_update_rate > 0:
                ours[f"layers.{i}.mlp.router.expert_load"] = torch.zeros(cfg.moe.num_experts)
            elif not bool((ours[name] == 0).all()):
                raise ConvertError(f"{src}: layer {i} has a non-zero e_score_correction_bias but "
                                   "polytron_moe.bias_update_rate is 0 in config.json")
            else:
                del ours[name]


def _moe_fields(hf: dict, file: str, kind: Optional[str]) -> dict:
    """Our MoEConfig fields from a Mixtral / GLM-4-MoE / polytron_moe config.json."""
    extra = dict(hf.get(REMOTE_TYPE) or {})
    training = {k: extra[k] for k in TRAINING_FIELDS if k in extra}
    if kind == "mixtral":
        training.setdefault("aux_loss_coeff", float(hf.get("router_aux_loss_coef", 0.01)))
        return {"num_experts": _int(hf, "num_local_experts", file), "top_k": hf["num_experts_per_tok"],
                "expert_ffn_hidden_size": hf["intermediate_size"], **training}
    if kind == "glm4_moe":
        rope = hf.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        if factor != 1.0:
            raise ConvertError(f"{file}: field 'partial_rotary_factor'={factor!r} is not supported (must be 1.0)")
        if hf.get("attention_bias"):
            raise ConvertError(f"{file}: field 'attention_bias'=True is not supported (q/k/v biases "
                               "without an o bias)")
        if hf.get("n_group", 1) != hf.get("topk_group", 1):
            raise ConvertError(f"{file}: field 'topk_group'={hf.get('topk_group')!r} is not supported "
                               f"(group-limited routing: must equal n_group={hf.get('n_group')!r})")
        training.setdefault("bias_update_rate", 1e-3)        # the correction bias exists: keep it trained
        return {"num_experts": _int(hf, "n_routed_experts", file), "top_k": hf["num_experts_per_tok"],
                "expert_ffn_hidden_size": _int(hf, "moe_intermediate_size", file),
                "shared_experts": int(hf.get("n_shared_experts") or 0), "score": "sigmoid",
                "normalize_top_k": bool(hf.get("norm_topk_prob", True)),
                "route_scale": float(hf.get("routed_scaling_factor", 1.0)),
                "first_dense": int(hf.get("first_k_dense_replace", 0)), **training}
    moe = dict(hf.get("moe") or {})
    if not moe:
        raise ConvertError(f"{file}: field 'moe' is missing")
    return {**{k: moe[k] for k in ROUTING_FIELDS if k in moe}, **training}


def _int(hf: dict, key: str, file: str) -> int:
    if not isinstance(hf.get(key), int):
        raise ConvertError(f"{file}: field '{key}' is missing or not an integer")
    return hf[key]


def _checked(ours: dict, expected: dict, src: str) -> dict[str, torch.Tensor]:
    check_param_shapes(ours, expected, src, lambda name: f"for '{name}'", "config.json")
    extra = [n for n in ours if n not in expected]
    if extra:
        raise ConvertError(f"{src}: tensor for '{extra[0]}' does not fit the config")
    return {k: ours[k].float().contiguous() for k in expected}
