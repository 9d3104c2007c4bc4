"""Importing this module registers every built-in architecture spec (model.spec.SPECS)."""
import polytron.model.llama  # noqa: F401
import polytron.model.bitnet.spec  # noqa: F401
import polytron.model.dha.spec  # noqa: F401
import polytron.model.moe.spec  # noqa: F401
import polytron.model.yoco.spec  # noqa: F401
