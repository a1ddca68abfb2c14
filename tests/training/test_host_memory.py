"""`keep_freed_memory`: on glibc, the fused loss's (chunk, V) buffers freed at the end of a
chunk are taken again from the heap by the next chunk and call, without page faults (what
saves the CPU loss the kernel's zeroing of every buffer, every chunk)."""

import platform
import subprocess
import sys

import pytest

from distill.loss.fused import CHUNK_LOGITS_CPU, auto_chunk_size

PROBE = """
import resource, sys, torch
from distill.loss.fused import fused_kd_loss
from distill.training.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
g = torch.Generator().manual_seed(0)
N, H, V = 340, 32, 49152  # two CPU chunks of 170 tokens
hs = torch.randn(N, H, generator=g).requires_grad_(True)
ws, ht, wt = torch.randn(V, H, generator=g), torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fused_kd_loss(hs, ws, ht, wt, torch.ones(N, dtype=torch.bool), divergence="forward_kl").backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_fused_loss_reuses_its_chunk_buffers_without_page_faults():
    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
        return [int(x) for x in out.split()]

    buffer_pages = 170 * 49152 * 4 // 4096  # one (chunk, V) fp32 buffer
    default, kept = faults("default")[4:], faults("keep")[4:]  # once the heap has grown
    assert sum(default) > len(default) * buffer_pages  # glibc's own thresholds: buffers faulted in again, call after call
    assert sum(kept) < sum(default) / 4 and kept.count(0) >= len(kept) // 2  # kept: calls mostly reuse the freed pages


def test_cpu_chunks_fit_the_reused_size():
    V = 49152
    assert auto_chunk_size(V, "cpu") * V * 4 <= CHUNK_LOGITS_CPU * 4 == 32 << 20  # glibc's largest mmap threshold
    assert auto_chunk_size(V, "cuda") == 49152 * 682 // V == 682 and auto_chunk_size(V, "cpu") == 170


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_users_own_malloc_setting_is_left_alone(monkeypatch):
    from distill.training.host_memory import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")  # as docs/guide/scale.md advises sharded runs
    assert keep_freed_memory() is False
