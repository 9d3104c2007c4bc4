"""The ``llama`` architecture (the dense decoder of :mod:`model.llama`), registered on import.

It has no config section of its own: its settings are the shared shape fields of
``model`` and its layer slots.
"""
from __future__ import annotations

from polytron.model.llama import build_unit, check_layout, make_cache, tied, units
from polytron.model.llama.hf import LlamaAdapter
from polytron.model.spec import ModelSpec, register_spec

LLAMA = register_spec(ModelSpec(
    name="llama", units=units, build_unit=build_unit, check_layout=check_layout,
    hf=LlamaAdapter(), make_cache=make_cache, tied=tied,
    doc="Dense Llama-style decoder (GQA + SwiGLU by default; slots configurable)."))
