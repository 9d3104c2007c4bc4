"""The remote-code Hugging Face export, assembled from the layer kinds a model uses.

transformers ships no class for most compositions (YOCO, DHA, MH-MoE, BitLinear experts
in any of them), so ``to-hf`` writes one self-contained modeling file (imports only
torch and transformers) beside the weights, ``config.json``'s ``auto_map`` naming it.
That file is *assembled*, not kept by hand per architecture:

* **pieces**: a piece is a ``# piece: <name>`` section of a Python file; a section
  defines the classes of one layer kind and adds them to the file's registries
  (``ATTENTIONS``, ``MLPS``, ``LINEARS``). The shared ones (RMSNorm, RoPE, attention,
  GQA, SwiGLU, the Llama-style stack with a KV cache) are in :mod:`model.hf_remote.pieces`;
  an architecture keeps its own in its folder (``model/dha/modeling_dha.py``,
  ``model/moe/modeling_polytron_moe.py``, ``model/yoco/hf_modeling.py``,
  ``model/bitnet/modeling_bitnet.py``).
* :func:`register_piece` ``(slot, kind, *pieces)``: which pieces a kind of a slot
  (``linear``, ``attention``, ``mlp``, ``stack``) needs; :func:`register_fields`
  ``(kind, writer, reader)``: the ``config.json`` fields of a kind (e.g. ``moe``) and how
  ``from-hf`` reads them back into ModelConfig settings.
* :func:`assemble` writes the file: one import header, the pieces the kinds need (each
  once, in registration order), and the family's class names (``DHALlamaForCausalLM``,
  ``PolytronYOCOForCausalLM``, ...) as subclasses of the stack's classes.
* :class:`RemoteAdapter`: the tensor half for every composition: a name rule per module
  (``attention.wq`` -> ``self_attn.q_proj``, stacked experts -> ``mlp.experts.gate_proj``,
  ...) applied to the model's own parameter list, so a new layer kind needs a rule only
  where its module names are new; and the shared ``config.json`` composition fields
  (``layer_attention``, ``layer_mlp``, ``linear_kind``, ``quantized_roles``).

Nothing here imports an architecture folder: architectures register into these tables.
"""
from __future__ import annotations

import abc
import ast
import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from polytron.model.hf import ConvertError, check_param_shapes

BASE = "polytron.model.hf_remote.pieces"
#: (slot, kind) -> the pieces ("module:section") that kind needs, in order.
PIECES: dict[tuple[str, str], tuple[str, ...]] = {
    ("linear", "linear"): (),
    ("attention", "gqa"): (f"{BASE}:gqa",),
    ("mlp", "swiglu"): (f"{BASE}:swiglu",),
    ("stack", "llama"): (f"{BASE}:llama_stack",),
}
#: kind -> (writer(cfg) -> config.json fields, reader(hf, file) -> ModelConfig keyword arguments).
FIELDS: dict[str, tuple[Callable[[Any], dict], Callable[[dict, str], dict]]] = {}
#: Modules of the assembled file's header: the only imports it has.
HEADER = '''from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
'''
ALLOWED_IMPORTS = ("__future__", "math", "typing", "torch", "transformers")


def register_piece(slot: str, kind: str, *pieces: str) -> None:
    """Declare the pieces (``"module:section"``) the ``kind`` of ``slot`` needs."""
    PIECES[(slot, kind)] = tuple(pieces)


def register_fields(kind: str, writer: Callable[[Any], dict], reader: Callable[[dict, str], dict]) -> None:
    """Declare the ``config.json`` fields of a kind and how ``from-hf`` reads them back."""
    FIELDS[kind] = (writer, reader)


# ---------------------------------------------------------------- assembling the file

def piece_source(ref: str) -> str:
    """The text of section ``name`` of ``module`` (``ref`` is ``"module:name"``)."""
    module, _, name = ref.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConvertError(f"remote-code piece {ref!r}: module {module!r} not found")
    with open(spec.origin, encoding="utf-8") as f:
        parts = re.split(r"^# piece: (\S+)\n", f.read(), flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2]))
    if name not in sections:
        raise ConvertError(f"remote-code piece {ref!r}: no '# piece: {name}' section in {spec.origin}")
    return sections[name].strip("\n") + "\n"


@dataclass(frozen=True)
class Family:
    """Names of one export family: its ``model_type``, file and classes."""
    model_type: str                 # config.json "model_type"
    file: str                       # the modeling file's name in the export
    config_class: str               # e.g. "DHALlamaConfig"
    model_class: str                # e.g. "DHALlamaForCausalLM"
    stack: str = "llama"            # the skeleton: "llama" (KV cache) or an architecture's own

    def auto_map(self) -> dict[str, str]:
        module = self.file[:-3]
        return {"AutoConfig": f"{module}.{self.config_class}",
                "AutoModelForCausalLM": f"{module}.{self.model_class}"}


_STACK_CLASSES = {"llama": ("LlamaStackConfig", "LlamaStackForCausalLM"),
                  "yoco": ("YOCOStackConfig", "YOCOStackForCausalLM")}


def missing_kind(kinds: dict[str, list[str]]) -> str:
    """Why these kinds cannot be assembled ('' when every kind has pieces)."""
    for slot, names in kinds.items():
        for kind in names:
            if (slot, kind) not in PIECES:
                have = sorted(k for s, k in PIECES if s == slot)
                return (f"{slot}={kind} has no Hugging Face remote-code piece (pieces exist for "
                        f"{slot} {', '.join(have)}; see model/hf_remote)")
    return ""


def assemble(family: Family, kinds: dict[str, list[str]]) -> str:
    """The modeling file of ``family`` for ``kinds`` (slot -> kinds used, e.g. ``{"mlp": ["moe"]}``)."""
    refs: list[str] = [f"{BASE}:base"]
    for slot in ("linear", "attention", "mlp", "stack"):
        for kind in kinds.get(slot, []):
            refs += [r for r in PIECES[(slot, kind)] if r not in refs]
    config_base, model_base = _STACK_CLASSES[family.stack]
    doc = (f'"""{family.model_class} for Hugging Face transformers (trust_remote_code), written by '
           f"polytron's to-hf.\n\nAssembled from the pieces of its layer kinds: "
           + "; ".join(f"{s} {', '.join(k)}" for s, k in kinds.items() if k)
           + '.\nImports only torch and transformers.\n"""\n')
    body = "\n\n".join(f"# ---------------------------------------------------------------- {r.split(':')[1]}\n\n"
                       + piece_source(r) for r in refs)
    trailer = (f"\n\nclass {family.config_class}({config_base}):\n    model_type = {family.model_type!r}\n\n\n"
               f"class {family.model_class}({model_base}):\n    config_class = {family.config_class}\n")
    text = doc + HEADER + "\n\n" + body + trailer
    check_self_contained(text)
    return text


def check_self_contained(text: str) -> None:
    """Raise unless ``text`` parses and imports nothing but torch, transformers and the stdlib it needs."""
    for node in ast.walk(ast.parse(text)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            if name.split(".")[0] not in ALLOWED_IMPORTS:
                raise AssertionError(f"the assembled modeling file imports {name!r}")


# ---------------------------------------------------------------- tensor names

_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
        "shared_kv.norm": "model.kv_layer.norm", "shared_kv.proj.wk": "model.kv_layer.k_proj",
        "shared_kv.proj.wv": "model.kv_layer.v_proj"}
#: Our module path inside ``layers.<i>.`` -> the HF path ("@" is the attention module's name).
_INNER = {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
          "attention.wq": "@.q_proj", "attention.wk": "@.k_proj", "attention.wv": "@.v_proj",
          "attention.wo": "@.o_proj", "attention.wg": "@.g_proj", "attention.wgt": "@.gt_proj",
          "attention.sub_norm": "@.attn_sub_norm",
          "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
          "mlp.sub_norm": "mlp.ffn_sub_norm", "mlp.shared.w1": "mlp.shared_experts.gate_proj",
          "mlp.shared.w3": "mlp.shared_experts.up_proj", "mlp.shared.w2": "mlp.shared_experts.down_proj",
          "mlp.router": "mlp.gate", "mlp.split": "mlp.split", "mlp.merge": "mlp.merge"}
_EXPERTS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_LEAF = {"weight": "weight", "bias": "bias", "expert_bias": "e_score_correction_bias"}
#: Our tensors that are training state only: not exported, re-created as zeros on import.
TRAINING_ONLY = ("router.expert_load",)


class RemoteAdapter:
    """Remote-code export of a composition; subclasses give the family and its config fields."""
    family: Family
    model_types: tuple[str, ...] = ()

    # ------------------------------------------------------------ kinds and file

    def kinds(self, cfg) -> dict[str, list[str]]:
        """slot -> the kinds ``cfg`` uses (each once), for assembling the file."""
        per = self.layer_kinds(cfg)
        return {"linear": [cfg.linear], "attention": _unique(a for a, _ in per),
                "mlp": _unique(m for _, m in per), "stack": [self.family.stack]}

    def layer_kinds(self, cfg) -> list[tuple[str, str]]:
        """(attention kind, MLP kind) of every layer."""
        from polytron.model.layers import layer_attention, layer_mlp
        return [(layer_attention(cfg, i), layer_mlp(cfg, i)) for i in range(cfg.num_layers)]

    def exportable(self, cfg) -> str:
        """Why ``cfg`` has no export ('' when it has one)."""
        return missing_kind(self.kinds(cfg))

    def remote_code(self, cfg) -> dict[str, str]:
        """``{file name: source}`` of the assembled modeling file."""
        return {self.family.file: assemble(self.family, self.kinds(cfg))}

    # ------------------------------------------------------------ config.json

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        raise NotImplementedError(f"{type(self).__name__} writes no config.json of its own")

    def from_hf_config(self, hf: dict, file: str):
        raise NotImplementedError(f"{type(self).__name__} reads no config.json of its own")

    def composition_fields(self, cfg) -> dict:
        """The fields the assembled file reads besides the family's own: kinds per layer, the
        linear kind and its quantized roles, and every used kind's registered fields."""
        per = self.layer_kinds(cfg)
        out = {"architectures": [self.family.model_class], "model_type": self.family.model_type,
               "auto_map": self.family.auto_map(), "layer_attention": [a for a, _ in per],
               "layer_mlp": [m for _, m in per], "attention_kind": cfg.attention, "mlp_kind": cfg.mlp,
               "linear_kind": cfg.linear}
        for kind in _unique([cfg.linear, cfg.attention, *(m for _, m in per)]):
            if kind in FIELDS:
                out.update(FIELDS[kind][0](cfg))
        return out

    def composition_from_hf(self, hf: dict, file: str, attention: bool = False) -> dict:
        """ModelConfig keyword arguments of the composition fields (absent: swiglu + linear);
        with ``attention`` also the attention kind (absent: gqa) and its fields."""
        out = {"mlp": hf.get("mlp_kind", "swiglu"), "linear": hf.get("linear_kind", "linear")}
        if attention:
            out["attention"] = hf.get("attention_kind", "gqa")
        for kind in _unique([out["linear"], out.get("attention"), out["mlp"]]):
            if kind in FIELDS:
                out.update(FIELDS[kind][1](hf, file))
        return out

    # ------------------------------------------------------------ tensors

    def attention_module(self, cfg, index: int) -> str:
        """The HF name of layer ``index``'s attention module."""
        return "self_attn"

    def to_hf_name(self, cfg, name: str) -> str:
        path, _, leaf = name.rpartition(".")
        if path in _TOP and leaf in _LEAF:
            return f"{_TOP[path]}.{_LEAF[leaf]}"
        m = re.match(r"^layers\.(\d+)\.(.+)$", path)
        if m and leaf in _LEAF:
            i, inner = int(m.group(1)), m.group(2)
            if inner.startswith("mlp.experts.") and inner[len("mlp.experts."):] in _EXPERTS:
                proj = _EXPERTS[inner[len("mlp.experts."):]]
                return f"model.layers.{i}.mlp.experts.{proj}{'_bias' if leaf == 'bias' else ''}"
            if inner in _INNER:
                hf = _INNER[inner].replace("@", self.attention_module(cfg, i))
                return f"model.layers.{i}.{hf}.{_LEAF[leaf]}"
        raise ConvertError(f"tensor '{name}' has no Hugging Face equivalent in {self.family.model_type}")

    def hf_names(self, cfg) -> dict[str, str]:
        """Our name -> HF name of every exported tensor (tied and training-only ones left out)."""
        from polytron.model.transformer import param_shapes
        dropped = {name for name, _ in self.tied(cfg)}
        return {n: self.to_hf_name(cfg, n) for n in param_shapes(cfg)
                if n not in dropped and not n.endswith(TRAINING_ONLY)}

    def tied(self, cfg) -> list[tuple[str, str]]:
        return [("output.weight", "tok_embeddings.weight")] if cfg.tie_embeddings else []

    def to_hf_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = self.hf_names(cfg)
        return {names[k]: v for k, v in tensors.items() if k in names}

    def from_hf_tensors(self, cfg, hf: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
        """Our tensors, every name and shape checked (a distinct head unties, as transformers does)."""
        from polytron.model.transformer import param_shapes
        head = hf.get("lm_head.weight")
        if cfg.tie_embeddings and head is not None and not torch.equal(head, hf.get("model.embed_tokens.weight",
                                                                                  torch.empty(0))):
            cfg.tie_embeddings = False
        inverse = {v: k for k, v in self.hf_names(cfg).items()}
        ours: dict[str, torch.Tensor] = {}
        for name, t in hf.items():
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
                continue
            if name not in inverse:
                raise ConvertError(f"{src}: tensor '{name}' does not fit the config")
            ours[inverse[name]] = t
        expected = param_shapes(cfg)
        for name, source in self.tied(cfg):
            if source in ours:
                ours[name] = ours[source]
        for name, shape in expected.items():
            if name.endswith(TRAINING_ONLY):
                ours[name] = torch.zeros(shape)
        check_param_shapes(ours, expected, src, lambda name: f"'{self.to_hf_name(cfg, name)}'", "config.json")
        return {k: ours[k].float().contiguous() for k in expected}



class RemoteFallback(abc.ABC):
    """An adapter whose native transformers class (``LlamaForCausalLM``, ``BitNetForCausalLM``)
    computes only some configs: the others export to the assembled remote-code family
    ``remote``, and ``from-hf`` reads that family's ``model_type`` back.

    The subclass gives ``native_misfit`` (why the native class does not fit, '' when it does)
    and the ``native_*`` halves; this class dispatches every adapter method on them."""
    remote: RemoteAdapter

    @abc.abstractmethod
    def native_misfit(self, cfg) -> str:
        """Why the native class does not compute ``cfg`` ('' when it does)."""

    @abc.abstractmethod
    def native_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        """The native class's ``config.json``."""

    @abc.abstractmethod
    def native_from_config(self, hf: dict, file: str):
        """Our ModelConfig from the native class's ``config.json``."""

    @abc.abstractmethod
    def native_to_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our tensors under the native class's names."""

    @abc.abstractmethod
    def native_from_tensors(self, cfg, hf: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
        """Our tensors from the native class's names, checked."""

    def uses_remote(self, cfg) -> bool:
        return bool(self.native_misfit(cfg))

    def exportable(self, cfg) -> str:
        """Why ``cfg`` has no export ('' when the native class or the remote family has one)."""
        return self.remote.exportable(cfg) if self.uses_remote(cfg) else ""

    def to_hf_config(self, cfg, bos_id, eos_id, dtype_name: str) -> dict:
        if self.uses_remote(cfg):
            return self.remote.to_hf_config(cfg, bos_id, eos_id, dtype_name)
        return self.native_config(cfg, bos_id, eos_id, dtype_name)

    def remote_code(self, cfg) -> dict[str, str]:
        """The assembled modeling file when ``cfg`` needs the remote family, else ``{}``."""
        return self.remote.remote_code(cfg) if self.uses_remote(cfg) else {}

    def from_hf_config(self, hf: dict, file: str):
        if hf.get("model_type") in self.remote.model_types:
            return self.remote.from_hf_config(hf, file)
        return self.native_from_config(hf, file)

    def to_hf_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.uses_remote(cfg):
            return self.remote.to_hf_tensors(cfg, tensors)
        return self.native_to_tensors(cfg, tensors)

    def from_hf_tensors(self, cfg, hf: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
        if self.uses_remote(cfg):
            return self.remote.from_hf_tensors(cfg, hf, src)
        return self.native_from_tensors(cfg, hf, src)


def _unique(items) -> list:
    out: list = []
    for x in items:
        if x not in out and x is not None:
            out.append(x)
    return out
