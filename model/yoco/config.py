"""``model.yoco``: settings of the YOCO decoder-decoder (``model.arch=yoco``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class YOCOConfig:
    """YOCO settings (used when ``model.arch=yoco``)."""

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
