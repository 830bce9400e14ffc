"""A CPU engine keeps freed memory for the next batch (engine/cpu_malloc.py): glibc then serves a
large tensor from its heap, where freed memory is reused, instead of mapping it afresh (and
faulting every page in again) each time, and keeps the heap's memory once the tensor is freed.

Each case runs in a fresh interpreter: the allocator's settings belong to the process, and this
test process has built CPU engines (which set them) long before."""

from __future__ import annotations

import subprocess
import sys

import pytest

from winnow.engine.cpu_malloc import keep_freed_memory

# Where a 48 MiB float32 tensor lands (a bert-base batch's [4096, 3072] feed-forward activation):
# inside the main thread's heap (``[heap]`` in /proc/self/maps), and how large the heap stays once
# the tensor is freed. glibc's default maps blocks above 32 MiB one by one whatever it has seen.
_SCRIPT = """
import sys, torch
from winnow.engine.cpu_malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
elif sys.argv[1] != "plain":  # a model folder: what building a CPU engine does
    from winnow import LLM
    LLM(sys.argv[1], device="cpu")
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = line.split()[0].split("-")
            return int(start, 16), int(end, 16)
    return 0, 0
t = torch.ones(4096 * 3072)
start, end = heap()
inside = start <= t.data_ptr() < end
del t
start, end = heap()
print(int(inside), (end - start) >> 20)
"""


def _placement(mode: str) -> tuple[bool, int]:
    """Whether the tensor came from the heap, and the heap's size (MiB) after it was freed."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    inside, heap_mib = done.stdout.split()[-2:]
    return inside == "1", int(heap_mib)


@pytest.mark.skipif(not keep_freed_memory(), reason="glibc's malloc only (Linux)")
def test_large_tensors_come_from_the_heap_and_stay_there():
    assert _placement("plain")[0] is False  # glibc's defaults: a mapping of its own, unmapped on free
    inside, heap_mib = _placement("tuned")
    assert inside and heap_mib >= 48


@pytest.mark.skipif(not keep_freed_memory(), reason="glibc's malloc only (Linux)")
def test_building_a_cpu_engine_tunes_the_allocator(tmp_path):
    from tests.tiny_models import build_model

    inside, heap_mib = _placement(str(build_model(tmp_path, family="bert", head="seq")))
    assert inside and heap_mib >= 48
