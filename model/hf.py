"""Hugging Face adapters: each architecture's bridge to a transformers model directory.

An adapter (one per spec, in the architecture's folder) answers four questions:

* ``to_hf_config(cfg, bos_id, eos_id, dtype_name)`` -> ``config.json`` contents;
* ``to_hf_tensors(cfg, tensors)`` -> our full tensors under transformers' names
  (reshaped where the layouts differ);
* ``from_hf_config(hf, file)`` -> our ModelConfig (unsupported fields named);
* ``from_hf_tensors(cfg, hf_tensors, src)`` -> our tensors, every name and shape checked.

``model_types`` lists the transformers ``model_type`` values ``from-hf`` accepts with
it; ``remote_code`` (optional) returns ``{file name: source}`` of a self-contained
``trust_remote_code`` modeling file for architectures transformers does not ship.
:class:`NameMapAdapter` implements the tensor half for adapters whose mapping is a
rename per tensor.
"""
from __future__ import annotations

import abc
import json
import os
import re
from typing import Callable, Optional

import torch

from polytron.model.errors import PolytronError


class ConvertError(PolytronError, ValueError):
    """Unconvertible input; the message names the file, field or tensor."""


def check_param_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str,
                       label: Callable[[str], str], source: str) -> None:
    """Converted ``tensors`` against ``expected`` (``param_shapes(cfg)`` of
    model/transformer.py): ConvertError in one line for the first one missing or of another
    shape, the tensor named as ``label(name)`` and the expected shape attributed to
    ``source`` (e.g. config.json)."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ConvertError(f"{where}: tensor {label(name)} is missing")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ConvertError(f"{where}: tensor {label(name)} has shape {tuple(tensors[name].shape)}, "
                               f"expected {tuple(shape)} from {source}")


class NameMapAdapter(abc.ABC):
    """Tensor renaming by two tables: whole names, and per-layer suffixes.

    ``top``: our name -> HF name for tensors outside the layers; ``layer``: our
    path inside ``layers.<i>.`` -> HF path inside ``<hf_layers>.<i>.`` (suffixes
    ``.weight`` / ``.bias`` carry over). ``tied``: (our tied name, the name it
    shares storage with), dropped on export when tying is on and restored on import.
    """
    model_types: tuple[str, ...] = ()
    hf_layers = "model.layers"
    remote_code: Optional[Callable] = None

    @abc.abstractmethod
    def top(self, cfg) -> dict[str, str]:
        """Our name -> HF name of the tensors outside the layers."""

    @abc.abstractmethod
    def layer(self, cfg, index: int) -> dict[str, str]:
        """Our path inside ``layers.<index>.`` -> HF path inside ``<hf_layers>.<index>.``."""

    def tied(self, cfg) -> list[tuple[str, str]]:
        return []

    # ------------------------------------------------------------ names

    def to_hf_name(self, cfg, name: str) -> str:
        top = self.top(cfg)
        if name in top:
            return top[name]
        m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            inner = self.layer(cfg, int(m.group(1)))
            if m.group(2) in inner:
                return f"{self.hf_layers}.{m.group(1)}.{inner[m.group(2)]}.{m.group(3)}"
        raise ConvertError(f"tensor '{name}' has no Hugging Face equivalent in {type(self).__name__}")

    def from_hf_name(self, cfg, name: str) -> str:
        for ours, hf in self.top(cfg).items():
            if name == hf:
                return ours
        m = re.match(rf"^{re.escape(self.hf_layers)}\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            for ours, hf in self.layer(cfg, int(m.group(1))).items():
                if m.group(2) == hf:
                    return f"layers.{m.group(1)}.{ours}.{m.group(3)}"
        raise ConvertError(f"tensor '{name}' is not part of a model this converter supports")

    # ------------------------------------------------------------ tensors

    def to_hf_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dropped = {name for name, _ in self.tied(cfg)}
        return {self.to_hf_name(cfg, k): v for k, v in tensors.items() if k not in dropped}

    def from_hf_tensors(self, cfg, hf: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
        """Rename to our names and check against the model's shapes, first mismatch named."""
        from polytron.model.transformer import param_shapes
        ours: dict[str, torch.Tensor] = {}
        for name, t in hf.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            ours[self.from_hf_name(cfg, name)] = t
        untie_distinct(self, cfg, ours)
        expected = param_shapes(cfg)
        for name, source in self.tied(cfg):
            if source in ours:
                ours[name] = ours[source]
        check_param_shapes(ours, expected, src, lambda name: f"'{self.to_hf_name(cfg, name)}'", "config.json")
        extra = [n for n in ours if n not in expected]
        if extra:
            raise ConvertError(f"{src}: tensor '{self.to_hf_name(cfg, extra[0])}' does not fit the config "
                               f"(e.g. a bias with attention_bias=false)")
        return {k: ours[k].float().contiguous() for k in expected}


def untie_distinct(adapter, cfg, ours: dict[str, torch.Tensor]) -> bool:
    """Do what transformers does with ``tie_word_embeddings: true`` when the directory also
    holds a head that differs from the embedding: keep both, untied (``cfg.tie_embeddings``
    becomes False). Returns True when it untied. A head equal to the embedding stays tied."""
    for name, source in adapter.tied(cfg):
        a, b = ours.get(name), ours.get(source)
        if a is not None and b is not None and (a.shape != b.shape or not torch.equal(a, b)):
            cfg.tie_embeddings = False
            return True
    return False


def read_hf_config(src: str) -> tuple[dict, str]:
    """(contents, path) of a Hugging Face directory's ``config.json``; anything but a JSON
    object (missing, unreadable, a list) is one ConvertError naming the file."""
    file = os.path.join(src, "config.json")
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: not a directory (a Hugging Face model directory holds config.json)")
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{src}: no config.json (not a Hugging Face model directory)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{file}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConvertError(f"{file}: unreadable ({e.strerror or e})") from None
    if not isinstance(hf, dict):
        raise ConvertError(f"{file}: a JSON {type(hf).__name__}, not an object of model settings")
    return hf, file


def find_adapter(model_type: Optional[str], file: str):
    """The registered adapter that reads Hugging Face ``model_type``."""
    from polytron.model.spec import SPECS, get_spec
    get_spec("llama")                          # makes sure the built-in specs are registered
    for spec in SPECS.values():
        if spec.hf is not None and model_type in spec.hf.model_types:
            return spec.hf
    known = sorted(t for s in SPECS.values() if s.hf is not None for t in s.hf.model_types)
    raise ConvertError(f"{file}: field 'model_type'={model_type!r} is not supported "
                       f"(supported: {', '.join(known)})")


def require_fields(hf: dict, file: str, must_be: dict, ints: tuple[str, ...]) -> None:
    """Fields our model cannot express must have their neutral value; ``ints`` must be integers."""
    for key, want in must_be.items():
        if hf.get(key) not in (want, None):
            raise ConvertError(f"{file}: field '{key}'={hf[key]!r} is not supported "
                               f"(must be {want!r}{' or absent' if want is None else ''})")
    for key in ints:
        if not isinstance(hf.get(key), int):
            raise ConvertError(f"{file}: field '{key}' is missing or not an integer")
