"""``model.moe``: settings of the mixture-of-experts MLPs (``model.mlp=moe`` or ``mh_moe``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MoEConfig:
    """Mixture-of-experts settings (used when ``model.mlp`` is ``moe`` or ``mh_moe``)."""

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
