"""Keeping the process's memory at what it uses, not at its high-water mark of freed blocks.

A merge allocates and frees tensors of a few to a few hundred MB, layer after layer. glibc raises its mmap
threshold each time such a block is freed, so that later blocks come from the heap, where freed space is
fragmented and never returned: peak RSS then grows with the number of layers and of merges in a pass
(measured: a pass of 4 merges into a 1024-hidden nf4 base, 720 MB peak before, 474 MB after). A fixed
threshold of 4 MiB keeps every large block in its own mapping, returned to the system when freed (1 MiB saves
a little more memory but costs ~25% more time in `--quantize`, whose encoder works in 2 MiB chunks; 16 MiB
saves nothing).

Below the threshold, a module's many medium blocks (statistics, sub-layers of the check, probe activations)
leave freed holes in the heap that glibc keeps: ~1.5 MB a module without ``trim`` (95 MB over TinyLlama's 66
merged modules), flat with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 4 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, where it is glibc-like (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere). Called
    after each merged module, so that memory stays flat however many modules a pass merges."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def return_large_blocks() -> bool:
    """Serve allocations of 4 MiB and more from their own mappings (glibc only); True when it took effect.

    Process-wide, so the CLI calls it at start; library users may call it themselves.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
