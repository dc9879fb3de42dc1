"""CUDA C++ source of the dequantizing kernels (compiled by CuPy's NVRTC at first use).

One kernel template serves the lynx and uniform codecs, anchor-only and full decodes,
both layouts and three output types. Design for memory bandwidth (docs: bench/gpu.py):

* one launch per (codec variant, K or V) for a whole batch of sections: a section of
  256 tokens is only ~100 KB of output, far too small to fill the GPU alone, so a job
  table gives each section's payload pointers and destination base;
* a thread owns 8 consecutive channels (one packed group: ``BITS`` bytes, a 32-bit load
  for 4-bit fields) of ``TPT`` consecutive tokens; it issues all its loads (codes, row
  offsets, metadata) before it fills the shared tables and meets the barrier, so one
  round trip covers both; per-thread pointers, the alignment test and the run-time
  divisions are done once, not per token;
* the common case (all ``TPT`` tokens under one page's and one chunk's metadata) runs a
  branch-free token loop: about 9 instructions per value (anchor) and 10 (full), from
  about 20 / 24 when every token re-derived its addresses and re-tested its page;
* the full code's 8-bit indices come from word operations on the two nibble words
  (4 + 4 bits), not from two shifts and masks per value;
* lookup tables (signed level per field index, u8 mu and sigma) live in shared memory;
* outputs go out as explicit 16-byte global stores (``st.global``: the destination comes
  from the job table, so the compiler would emit generic stores);
* the destination row of each token (``-1``: skip) is computed for the ``hnd`` layout
  (``row0 + t * step``: no loads, no registers held) and read from an int32 table in
  16-byte units for vLLM's ``paged`` layout (``slot_mapping``), or from the int64
  table (``row_off``) when the slots do not fit int32 units: one kernel writes both
  layouts. With int64 rows held in registers the full K kernel spilled at the
  80-register cap; the two cheaper forms spill nothing there and took refine from
  0.74-0.75 to 0.80-0.82 of copy bandwidth (bench/results/gpu-variants.txt);
* 2- and 4-bit fields are one 16- or 32-bit load per token, 6-bit anchor fields
  (lynx-a6) two 32-bit loads from the 4-byte boundary below them (three 16-bit loads
  before, six byte loads before that: lynx-a2 refine 0.58 -> 0.67);
* lynx-a2's full code (2 + 6 bits): the table offsets of values k and k + 4 are built
  together in the halves of one word from byte permutations (``level_offsets``: 25
  instructions a token for 8 values, from 43), and the 6-bit residual fields go through
  shared memory (``SixStage``: 16-byte copies of a warp's fields, or 4-byte copies of a
  thread's where a warp's 8-groups straddle token groups), so that no residual word is
  held in registers across the barrier and a warp issues 3 global loads a thread for
  them, not 16: lynx-a2 refine 0.64 -> 0.80 (hnd) and 0.67 -> 0.77 (paged) side by
  side; the per-thread copies alone 0.78 / 0.75 (bench/results/gpu-variants.txt).

Arithmetic: float32 with explicit round-to-nearest intrinsics (``__fadd_rn``,
``__fmul_rn``) so that the compiler contracts nothing into an FMA: each value is
computed by the same float32 operations, in the same order, as the numpy reference
(``lynxkv.gpu.tables`` states them), hence bit-identical before the final rounding to
bf16 / fp16 (round-to-nearest-even, as torch's ``.to``).

Tuning (H200, bf16, 2026-11-30; bench/gpu_variants.py times compiled variants side by
side, each checked bit for bit first; GPU time of the launches alone): this kernel runs
at 0.80-0.92 of copy bandwidth for decode_anchor and 0.77-0.87 for refine_residual; a
bare streaming kernel with the same mix of reads and writes reaches 0.94-0.96, and this
kernel with its arithmetic and table lookups removed (``-DSKELETON=1``) 0.90-0.99.
Kept: 3 blocks of 256 per SM (80 registers), 8 tokens a thread. Measured against it
and not kept: 2 blocks (-0.10 to +0.01), 4 tokens with 4 blocks (-0.08 to +0.02), 16
tokens with 2 blocks (-0.12 to +0.06, mostly negative), streaming stores
(``-DSTORE_CS=1``: equal to -0.02), threads in the hnd destination's order (-0.02 to
-0.05), predicated stores (within 0.01), 32 bank-spread copies of the 256-entry table
(refine -0.01 to -0.06), a persistent grid loading one item ahead (it spilled; 0.55
against 0.63 under the earlier timing), for 6-bit fields a 32- and a 16-bit load in
place of two 32-bit ones (-0.01 to -0.05).
Earlier figures for this kernel (0.49-0.67) timed the host's launch work too
(docs/benchmarks.md).

Known gap: CuPy hands NVRTC ``-ftz=true`` after the caller's options (cupy/cupy#9576),
so float32 arithmetic here flushes subnormals: a decoded value below 2^-126 in magnitude
comes out as zero where the numpy decoder keeps it (the bit-for-bit claim holds above).
"""

from __future__ import annotations

from lynxkv.gpu.async_copy import ASYNC_COPY

__all__ = [
    "MIN_BLOCKS",
    "ROWS_AFFINE",
    "ROWS_TABLE",
    "ROWS_UNITS",
    "SOURCE",
    "TOKENS_PER_THREAD",
    "kernel_name",
]

#: How the kernel finds each token's destination row (the template's ROWS).
ROWS_TABLE, ROWS_AFFINE, ROWS_UNITS = 0, 1, 2

#: Resident 256-thread blocks per SM the kernel is compiled for (caps its registers).
MIN_BLOCKS = 3

#: Tokens one thread decodes (its code loads are all in flight together).
TOKENS_PER_THREAD = 8

SOURCE = (
    r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
"""
    + ASYNC_COPY
    + r"""

#ifndef MIN_BLOCKS
#define MIN_BLOCKS 3  // blocks per SM the register budget must allow; MIN_BLOCKS
#endif
#ifndef TPT
#define TPT 8  // tokens per thread; TOKENS_PER_THREAD
#endif
#ifndef STORE_CS
#define STORE_CS 0  // 1: streaming (evict-first) stores
#endif
#ifndef STAGE_SIX
#define STAGE_SIX 1  // 1: 6-bit residual fields through shared memory (SixStage)
#endif
#ifndef SKELETON
#define SKELETON 0  // 1 (bench/gpu_variants.py only): loads and stores, no table or arithmetic
#endif
#define EPS 1e-6f  // lynxkv.codec.codes.EPS, float32

#define ROWS_TABLE 0
#define ROWS_AFFINE 1
#define ROWS_UNITS 2
template <int ROWS> struct RowOf { typedef long long type; };
template <> struct RowOf<ROWS_UNITS> { typedef int type; };

template <bool B>
struct Flag {  // a compile-time flag as an argument type (as in encode_source)
    static constexpr bool value = B;
};

struct Job {
    // device addresses: anchor payload, residual payload (0 for anchor-only), the
    // destination element of (token row 0, head 0, dim 0)
    unsigned long long anchor, residual, dst;
};

// 8 fields of BITS bits (bitpack.py: little-endian bit stream) from BITS bytes.
// The register type holding 8 fields of BITS bits: 32 bits when they fit.
template <bool Narrow> struct WordOf { typedef unsigned long long type; };
template <> struct WordOf<true> { typedef unsigned int type; };

template <int BITS>
struct Fields {
    typedef typename WordOf<(BITS <= 4)>::type Word;
    // 4-bit fields: one 32-bit load; 2-bit: one 16-bit load; 6-bit: two 32-bit loads
    // from the 4-byte boundary at or below the fields, when the address allows it (every
    // token's stride keeps the first one's 2- or 4-byte alignment)
    static constexpr bool WIDE = BITS == 4 || BITS == 2 || BITS == 6;

    static __device__ __forceinline__ bool aligned(const unsigned char* p) {
        return WIDE && ((size_t)p & (BITS == 4 ? 3 : 1)) == 0;
    }

    // The fields at p; ``s``: for aligned 6-bit fields, 8 * (p mod 4) (0 or 16)
    template <bool ALIGNED>
    static __device__ __forceinline__ Word load(const unsigned char* p, unsigned int s) {
        if (ALIGNED && BITS == 4) return __ldg((const unsigned int*)p);
        if (ALIGNED && BITS == 2) return __ldg((const unsigned short*)p);
        if constexpr (BITS == 6) {
            // The 8 bytes from the 4-byte boundary at or below p (p is 2-aligned), shifted
            // down to p: bits 48-63 are the next fields' first bytes, which no caller
            // reads. When p is 4-aligned the second load reads 2 bytes past the fields:
            // load_tokens keeps the payload's last fields off this path.
            if (ALIGNED) {
                const unsigned int* q = (const unsigned int*)((size_t)p & ~(size_t)3);
                const unsigned int w0 = __ldg(q), w1 = __ldg(q + 1);
                return (Word)__funnelshift_r(w0, w1, s) | (Word)(w1 >> s) << 32;
            }
        }
        Word w = 0;  // odd widths, or a short last tensor's unaligned codes: byte by byte
#pragma unroll
        for (int i = 0; i < BITS; ++i) w |= (Word)__ldg(p + i) << (8 * i);
        return w;
    }

    // The fields of tokens 0..n-1 (0 past n), ``stride`` bytes apart from ``p``. The
    // address check is done once here, not per token: every stride keeps alignment, and
    // for 6-bit fields a stride of whole 4-byte words keeps p mod 4, so one shift amount
    // is held while the loads are in flight (odd strides, 8-groups a token odd: bytes).
    // ``last``: these tokens include the last fields of the payload (6-bit fields are
    // then read byte by byte, so that no load reaches past the payload).
    static __device__ __forceinline__ void load_tokens(
        const unsigned char* p, int stride, int n, bool last, Word* w) {
        if (aligned(p) && !(BITS == 6 && (last || (stride & 3) != 0))) {
            const unsigned int s = ((unsigned int)(size_t)p & 2u) * 8u;
#pragma unroll
            for (int j = 0; j < TPT; ++j) w[j] = j < n ? load<true>(p + j * stride, s) : 0;
        } else {
#pragma unroll
            for (int j = 0; j < TPT; ++j) w[j] = j < n ? load<false>(p + j * stride, 0) : 0;
        }
    }
};

// 6-bit residual fields (lynx-a2) through shared memory. Warp form: a warp's fields of
// TPT tokens (32 consecutive 8-groups: 192 bytes a token) are copied in 16-byte pieces,
// 3 a lane: two 32-bit loads a token from global memory, each over a 192-byte span, cost
// lynx-a2's refine ~0.06 of copy bandwidth against one (bench/gpu_variants.py, SKELETON
// probes). Thread form, where a warp's groups straddle token groups: each thread copies
// the two 32-bit words holding its fields of a token (4-byte copies). Either way no
// residual word is held in registers across the barrier (the paged kernel spilled).
struct SixStage {
    // whether a kernel stages its residual fields (cp.async needs sm_80)
    static __host__ __device__ constexpr bool used(bool full, int rbits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        return STAGE_SIX && full && rbits == 6;
#else
        return false;
#endif
    }
    static constexpr int ROW = 32 * 6;  // bytes of a warp's fields, one token
    static constexpr int BYTES = TPT * ROW;
    static constexpr int THREAD_WORDS = 2 * TPT * 256;  // thread form, a block
    static constexpr int BLOCK_BYTES =
        8 * BYTES > 4 * THREAD_WORDS ? 8 * BYTES : 4 * THREAD_WORDS;

    // Whether this block's warps can be staged: each warp's 32 groups in one token group
    // (G % 32 == 0), every live thread's token group whole (TPT tokens), the copies
    // 16-byte aligned (a warp's fields start 192 * k bytes into the residual payload).
    static __device__ __forceinline__ bool block_usable(
        unsigned long long residual, int T, unsigned int G, int items_per_job) {
        const unsigned int end = min((blockIdx.x + 1) * blockDim.x, (unsigned int)items_per_job);
        return G % 32 == 0 && (residual & 15) == 0 && end <= (unsigned int)(T / TPT) * G;
    }
    static __device__ __forceinline__ void copy(
        unsigned char* s, const unsigned char* warp_p, int stride, int lane) {
#pragma unroll
        for (int k = 0; k < (BYTES / 16 + 31) / 32; ++k) {
            const int c = lane + 32 * k;  // piece c: token c / 12, bytes 16 (c % 12) on
            if (c < BYTES / 16) {
                const int row = c / 12;
                cp_async16(s + 16 * c, warp_p + row * stride + 16 * (c - 12 * row));
            }
        }
        cp_async_commit();
    }
    // This lane's fields of token j (bits 48-63: the next lane's first bytes).
    static __device__ __forceinline__ unsigned long long fields(
        const unsigned char* s, int lane, int j) {
        const unsigned int* q = (const unsigned int*)(s + j * ROW) + (lane * 6 >> 2);
        return join(q[0], q[1], (lane & 1) * 16);
    }
    static __device__ __forceinline__ unsigned long long join(
        unsigned int w0, unsigned int w1, unsigned int sh) {
        return (unsigned long long)__funnelshift_r(w0, w1, sh) |
               (unsigned long long)(w1 >> sh) << 32;
    }

    // Thread form: fields at p (2-aligned), ``stride`` bytes a token (whole words), not
    // the payload's last (whose second word would reach past it). Words (2j + k) * 256
    // + threadIdx.x of the block's area: consecutive threads, consecutive banks.
    static __device__ __forceinline__ bool thread_usable(
        const unsigned char* p, int stride, bool last) {
        return ((((size_t)p & 1) | (size_t)(stride & 3)) == 0) && !last;
    }
    static __device__ __forceinline__ void copy_thread(
        unsigned int* s, const unsigned char* p, int stride, int n) {
        const unsigned char* q = (const unsigned char*)((size_t)p & ~(size_t)3);
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            if (j < n) {
                cp_async4(s + 2 * j * 256 + threadIdx.x, q + j * stride);
                cp_async4(s + (2 * j + 1) * 256 + threadIdx.x, q + j * stride + 4);
            }
        }
        cp_async_commit();
    }
    // The same words read byte by byte (any address, any stride), stored unshifted.
    static __device__ __forceinline__ void copy_thread_bytes(
        unsigned int* s, const unsigned char* p, int stride, int n) {
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            if (j < n) {
                const unsigned long long w = Fields<6>::template load<false>(p + j * stride, 0);
                s[2 * j * 256 + threadIdx.x] = (unsigned int)w;
                s[(2 * j + 1) * 256 + threadIdx.x] = (unsigned int)(w >> 32);
            }
        }
    }
    static __device__ __forceinline__ unsigned long long fields_thread(
        const unsigned int* s, int j, unsigned int sh) {
        return join(s[2 * j * 256 + threadIdx.x], s[(2 * j + 1) * 256 + threadIdx.x], sh);
    }
};

// 8 consecutive f16 (16-byte aligned), as loaded, and as float.
__device__ __forceinline__ uint4 load_raw8(const unsigned char* p) {
    return __ldg((const uint4*)p);
}
__device__ __forceinline__ void half8(uint4 u, float* out) {
    const __half2* h = (const __half2*)&u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Page metadata of 8 channels, as loaded (two 8 x f16 vectors): g_min and g_scale + EPS.
__device__ __forceinline__ void page_values(uint4 rmin, uint4 rscl, float* pmin, float* pscl) {
    half8(rmin, pmin);
    half8(rscl, pscl);
#pragma unroll
    for (int i = 0; i < 8; ++i) pscl[i] = __fadd_rn(pscl[i], EPS);
}
__device__ __forceinline__ void load_page(
    const unsigned char* pay, long long off_scale, long long o, float* pmin, float* pscl) {
    page_values(load_raw8(pay + o), load_raw8(pay + off_scale + o), pmin, pscl);
}

// Per-channel chunk metadata of 8 channels, as loaded (U8: 8 u8 fields each, looked up
// in the shared tables; else 8 f16 each): mu and sigma + EPS.
template <bool U8>
__device__ __forceinline__ void chunk_values(
    uint2 umu, uint2 usig, uint4 rmu, uint4 rsig, const float* s_mu, const float* s_sig,
    float* cmu, float* csig) {
    if (U8) {
        const unsigned char* bm = (const unsigned char*)&umu;
        const unsigned char* bs = (const unsigned char*)&usig;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            cmu[i] = s_mu[bm[i]];
            csig[i] = s_sig[bs[i]];
        }
    } else {
        half8(rmu, cmu);
        half8(rsig, csig);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) csig[i] = __fadd_rn(csig[i], EPS);
}
// The same, loaded from element index o of [Q, C].
// The raw mu and sigma fields of chunk field offset ``o`` (u8: 8 bytes each, else 8
// float16), for chunk_values.
template <bool U8>
__device__ __forceinline__ void load_chunk_raw(const unsigned char* pay, long long off_mu,
                                               long long off_sigma, long long o, uint2& um,
                                               uint2& us, uint4& rm, uint4& rs) {
    if (U8) {
        um = __ldg((const uint2*)(pay + off_mu + o));
        us = __ldg((const uint2*)(pay + off_sigma + o));
    } else {
        rm = load_raw8(pay + off_mu + 2 * o);
        rs = load_raw8(pay + off_sigma + 2 * o);
    }
}
template <bool U8>
__device__ __forceinline__ void load_chunk(
    const unsigned char* pay, long long off_mu, long long off_sigma, long long o,
    const float* s_mu, const float* s_sig, float* cmu, float* csig) {
    uint2 um = make_uint2(0, 0), us = um;
    uint4 rm = make_uint4(0, 0, 0, 0), rs = rm;
    load_chunk_raw<U8>(pay, off_mu, off_sigma, o, um, us, rm, rs);
    chunk_values<U8>(um, us, rm, rs, s_mu, s_sig, cmu, csig);
}

// 16-byte global stores (the destination pointer comes from the job table, so the
// compiler would emit generic stores).
__device__ __forceinline__ void store16(uint4* p, uint4 v) {
    if (STORE_CS) __stcs(p, v);
    else asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                      :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void store16(float4* p, float4 v) {
    if (STORE_CS) __stcs(p, v);
    else asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};"
                      :: "l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
__device__ __forceinline__ void store8(float* dst, const float* v) {
    store16((float4*)dst, make_float4(v[0], v[1], v[2], v[3]));
    store16((float4*)dst + 1, make_float4(v[4], v[5], v[6], v[7]));
}
__device__ __forceinline__ void store8(__nv_bfloat16* dst, const float* v) {
    uint4 u;
    __nv_bfloat162* p = (__nv_bfloat162*)&u;
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    store16((uint4*)dst, u);
}
__device__ __forceinline__ void store8(__half* dst, const float* v) {
    uint4 u;
    __half2* p = (__half2*)&u;
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    store16((uint4*)dst, u);
}

// The byte offset in the level table (4 * index) of each of 8 values; the index is the
// anchor field, or for the full code ``anchor << RBITS | residual``.
template <int ABITS, int RBITS, bool FULL, typename AW, typename RW>
__device__ __forceinline__ void level_offsets(AW a, RW r, unsigned int* off) {
    if constexpr (FULL && ABITS == 4 && RBITS == 4) {
        // byte k of lo (hi) is the index of value 2k (2k + 1): nibbles merged by word ops
        const unsigned int aw = (unsigned int)a, rw = (unsigned int)r;
        const unsigned int lo = (aw << 4 & 0xF0F0F0F0u) | (rw & 0x0F0F0F0Fu);
        const unsigned int hi = (aw & 0xF0F0F0F0u) | (rw >> 4 & 0x0F0F0F0Fu);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            off[2 * k] = (lo >> (8 * k) & 0xFFu) << 2;
            off[2 * k + 1] = (hi >> (8 * k) & 0xFFu) << 2;
        }
    } else if constexpr (FULL && ABITS == 2 && RBITS == 6) {
        // The offsets of values k and k + 4 are built together, in the two 16-bit halves
        // of one word: residual bytes 0-2 hold fields 0-3 as bytes 3-5 hold fields 4-7,
        // so one byte permutation puts fields k and k + 4 at the same bits of each half
        // (x: bytes 0-1 | 3-4, fields 0, 1 | 4, 5; y: bytes 1-2 | 4-5, fields 2, 3 | 6, 7;
        // at bits 0, 6 and 4, 10 of a half). Anchor field k sits at bit 8 + 2k of half 0
        // of ``an``, field k + 4 at the same bit of half 1. Each half then takes the
        // residual field shifted to bits 2-7 (the mask R) and, beside it, the anchor
        // field at bits 8-9 from an anchor word whose other bits outside R are zero.
        const unsigned int lo = (unsigned int)r, hi = (unsigned int)(r >> 32);
        const unsigned int x = __byte_perm(lo, hi, 0x4310);
        const unsigned int y = __byte_perm(lo, hi, 0x5421);
        const unsigned int an = __byte_perm((unsigned int)a, 0u, 0x1404);
        constexpr unsigned int R = 0x00FC00FCu;
        unsigned int pair[4];
        pair[0] = (x << 2 & R) | (an & 0x03000300u);
        pair[1] = (x >> 4 & R) | ((an & 0x0F000F00u) >> 2 & ~R);
        pair[2] = (y >> 2 & R) | ((an & 0x3F003F00u) >> 4 & ~R);
        pair[3] = (y >> 8 & R) | (an >> 6 & ~R);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            off[k] = pair[k] & 0xFFFFu;
            off[k + 4] = pair[k] >> 16;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            unsigned int idx = (unsigned int)(a >> (ABITS * i)) & ((1u << ABITS) - 1);
            if (FULL) {
                const unsigned int rr = (unsigned int)(r >> (RBITS * i)) & ((1u << RBITS) - 1);
                idx = idx << RBITS | rr;
            }
            off[i] = idx << 2;
        }
    }
}

// PAGE: lynx (page stage g_min/g_scale); BY_TOKEN: chunk metadata [T, H] (else [Q, C]);
// U8: chunk metadata fields are u8 looked up in tables (else f16); FULL: anchor and
// residual (field index = anchor << RBITS | residual), else the anchor alone.
// ROWS: where token t's row starts (element offset from the job's destination; -1 skips
// the token): ROWS_TABLE: ``row_off[t]`` (int64); ROWS_AFFINE: ``row0 + t * row_step``
// (the hnd layout: computed, no loads and no registers held); ROWS_UNITS:
// ``((const int*)row_off)[t]`` in 16-byte units (vLLM's slots: half the registers).
template <typename OutT, int ABITS, int RBITS, bool FULL, bool PAGE, bool BY_TOKEN, bool U8,
          int ROWS, bool STAGED>
__device__ __forceinline__ void dequant_body(
    const Job* __restrict__ jobs, const long long* __restrict__ row_off,
    const float* __restrict__ tables,  // [3][256]: level, u8 mu, u8 sigma
    int T, int H, int D, int chunk_tokens, int page_tokens,
    long long off_scale, long long off_mu, long long off_sigma, long long off_codes,
    long long stride_h, int items_per_job, long long row0, long long row_step,
    float* s_lev, float* s_mu, float* s_sig, unsigned char* s_six) {
    // One job (section) per grid row: no 64-bit division to find it. Divisions by
    // run-time values cost tens of instructions: unsigned, and once per thread.
    const unsigned int item = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned int G = (unsigned int)(H * D) >> 3;
    const unsigned int grp = item / G;
    const int g = item - grp * G;
    const int t0 = grp * TPT;
    const bool live = item < (unsigned int)items_per_job;
    const int n = live ? min(TPT, T - t0) : 0;  // tokens of this thread (>= 1 when live)
    const int C = H * D;
    const int c0 = g << 3;
    const int h = (unsigned int)c0 / (unsigned int)D;
    const Job jb = jobs[blockIdx.y];
    const unsigned char* pay = (const unsigned char*)jb.anchor;

    // Every load this thread needs is issued first, before the tables are filled and
    // before any use, so the codes, the row offsets and the metadata travel in one round
    // trip that also covers the tables' (the common case: TPT divides chunk_tokens and
    // page_tokens, so no metadata is reloaded in the loop).
    const long long e0 = (long long)t0 * G + g;  // index of the 8-group of (t0, c0)
    typename Fields<ABITS>::Word af[TPT];
    typename Fields<RBITS>::Word rf[TPT];
    const bool last = t0 + n == T && g == (int)G - 1;  // the payload's last 8-group
    Fields<ABITS>::load_tokens(pay + off_codes + e0 * ABITS, G * ABITS, n, last, af);
    // 6-bit residual fields: through shared memory (SixStage's warp form, or its thread
    // form: by 4-byte copies, or byte by byte where those cannot be used), or in
    // registers in kernels without SixStage
    constexpr bool SIX = SixStage::used(FULL, RBITS);
    const int lane = threadIdx.x & 31;
    unsigned char* six = s_six + (threadIdx.x >> 5) * SixStage::BYTES;  // this warp's
    const unsigned char* rp = (const unsigned char*)jb.residual + e0 * RBITS;
    unsigned int six_shift = 0;  // thread form: 8 * (rp mod 4), 0 when copied bytewise
    if (FULL) {
        if (STAGED) {
            if (live) SixStage::copy(six, rp - lane * 6, G * 6, lane);
        } else if (SIX) {
            if (SixStage::thread_usable(rp, G * 6, last)) {
                six_shift = ((unsigned int)(size_t)rp & 2u) * 8u;
                SixStage::copy_thread((unsigned int*)s_six, rp, G * 6, n);
            } else {
                SixStage::copy_thread_bytes((unsigned int*)s_six, rp, G * 6, n);
            }
        } else {
            Fields<RBITS>::load_tokens(rp, G * RBITS, n, last, rf);
        }
    } else {
#pragma unroll
        for (int j = 0; j < TPT; ++j) rf[j] = 0;
    }
    constexpr bool AFFINE = ROWS == ROWS_AFFINE;
    typename RowOf<ROWS>::type ro[TPT];
#pragma unroll
    for (int j = 0; j < TPT; ++j) {
        if (ROWS == ROWS_TABLE) ro[j] = j < n ? __ldg(row_off + t0 + j) : -1;
        if (ROWS == ROWS_UNITS) ro[j] = j < n ? __ldg((const int*)row_off + t0 + j) : -1;
    }
    unsigned char tmu[TPT], tsig[TPT];  // BY_TOKEN && U8: the token's fields
    __half hmu[TPT], hsig[TPT];         // BY_TOKEN && !U8
    if (BY_TOKEN) {
        const long long o = (long long)t0 * H + h;
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            if (j < n) {
                if (U8) {
                    tmu[j] = __ldg(pay + off_mu + o + j * H);
                    tsig[j] = __ldg(pay + off_sigma + o + j * H);
                } else {
                    hmu[j] = __ldg((const __half*)(pay + off_mu) + o + j * H);
                    hsig[j] = __ldg((const __half*)(pay + off_sigma) + o + j * H);
                }
            }
        }
    }
    // The first token's page and chunk metadata, as loaded (converted after the barrier,
    // so that no instruction waits on them before the tables are filled); later tokens
    // reload only past the end of that page or chunk (compared, not divided).
    uint4 rmin = make_uint4(0, 0, 0, 0), rscl = rmin, rmu = rmin, rsig = rmin;
    uint2 umu = make_uint2(0, 0), usig = umu;
    int page_end = 0, chunk_end = 0;
    if (live) {
        const int page = (unsigned int)t0 / (unsigned int)page_tokens;
        page_end = (page + 1) * page_tokens;
        if (PAGE) {
            const long long o = ((long long)page * C + c0) * 2;
            rmin = load_raw8(pay + o);
            rscl = load_raw8(pay + off_scale + o);
        }
        if (!BY_TOKEN) {
            const int chunk = (unsigned int)t0 / (unsigned int)chunk_tokens;
            chunk_end = (chunk + 1) * chunk_tokens;
            const long long o = (long long)chunk * C + c0;
            load_chunk_raw<U8>(pay, off_mu, off_sigma, o, umu, usig, rmu, rsig);
        }
    }

    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        s_lev[i] = tables[i];
        if (U8) {
            s_mu[i] = tables[256 + i];
            s_sig[i] = tables[512 + i];
        }
    }
    if (SIX) cp_async_wait();
    __syncthreads();
    if (!live) return;

    float pmin[8], pscl[8], cmu[8], csig[8];
    if (PAGE) page_values(rmin, rscl, pmin, pscl);
    if (!BY_TOKEN) chunk_values<U8>(umu, usig, rmu, rsig, s_mu, s_sig, cmu, csig);
    OutT* dst = (OutT*)jb.dst + h * stride_h + (c0 - h * D);
    if (AFFINE) dst += row0 + (long long)t0 * row_step;  // row j: j * row_step further
    // token j's row offset from dst (-1: skip)
    auto row = [&](int j) -> long long {
        if (ROWS == ROWS_UNITS) return (long long)ro[j] * (16 / sizeof(OutT));
        return AFFINE ? j * row_step : (long long)ro[j];
    };
    // token j's 8 values from its fields and the current metadata
    auto values = [&](int j, float* v) {
        if (BY_TOKEN) {  // one value for the head's D channels
            const float m = U8 ? s_mu[tmu[j]] : __half2float(hmu[j]);
            const float sg = __fadd_rn(U8 ? s_sig[tsig[j]] : __half2float(hsig[j]), EPS);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                cmu[i] = m;
                csig[i] = sg;
            }
        }
        unsigned int lev_off[8];
        if (STAGED) {
            rf[j] = SixStage::fields(six, lane, j);
        } else if (SIX) {
            rf[j] = SixStage::fields_thread((const unsigned int*)s_six, j, six_shift);
        }
        level_offsets<ABITS, RBITS, FULL>(af[j], rf[j], lev_off);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const unsigned int idx = lev_off[i];
            const float lev =
                SKELETON ? 0.0f : *(const float*)((const unsigned char*)s_lev + idx);
            if (SKELETON) {  // bench only: the memory traffic without lookups or arithmetic
                v[i] = __uint_as_float(idx);
            } else if (PAGE) {  // xn = mu + (sigma + EPS) * y;  x = g_min + (g_scale + EPS) * xn
                const float xn = __fadd_rn(cmu[i], __fmul_rn(csig[i], lev));
                v[i] = __fadd_rn(pmin[i], __fmul_rn(pscl[i], xn));
            } else {  // x = min + (u / 255) * (scale + EPS)
                v[i] = __fadd_rn(cmu[i], __fmul_rn(lev, csig[i]));
            }
        }
    };
    const bool one_chunk = BY_TOKEN || t0 + TPT <= chunk_end;
    if (n == TPT && one_chunk && (!PAGE || t0 + TPT <= page_end)) {
        // the common case: TPT tokens under one page's and one chunk's metadata
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            float v[8];
            values(j, v);
            if (AFFINE || ro[j] >= 0) store8(dst + row(j), v);  // paged: slot -1 skipped
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < TPT; ++j) {
        const int t = t0 + j;
        if (j >= n) break;
        if (!AFFINE && ro[j] < 0) continue;
        if (PAGE && t >= page_end) {
            const int page = t / page_tokens;
            page_end = (page + 1) * page_tokens;
            load_page(pay, off_scale, ((long long)page * C + c0) * 2, pmin, pscl);
        }
        if (!BY_TOKEN && t >= chunk_end) {
            const int chunk = t / chunk_tokens;
            chunk_end = (chunk + 1) * chunk_tokens;
            const long long o = (long long)chunk * C + c0;
            load_chunk<U8>(pay, off_mu, off_sigma, o, s_mu, s_sig, cmu, csig);
        }
        float v[8];
        values(j, v);
        store8(dst + row(j), v);
    }
}

template <typename OutT, int ABITS, int RBITS, bool FULL, bool PAGE, bool BY_TOKEN, bool U8,
          int ROWS>
__global__ void __launch_bounds__(256, MIN_BLOCKS) dequant(
    const Job* __restrict__ jobs, const long long* __restrict__ row_off,
    const float* __restrict__ tables, int T, int H, int D, int chunk_tokens, int page_tokens,
    long long off_scale, long long off_mu, long long off_sigma, long long off_codes,
    long long stride_h, int items_per_job, long long row0, long long row_step) {
    __shared__ float s_lev[256];
    __shared__ float s_mu[U8 ? 256 : 1];
    __shared__ float s_sig[U8 ? 256 : 1];
    constexpr bool SIX = SixStage::used(FULL, RBITS);
    __shared__ __align__(16) unsigned char s_six[SIX ? SixStage::BLOCK_BYTES : 16];
    // Two compiled bodies, so that the staged one holds no residual words in registers
    // across the barrier; the choice is the same for the whole block (it has a barrier).
    auto body = [&](auto staged) {
        dequant_body<OutT, ABITS, RBITS, FULL, PAGE, BY_TOKEN, U8, ROWS, decltype(staged)::value>(
            jobs, row_off, tables, T, H, D, chunk_tokens, page_tokens, off_scale, off_mu,
            off_sigma, off_codes, stride_h, items_per_job, row0, row_step, s_lev, s_mu,
            s_sig, s_six);
    };
    if (SIX && SixStage::block_usable(jobs[blockIdx.y].residual, T, H * D >> 3,
                                      items_per_job)) {
        body(Flag<true>{});
    } else {
        body(Flag<false>{});
    }
}
"""
)


def kernel_name(
    out: str,
    a_bits: int,
    r_bits: int,
    full: bool,
    page: bool,
    by_token: bool,
    u8: bool,
    rows: int = ROWS_TABLE,
) -> str:
    """The C++ name of one instantiation (``out``: ``float``, ``__nv_bfloat16``, ``__half``;
    ``rows``: ``ROWS_TABLE``, ``ROWS_AFFINE`` or ``ROWS_UNITS``)."""
    flags = ", ".join("true" if f else "false" for f in (full, page, by_token, u8))
    return f"dequant<{out}, {a_bits}, {r_bits}, {flags}, {rows}>"
