"""Error types of the data package."""
from __future__ import annotations

from polytron.model.errors import PolytronError


class DataError(PolytronError, ValueError):
    """Bad training data or tokenizer: one line naming the file and what is wrong.

    Raised before training starts (missing or corrupt ``.bin``/``.idx`` files, a
    tokenizer larger than the model's embedding, ...) and by the preprocessing tools
    for malformed input under ``--strict``.
    """
