"""``model.bitnet``: settings of BitNet b1.58 (ternary-weight BitLinear projections)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BitNetConfig:
    """BitNet b1.58 settings (used when ``model.linear=bitlinear`` or ``model.arch=bitnet``)."""

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
