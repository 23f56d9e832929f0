"""Target-derived knobs shared by the mobile-GPU rules: work-group size, local memory, vector width.

A phone's OpenCL device (Mali, Adreno) allows 256 work-items per work-group and 16 KB of local
memory; the target may claim more (PoCL on the build machine claims 4096 / 512 KB), so for those
devices the target's numbers are capped at the phone's. Both GPUs load and store ``float4`` in one
instruction, the width the rules vectorize to.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

MOBILE_GPUS = ("mali", "adreno")
MOBILE_MAX_THREADS = 256
MOBILE_LOCAL_MEMORY = 16 * 1024


@dataclass(frozen=True)
class GPUKnobs:
    max_threads: int  # work-items per work-group
    local_memory: int  # bytes of __local memory per work-group
    lanes: int  # float32 lanes of one vector load/store (float4)


def gpu_knobs(target: tvm.target.Target) -> GPUKnobs:
    attrs = target.attrs
    keys = {str(k) for k in target.keys} | {str(attrs.get("device", "") or "")}
    max_threads = int(attrs.get("max_threads_per_block", 0) or attrs.get("max_num_threads", 0)
                      or MOBILE_MAX_THREADS)
    local_memory = int(attrs.get("max_shared_memory_per_block", 0) or MOBILE_LOCAL_MEMORY)
    if keys & set(MOBILE_GPUS):
        max_threads = min(max_threads, MOBILE_MAX_THREADS)
        local_memory = min(local_memory, MOBILE_LOCAL_MEMORY)
    return GPUKnobs(max_threads=max_threads, local_memory=local_memory, lanes=4)


DEFAULT_THREADS = 64  # work-items per work-group: a Mali/Adreno warp multiple, many groups


def is_gpu(target: tvm.target.Target) -> bool:
    """The rules here schedule only GPU targets (``gpu`` among the target's keys)."""
    return "gpu" in {str(k) for k in target.keys}


def thread_candidates(max_threads: int) -> list[int]:
    return [t for t in (32, 64, 128, 256) if t <= max_threads] or [max_threads]


def threads_for(items: int, max_threads: int, preferred: int = DEFAULT_THREADS) -> int:
    """Work-group size for ``items`` work-items: ``preferred``, less when there are fewer items
    (a power of two >= items, at least 32: a Mali/Adreno warp)."""
    threads = min(preferred, max_threads)
    while threads > 32 and threads // 2 >= items:
        threads //= 2
    return threads
