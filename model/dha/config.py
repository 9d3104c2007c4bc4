"""``model.dha``: settings of decoupled-head attention (``model.attention=dha``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DHAConfig:
    """Decoupled-head attention settings (used when ``model.attention=dha``)."""

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
