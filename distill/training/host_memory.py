"""Freed host memory kept for reuse on CPU runs (glibc's malloc).

glibc serves a block above its mmap threshold (128 KiB at start, rising with the blocks
freed, at most 32 MiB) with a fresh mmap and unmaps it when it is freed, and gives the
heap's free top back to the kernel above its trim threshold. The fused loss allocates and
frees the same (chunk, V) buffers every chunk of every step, so on CPU they were faulted in
afresh each time, the kernel zeroing every page: `benchmarks/fused_chunks.py` counts 320k
page faults a call at the real step's shape with 128 MiB buffers, still 120k with 32 MiB
buffers under glibc's own thresholds.

`keep_freed_memory` fixes the mmap threshold at glibc's largest (32 MiB) and the trim
threshold at 1 GiB, so blocks up to 32 MiB are taken from and returned to the heap; with the
CPU chunk sized under 32 MiB (`distill.loss.fused.CHUNK_LOGITS_CPU`) the fused loss then
faults no page once the heap has grown (the same benchmark: 0 a call, and 1,147 ms -> 903
ms). Numbers are untouched (it only changes where memory comes from); the cost is that
freed memory stays with the process up to its peak (benchmarks/real_step.py prints the peak
RSS beside the plain loop's). It is process-wide, so the CPU training loop calls it once at
setup; elsewhere (not Linux with glibc) it does nothing, and it leaves glibc alone when the
user has set its malloc thresholds in the environment. Sharded (FSDP) runs do not call it:
there memory is the point, and freed gather buffers kept in the heap cost more than the
faults (docs/guide/scale.md measures it).
"""

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: a larger value is refused
TRIM_THRESHOLD = 1 << 30


USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc reads these at start


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds as the module doc says. Returns whether both took
    effect (False where the C library is not glibc, or the user set the thresholds)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own choice stands
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
