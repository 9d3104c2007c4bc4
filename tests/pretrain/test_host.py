"""keep_freed_memory: freed large buffers are reused instead of page-faulted in again."""
import subprocess
import sys
import textwrap

import pytest

from pretrain.host import keep_freed_memory

# A training-like loop whose activations and gradients are 64 MiB each: count the minor
# page faults of its steady-state steps. By default glibc maps those blocks afresh every
# step (about 130k faults of 4 KiB pages per step here); with the setting the freed
# blocks are reused and no page is faulted in again.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from pretrain.host import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 8192)
    x = torch.randn(2048, 256)              # activations (2048, 8192) fp32 = 64 MiB
    def step():
        lin(x).relu().square().mean().backward()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(); step()
    before = faults()
    for _ in range(3):
        step()
    print((faults() - before) // 3)
""")


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = faults("default"), faults("keep")
    assert default > 16384, default         # at least one fresh 64 MiB block per step
    assert kept < 1000, kept


def test_keep_freed_memory_is_idempotent():
    assert keep_freed_memory() == keep_freed_memory()
