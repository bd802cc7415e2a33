"""glibc's malloc keeps freed memory between UNet steps (no page faults) and hands it back before decoding."""

import platform
import subprocess
import sys

import pytest

_ALLOCATIONS = """
import resource, sys, torch
from plainsd import runtime
if sys.argv[1] == "keep":
    assert runtime.keep_freed_memory()
def round_():  # tensors of 1 to 20 MB, as a UNet step's
    blocks = [torch.ones(n) for n in (1 << 18, 1 << 20, 3 << 20, 1 << 22, 5 << 20, 1 << 20, 1 << 22)]
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    # (in fresh processes: the setting is for the whole process, and this one has it already)
    def faults(mode):
        run = subprocess.run([sys.executable, "-c", _ALLOCATIONS, mode], capture_output=True, text=True, check=True)
        return int(run.stdout)
    # 73 MB of tensors allocated a second time: glibc's defaults give them fresh pages (18k+ page faults);
    # kept, 0-256 (now and then one block's 4096)
    default, keep = faults("default"), faults("keep")
    assert default > 10_000 and keep < default / 4, (default, keep)


_RELEASE = """
import torch
from plainsd import runtime
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
runtime.keep_freed_memory()
blocks = [torch.ones(4 << 20) for _ in range(16)]  # 256 MB in blocks of 16 MB
del blocks
kept = rss_mb()
runtime.release_freed_memory()
print(kept - rss_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc only")
def test_kept_memory_is_released_before_decoding():
    released = int(subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True).stdout)
    assert released > 200, released  # MB of the 256 freed
