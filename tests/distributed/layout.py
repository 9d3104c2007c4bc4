"""One layout of the equivalence suite, as a small frozen dataclass.

    Layout("tp2_docs", 2, parallel={"tensor": 2}, data="docs")
    Layout("bitnet_fsdp2_tied", 2, model={**B2B4T, "tie_embeddings": True}, data="masked")

The name and the world size are positional, everything else is by keyword. Each
``tests/distributed/layouts_<arch>.py`` holds a ``LAYOUTS`` list of these, merged by
``tests/distributed/equivalence.py`` (this module's name does not start with
``layouts_``, so it is not collected itself).
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal, Optional

from polytron.model.configlib import doc

#: default wall-clock budget of one layout in a batched spawn (three optimizer steps of
#: the tiny model take 1-10 s on 2 loaded CPU cores; the budget only bounds a hang)
BUDGET_S = 120.0


@dataclass(frozen=True)
class Layout:
    """A parallel layout the suite trains and compares with one process."""
    name: str = field(metadata=doc("Test id; unique over every layouts file."))
    world: int = field(metadata=doc("Number of ranks (processes) it runs on."))
    _: KW_ONLY
    parallel: dict[str, Any] = field(default_factory=dict, metadata=doc(
        "ParallelConfig fields: the degrees and options, e.g. {'tensor': 2, 'sequence_parallel': False}."))
    model: dict[str, Any] = field(default_factory=dict, metadata=doc(
        "Overrides of the suite's tiny model (equivalence.model_config): may set arch, plugins "
        "and any model.<section> as a dict."))
    data: Literal["plain", "docs", "masked", "sources"] = field(default="plain", metadata=doc(
        "Batch variant (equivalence.global_batch): packed documents, uneven loss masks, per-source ids."))
    budget_s: float = field(default=BUDGET_S, metadata=doc(
        "Seconds this layout may take inside its batch before it fails as hung; the batch's "
        "timeout is a base plus the sum of its layouts' budgets."))
    fault: Optional[Literal["raise", "abort", "hang"]] = field(default=None, metadata=doc(
        "Test-only (tests/distributed/test_harness.py): the last rank raises before training, or "
        "blocks in a receive nobody sends while the other ranks block in an all-reduce."))
