"""Test plugin (``model.plugins=[tests.pretrain.fp8_nan_plugin]``): one chosen training
iteration computes NaN logits.

``POLYTRON_TEST_NAN_AT="<iteration>:<micro-batches per step>"`` (iteration counted from 1,
as the trainer logs it): the head's output becomes NaN in the first training forward of
that iteration, so its loss and gradients are NaN and every other step is untouched.
The llama spec's head unit gets a forward hook when the model is built.
"""
from __future__ import annotations

import os

from polytron.model.spec import get_spec

_SPEC = get_spec("llama")


def _hook(module, args, output):
    if not module.training:
        return output
    module.nan_calls = getattr(module, "nan_calls", 0) + 1
    iteration, per_step = (int(v) for v in os.environ["POLYTRON_TEST_NAN_AT"].split(":"))
    if module.nan_calls == (iteration - 1) * per_step + 1:
        return output * float("nan")
    return output


def _build_unit(cfg, unit, _inner=_SPEC.build_unit):
    module = _inner(cfg, unit)
    if unit.kind == "head" and "POLYTRON_TEST_NAN_AT" in os.environ:
        module.register_forward_hook(_hook)
    return module


if not getattr(_SPEC.build_unit, "nan_plugin", False):
    _build_unit.nan_plugin = True
    _SPEC.build_unit = _build_unit
