"""The released YOCO code's checkpoints (``microsoft/unilm``, ``YOCO/``) in our names.

The released model (``yoco/models/decoder/yoco.py``, class ``YOCO``) is built from
``params.json`` (its ``YOCOArgs``) and loads ``checkpoint.pth``, a plain state dict of
that module (``torch.load`` + ``load_state_dict``; ``--yoco-model DIR --load-ckpt
DIR/checkpoint.pth``). Its tensors, for n = ``n_layers`` and S = n // 2 layers in each
decoder (all projections bias-free)::

    embed_tokens.weight                           tok_embeddings.weight        (x sqrt(dim) in both)
    self_decoder.layers.i.mixer_layer_norm        layers.i.attention_norm
    self_decoder.layers.i.mixer.{q,k,v,out}_proj  layers.i.attention.{wq,wk,wv,wo}
                           (retention also) g_proj, gt_proj   wg, wgt
    self_decoder.layers.i.final_layer_norm        layers.i.mlp_norm
    *.ffn.fc1 / .gate / .fc2                      *.mlp.w1 / .w3 / .w2   (fc2(silu(fc1 x) * gate x))
    cross_decoder.kv_layer_norm, .k_proj, .v_proj shared_kv.norm, .proj.wk, .proj.wv
    cross_decoder.layers.j.mixer.{q,out}_proj     layers.{S+j}.attention.{wq,wo}
    layer_norm, output_projection                 norm, output

The self-decoder is gated retention unless ``sliding_window`` is set (then multi-head
sliding-window attention of that many keys). RoPE: interleaved pairs and frequencies
``theta ** -linspace(0, 1, hd/2)``, so the model config takes ``rope_frequencies:
released`` and either ``rope_pairing: interleaved`` (weights as they are) or
``rotate_half`` (query/key rows permuted by :func:`model.yoco.rope.convert_pairing`).
Anything the map does not cover is refused with one :class:`ConvertError` line.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch

from polytron.model.hf import ConvertError

#: YOCOArgs fields that shape the model (params.json must give those without a default).
REQUIRED = ("dim", "n_layers", "hidden_dim", "n_self_heads", "n_attn_heads", "n_attn_kv_heads", "vocab_size")
#: YOCOArgs fields with defaults there: RoPE base, norm epsilon, the window (None: retention).
OPTIONAL: dict[str, Any] = {"rope_theta": 10000.0, "norm_eps": 1e-5, "sliding_window": None, "max_seq_len": -1}
#: YOCOArgs fields the released loader overwrites from its command line (run settings, not the model).
RUNTIME = ("max_batch_size", "model_parallel_size", "load_checkpoint")
#: The released retention's hard-coded chunk and decay normalizer (gate_retention.py).
RELEASED_CHUNK, RELEASED_TAU = 256, 16.0
#: Our max_seq_len when params.json leaves it at -1 (the released DEFAULT_MAX_TARGET_POSITIONS).
DEFAULT_MAX_SEQ_LEN = 4096

#: Prefixes a saved state dict may carry around the ``YOCO`` module (fairseq's
#: LanguageModel.decoder (YOCOModel).model, or YOCOModel.model).
WRAPPERS = ("decoder.model.", "model.")

_LAYER_PARTS = {"attention_norm": "mixer_layer_norm", "mlp_norm": "final_layer_norm",
                "attention.wq": "mixer.q_proj", "attention.wk": "mixer.k_proj", "attention.wv": "mixer.v_proj",
                "attention.wo": "mixer.out_proj", "attention.wg": "mixer.g_proj", "attention.wgt": "mixer.gt_proj",
                "mlp.w1": "ffn.fc1", "mlp.w3": "ffn.gate", "mlp.w2": "ffn.fc2"}
_WHOLE = {"tok_embeddings.weight": "embed_tokens.weight", "output.weight": "output_projection.weight",
          "norm.weight": "layer_norm.weight", "shared_kv.norm.weight": "cross_decoder.kv_layer_norm.weight",
          "shared_kv.proj.wk.weight": "cross_decoder.k_proj.weight",
          "shared_kv.proj.wv.weight": "cross_decoder.v_proj.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")


def _int(params: dict, key: str, file: str) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConvertError(f"{file}: {key}={value!r} is not a positive integer")
    return value


def model_config(params: Any, file: str, pairing: str = "interleaved"):
    """Our ModelConfig (validated) for the released ``YOCOArgs`` in ``params`` (params.json)."""
    from polytron.model.config import ModelConfig
    from polytron.model.configlib import ConfigError, from_dict
    if not isinstance(params, dict):
        raise ConvertError(f"{file}: not a JSON object of YOCOArgs fields")
    unknown = sorted(set(params) - set(REQUIRED) - set(OPTIONAL) - set(RUNTIME))
    if unknown:
        raise ConvertError(f"{file}: YOCOArgs field(s) {', '.join(unknown)} not known to the converter "
                           f"(the released YOCOArgs has {', '.join(REQUIRED + tuple(OPTIONAL) + RUNTIME)})")
    missing = [k for k in REQUIRED if params.get(k) is None]
    if missing:
        raise ConvertError(f"{file}: missing {', '.join(missing)} (the released YOCOArgs requires them)")
    dim, n, heads, self_heads, kv = (_int(params, k, file) for k in
                                     ("dim", "n_layers", "n_attn_heads", "n_self_heads", "n_attn_kv_heads"))
    if self_heads != heads:
        raise ConvertError(f"{file}: n_self_heads={self_heads} differs from n_attn_heads={heads}: the released "
                           f"decoders then have heads of different widths, model.arch=yoco has one head_dim")
    if dim % heads or (dim // heads) % 2:
        raise ConvertError(f"{file}: dim={dim} over n_attn_heads={heads} is not an even head width")
    if n < 2:
        raise ConvertError(f"{file}: n_layers={n}: the released model needs at least 2 (n_layers // 2 per decoder)")
    opt: dict[str, Any] = {k: default if params.get(k) is None else params[k] for k, default in OPTIONAL.items()}
    window = opt["sliding_window"]
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConvertError(f"{file}: sliding_window={window!r} is not a window length (a positive integer, "
                           f"or null for gated retention)")
    if not isinstance(opt["max_seq_len"], int) or isinstance(opt["max_seq_len"], bool):
        raise ConvertError(f"{file}: max_seq_len={opt['max_seq_len']!r} is not an integer")
    for key in ("rope_theta", "norm_eps"):
        value = opt[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConvertError(f"{file}: {key}={value!r} is not a positive number")
    yoco = dict(self_layers=n // 2, gate_logit_normalizer=RELEASED_TAU, rope_pairing=pairing,
                rope_frequencies="released")
    if window is None:
        yoco.update(self_decoder="retention", retention_chunk=RELEASED_CHUNK)
    else:
        yoco.update(self_decoder="swa", sliding_window=window, self_kv_heads=heads)   # released SWA is MHA
    fields = dict(arch="yoco", vocab_size=_int(params, "vocab_size", file), hidden_size=dim,
                  num_layers=2 * (n // 2), num_heads=heads, num_kv_heads=kv,
                  ffn_hidden_size=_int(params, "hidden_dim", file),
                  max_seq_len=opt["max_seq_len"] if opt["max_seq_len"] > 0 else DEFAULT_MAX_SEQ_LEN,
                  rope_theta=float(opt["rope_theta"]), norm_eps=float(opt["norm_eps"]),
                  tie_embeddings=False, mlp="swiglu", linear="linear", yoco=yoco)
    try:
        cfg = from_dict(ModelConfig, fields, prefix="model.")
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise ConvertError(f"{file}: {str(e).splitlines()[0]}") from None
    return cfg


def released_name(cfg, ours: str) -> str:
    """The released state-dict name of our tensor ``ours`` of YOCO model ``cfg``."""
    if ours in _WHOLE:
        return _WHOLE[ours]
    m = _LAYER.match(ours)
    part = _LAYER_PARTS.get(m.group(2)) if m else None
    if m is None or part is None:
        raise ConvertError(f"tensor {ours}: no released YOCO equivalent")
    i, S = int(m.group(1)), cfg.yoco.num_self_layers(cfg)
    where = f"self_decoder.layers.{i}" if i < S else f"cross_decoder.layers.{i - S}"
    return f"{where}.{part}.weight"


def unwrap(tensors: dict, origin: str) -> dict[str, torch.Tensor]:
    """The ``YOCO`` module's state dict out of what was saved: itself, ``{"model": ...}``
    (fairseq's checkpoint layout), or either with a wrapper prefix (:data:`WRAPPERS`)."""
    if "model" in tensors and isinstance(tensors["model"], dict):
        tensors = tensors["model"]
    for prefix in WRAPPERS:
        if tensors and all(isinstance(k, str) and k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            break
    bad = next((k for k, v in tensors.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConvertError(f"{origin}: entry {bad!r} is not a tensor (expected the YOCO module's state dict)")
    return tensors


def from_released(cfg, tensors: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Released state dict -> our tensors for ``cfg`` (from :func:`model_config`): every
    tensor renamed and shape-checked, none left over; q/k rows permuted when ``cfg``
    rotates in ``rotate_half`` pairs."""
    from polytron.model.transformer import param_shapes
    from polytron.model.yoco.rope import convert_pairing
    shapes = param_shapes(cfg)
    names = {released_name(cfg, ours): ours for ours in shapes}
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise ConvertError(f"{origin}: tensor {extra[0]} has no place in the YOCO model its params describe"
                           + (f" ({len(extra)} such)" if len(extra) > 1 else ""))
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in names.items():
        t = tensors.get(theirs)
        if t is None:
            raise ConvertError(f"{origin}: tensor {theirs} is missing (the params describe a model that has it)")
        if tuple(t.shape) != shapes[ours]:
            raise ConvertError(f"{origin}: tensor {theirs} has shape {tuple(t.shape)}, the params give "
                               f"{shapes[ours]} (a model-parallel shard, or params.json of another model?)")
        if not t.is_floating_point():
            raise ConvertError(f"{origin}: tensor {theirs} has dtype {t.dtype}, not floating point")
        out[ours] = t.detach().clone()       # own storage: a tied head saved twice becomes two tensors
    if cfg.yoco.rope_pairing != "interleaved":
        as_saved = copy.deepcopy(cfg)                           # the weights' own pairing
        as_saved.yoco.rope_pairing = "interleaved"
        out = convert_pairing(out, as_saved, cfg.yoco.rope_pairing)
    return out
