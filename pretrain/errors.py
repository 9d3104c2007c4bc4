"""Errors of a run that the launcher turns into one ``error:`` line (kept free of heavy
imports, so ``launch/pretrain.py`` can name them before it imports the trainer)."""
from __future__ import annotations

from polytron.model.errors import PolytronError


class RunError(PolytronError, RuntimeError):
    """The run cannot start or continue: its directory is in use or unwritable, or a
    checkpoint does not belong to this model. One line, exit status 2."""
