"""Fault-injection points for the crash tests.

``fault_point("save.commit")`` does nothing unless the environment variable
``POLYTRON_KILL_AT`` names that site, as ``site`` or ``site:N`` (the N-th time this
process reaches it, counting from 1). Then the process sends itself SIGKILL there,
exactly as a node failure or an OOM kill would stop it. The tests use it to stop a
run inside a save, between the rename and the pointer, or inside retention, which a
kill timed from outside hits only by luck. Sites: ``step`` (after the optimizer step,
before the counters move), ``save.write`` (after this rank's shard files were written),
``save.commit`` (manifest written, directory not yet renamed), ``save.pointer``
(renamed, ``latest`` not yet moved), ``retention`` (between two deletions).
"""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(site: str) -> None:
    """SIGKILL this process here when ``POLYTRON_KILL_AT`` asks for it."""
    spec = os.environ.get("POLYTRON_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != site:
        return
    _hits[site] = _hits.get(site, 0) + 1
    if _hits[site] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
