"""dha: one architecture folder. ``spec.py`` registers the spec (found by
model/architectures.py discovery) with its config section (``config.py``, ``model.dha``)
and the layer kinds its modules register; nothing outside this folder names it."""
