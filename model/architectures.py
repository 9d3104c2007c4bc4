"""Importing this module registers every built-in architecture spec (model.spec.SPECS)."""
import model.llama  # noqa: F401
import model.bitnet.spec  # noqa: F401
import model.dha.spec  # noqa: F401
import model.moe.spec  # noqa: F401
import model.yoco.spec  # noqa: F401
