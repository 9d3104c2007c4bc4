"""DHA's parallel registrations: the tensor-parallel role ``tp_local`` (in
:mod:`polytron.parallel.roles`) and the context-parallel form of ``dha`` (in
:mod:`polytron.parallel.context`: native, its forward attends through ``model.layers.attend``).

A module with plain (non-parameter) state indexed by heads (the query -> key/value head
maps, :class:`~polytron.model.dha.layers.HeadMaps`, a
:class:`~polytron.model.protocols.TPLocal`) keeps its tensor-parallel rank's part:
``module.tp_localize(tp_rank, tp)``. Imported by model/dha/layers.py.
"""
from __future__ import annotations

from polytron.model.protocols import TPLocal
from polytron.parallel.context import register_cp_mixer
from polytron.parallel.roles import register_tp_style

register_cp_mixer("dha")


def _localize(module, mesh) -> None:
    if not isinstance(module, TPLocal):
        raise ValueError(f"role tp_local on {type(module).__name__}, which has no tp_localize(rank, tp)")
    module.tp_localize(mesh.get_local_rank(), mesh.size())


@register_tp_style("tp_local")
def local_state(role, module, tp: int, sequence_parallel: bool):
    """Style of role ``tp_local``: cut the module's head-indexed state to this rank."""
    from polytron.parallel.tensor_parallel import InPlace
    return InPlace(_localize)
