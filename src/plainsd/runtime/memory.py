"""The process's freed memory: kept by glibc's malloc for the next UNet step, handed back before decoding."""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts
_TRIM_THRESHOLD = 512 << 20

_kept = False  # keep_freed_memory took effect


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MB for the next allocation instead of handing them
    back to the kernel (for the whole process). By default it maps blocks of 128 KB and up afresh (mmap) and
    unmaps them when freed, and trims its heap: every UNet step's tensors then come back as new pages that the
    kernel must fault in and zero, step after step. The cost: up to 512 MB of freed memory stays with the
    process (the pipeline hands it back before decoding: release_freed_memory). Returns False (and changes
    nothing) where the C library is not glibc."""
    global _kept
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt takes other parameters
    except (OSError, AttributeError):
        return False
    _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _kept


def release_freed_memory() -> None:
    """Hand the freed memory that keep_freed_memory keeps back to the kernel (glibc's malloc_trim). The
    pipeline calls it before the VAE decodes: the decoder's large blocks (32 MB and up) are mapped afresh
    anyway, and the sampling's kept blocks would add to the peak."""
    if _kept:
        ctypes.CDLL(None).malloc_trim(0)
