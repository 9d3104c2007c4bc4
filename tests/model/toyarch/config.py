"""``model.toy``: settings of the toy architecture."""
from __future__ import annotations

from dataclasses import dataclass, field

from polytron.model.configlib import bad, doc


@dataclass
class ToyConfig:
    """Toy architecture settings (used when ``model.arch=toy`` or ``model.mlp=toy_glu``)."""
    inner_mult: int = field(default=2, metadata=doc(
        "Inner width of the toy MLP as a multiple of model.hidden_size."))
    out_scale: float = field(default=0.5, metadata=doc("Factor on the toy MLP's output."))

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
        if self.inner_mult < 1:
            raise bad("model.toy.inner_mult", self.inner_mult, "an integer >= 1")
        if not self.out_scale > 0:
            raise bad("model.toy.out_scale", self.out_scale, "a positive number")
