"""How the C allocator treats a CPU forward's large, short-lived tensors.

glibc's malloc serves a block larger than ``M_MMAP_THRESHOLD`` with a mapping of its own and unmaps
it on free. It raises that threshold as mapped blocks are freed, but never above 32 MiB, so a
batch's largest activations (bert-base at the default 4,096 tokens: the [4096, 3072] float32
feed-forward activation, 48 MiB) were mapped afresh, and every page faulted in again, in every
layer of every forward. A CPU engine therefore asks glibc to serve such blocks from its heap and
to keep the heap's freed memory (``M_TRIM_THRESHOLD``) for the next batch. Measured on a 2-core
AVX2 EPYC, offline throughput: bert-base-shape classifier 6-9 % higher, cross-encoder 5-6 %,
MiniLM within noise (its activations stay under 32 MiB); docs/benchmarks.md, seventeenth session.
The cost: the process's resident memory stays near its peak instead of shrinking between batches.
With another C library, or jemalloc / tcmalloc preloaded (they replace malloc), this changes
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap: more than any tensor of a CPU batch (bert-base at the
# default 4,096 tokens: the [4096, 3072] float32 feed-forward activation is 48 MiB). glibc before
# 2.35 refuses a threshold above 32 MiB (half its 64 MiB heap size): then that.
_HEAP_BLOCKS = (1 << 30, 32 << 20)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module docstring says; whether it took (False off glibc). The
    setting is the process's; repeating it changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # musl has no thresholds
        return False
    mmap_set = any(libc.mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in _HEAP_BLOCKS)
    trim_set = libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_BLOCKS[0]) == 1
    if not (mmap_set and trim_set):
        logger.debug("glibc refused the malloc thresholds; large tensors stay mmapped per allocation.")
    return mmap_set and trim_set
