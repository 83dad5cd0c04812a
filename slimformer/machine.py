"""The machine a figure was measured on (stored next to every result), and the process's memory: its peak, and freeing it."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import sys
from pathlib import Path

import torch
import transformers


def machine_info() -> dict:
    """CPU, core count, thread count and library versions, for result files."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new peak-memory window, so :func:`peak_rss_gib` charges only what runs from now on.

    Linux resets the high-water mark when "5" is written to ``/proc/self/clear_refs``;
    elsewhere the peak stays the process's lifetime peak. Returns whether it was reset.
    """
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """Peak resident memory in GiB since the last :func:`reset_peak_rss` (else since the process started)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int:
    """Resident memory of this process now, in bytes (0 where /proc is not available)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@functools.cache
def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)  # glibc's; not on macOS or musl
    except (AttributeError, OSError):
        return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 4 << 20) -> bool:
    """Give every allocation of ``threshold`` bytes or more its own memory mapping, unmapped when freed; whether it could.

    glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, and serves
    requests below it from its heap. A streamed run's block-sized tensors then fragment the heap:
    with GPTQ on 13B shapes (4 × 512 tokens) its address range grew from 590 to 1176 MiB over five
    blocks while what was in use stayed at 264 MiB (glibc's ``mallinfo2`` after each block), and
    the peak within a block grew with it, 3.47 → 3.69 GiB. With the threshold fixed at 4 MiB
    the heap grew from 284 to 327 MiB over four blocks, and all 40 blocks peaked at 3.43 GiB
    (5.47 before either fix) in 111.5 s a block (112.5 before; the fresh pages cost little next
    to the block's work). Setting it (glibc's ``mallopt(M_MMAP_THRESHOLD)``) turns glibc's
    adjustment off for the rest of the process; the block runner does it for streamed models only.
    """
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release_freed_memory() -> bool:
    """Hand the memory the C allocator keeps free back to the system (glibc's ``malloc_trim``); whether it could.

    glibc raises its mmap threshold each time a large block is freed, up to 32 MiB; after that,
    tensors up to that size come from its heaps, and what is freed there stays with the process.
    A streamed run frees a whole block's tensors every block, so its resident memory grew with
    the block count while its live tensors did not: by 35 MiB a block at hidden size 1024, and
    from 3.42 GiB after 4 blocks to 5.47 GiB after 40 at 13B shapes (GPTQ). The block runner
    calls this after each block.
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True
