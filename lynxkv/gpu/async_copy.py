"""CUDA C++ helpers for asynchronous global -> shared copies (``cp.async``, sm_80+),
shared by the decoding and encoding kernel sources (prepended to each ``SOURCE``)."""

from __future__ import annotations

__all__ = ["ASYNC_COPY"]

ASYNC_COPY = r"""
// 16 (.cg: around L1) or 4 (.ca) bytes global -> shared, asynchronously: a thread's
// copies are made visible to it by cp_async_commit then cp_async_wait, to the block by a
// barrier after that.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}
"""
