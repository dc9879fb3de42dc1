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
* 2- and 4-bit fields are one 16- or 32-bit load per token, 6-bit fields three 16-bit
  loads (six byte loads before: lynx-a2 refine 0.58 -> 0.67).

Arithmetic: float32 with explicit round-to-nearest intrinsics (``__fadd_rn``,
``__fmul_rn``) so that the compiler contracts nothing into an FMA: each value is
computed by the same float32 operations, in the same order, as the numpy reference
(``lynxkv.gpu.tables`` states them), hence bit-identical before the final rounding to
bf16 / fp16 (round-to-nearest-even, as torch's ``.to``).

Tuning (H200, bf16, 2026-11-30; bench/gpu_variants.py times compiled variants side by
side, each checked bit for bit first; GPU time of the launches alone): this kernel runs
at 0.84-0.92 of copy bandwidth for decode_anchor and 0.80-0.87 for refine_residual
(lynx-a2's refine 0.64-0.67); a bare streaming kernel with the same mix of reads and
writes reaches 0.94-0.96, and this kernel with its arithmetic and table lookups removed
(``-DSKELETON=1``) 0.93-0.99 (lynx-a2 refine 0.83). Kept: 3 blocks of 256 per SM (80
registers), 8 tokens a thread. Measured against it and not kept: 2 blocks (-0.10 to
+0.01), 4 tokens with 4 blocks (-0.08 to +0.02), 16 tokens with 2 blocks (-0.12 to
+0.06, mostly negative), streaming stores (``-DSTORE_CS=1``: equal to -0.02), threads
in the hnd destination's order (-0.02 to -0.05), predicated stores (within 0.01), 32
bank-spread copies of the 256-entry table (refine -0.01 to -0.06), a persistent grid
loading one item ahead (it spilled; 0.55 against 0.63 under the earlier timing).
Earlier figures for this kernel (0.49-0.67) timed the host's launch work too
(docs/benchmarks.md).

Known gap: CuPy hands NVRTC ``-ftz=true`` after the caller's options (cupy/cupy#9576),
so float32 arithmetic here flushes subnormals: a decoded value below 2^-126 in magnitude
comes out as zero where the numpy decoder keeps it (the bit-for-bit claim holds above).
"""

from __future__ import annotations

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

SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef MIN_BLOCKS
#define MIN_BLOCKS 3  // blocks per SM the register budget must allow; MIN_BLOCKS
#endif
#ifndef TPT
#define TPT 8  // tokens per thread; TOKENS_PER_THREAD
#endif
#ifndef STORE_CS
#define STORE_CS 0  // 1: streaming (evict-first) stores
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
    // 4-bit fields: one 32-bit load; 2-bit: one 16-bit load; 6-bit: three 16-bit loads,
    // when the address allows it (every token's stride keeps the first one's alignment)
    static constexpr bool WIDE = BITS == 4 || BITS == 2 || BITS == 6;

    static __device__ __forceinline__ bool aligned(const unsigned char* p) {
        return WIDE && ((size_t)p & (BITS == 4 ? 3 : 1)) == 0;
    }

    template <bool ALIGNED>
    static __device__ __forceinline__ Word load(const unsigned char* p) {
        if (ALIGNED && BITS == 4) return __ldg((const unsigned int*)p);
        if (ALIGNED && BITS == 2) return __ldg((const unsigned short*)p);
        if constexpr (BITS == 6) {  // three 16-bit loads instead of six byte loads
            if (ALIGNED) {
                const unsigned short* q = (const unsigned short*)p;
                return (Word)__ldg(q) | (Word)__ldg(q + 1) << 16 | (Word)__ldg(q + 2) << 32;
            }
        }
        Word w = 0;  // odd widths, or a short last tensor's unaligned codes: byte by byte
#pragma unroll
        for (int i = 0; i < BITS; ++i) w |= (Word)__ldg(p + i) << (8 * i);
        return w;
    }

    // The fields of tokens 0..n-1 (0 past n), ``stride`` bytes apart from ``p``. The
    // address check is done once here, not per token (every stride keeps alignment).
    static __device__ __forceinline__ void load_tokens(
        const unsigned char* p, int stride, int n, Word* w) {
        if (aligned(p)) {
#pragma unroll
            for (int j = 0; j < TPT; ++j) w[j] = j < n ? load<true>(p + j * stride) : 0;
        } else {
#pragma unroll
            for (int j = 0; j < TPT; ++j) w[j] = j < n ? load<false>(p + j * stride) : 0;
        }
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
template <bool U8>
__device__ __forceinline__ void load_chunk(
    const unsigned char* pay, long long off_mu, long long off_sigma, long long o,
    const float* s_mu, const float* s_sig, float* cmu, float* csig) {
    uint2 um = make_uint2(0, 0), us = um;
    uint4 rm = make_uint4(0, 0, 0, 0), rs = rm;
    if (U8) {
        um = __ldg((const uint2*)(pay + off_mu + o));
        us = __ldg((const uint2*)(pay + off_sigma + o));
    } else {
        rm = load_raw8(pay + off_mu + 2 * o);
        rs = load_raw8(pay + off_sigma + 2 * o);
    }
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

// The level-table index of each of 8 values: its anchor field, or for the full code
// ``anchor << RBITS | residual``.
template <int ABITS, int RBITS, bool FULL, typename AW, typename RW>
__device__ __forceinline__ void level_indices(AW a, RW r, unsigned int* idx) {
    if (FULL && ABITS == 4 && RBITS == 4) {
        // byte k of lo (hi) is the index of value 2k (2k + 1): nibbles merged by word ops
        const unsigned int aw = (unsigned int)a, rw = (unsigned int)r;
        const unsigned int lo = (aw << 4 & 0xF0F0F0F0u) | (rw & 0x0F0F0F0Fu);
        const unsigned int hi = (aw & 0xF0F0F0F0u) | (rw >> 4 & 0x0F0F0F0Fu);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            idx[2 * k] = lo >> (8 * k) & 0xFFu;
            idx[2 * k + 1] = hi >> (8 * k) & 0xFFu;
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        idx[i] = (unsigned int)(a >> (ABITS * i)) & ((1u << ABITS) - 1);
        if (FULL) {
            const unsigned int rr = (unsigned int)(r >> (RBITS * i)) & ((1u << RBITS) - 1);
            idx[i] = idx[i] << RBITS | rr;
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
          int ROWS>
__global__ void __launch_bounds__(256, MIN_BLOCKS) dequant(
    const Job* __restrict__ jobs, const long long* __restrict__ row_off,
    const float* __restrict__ tables,  // [3][256]: level, u8 mu, u8 sigma
    int T, int H, int D, int chunk_tokens, int page_tokens,
    long long off_scale, long long off_mu, long long off_sigma, long long off_codes,
    long long stride_h, int items_per_job, long long row0, long long row_step) {
    __shared__ float s_lev[256];
    __shared__ float s_mu[U8 ? 256 : 1];
    __shared__ float s_sig[U8 ? 256 : 1];

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
    Fields<ABITS>::load_tokens(pay + off_codes + e0 * ABITS, G * ABITS, n, af);
    if (FULL) {
        const unsigned char* res = (const unsigned char*)jb.residual;
        Fields<RBITS>::load_tokens(res + e0 * RBITS, G * RBITS, n, rf);
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
            if (U8) {
                umu = __ldg((const uint2*)(pay + off_mu + o));
                usig = __ldg((const uint2*)(pay + off_sigma + o));
            } else {
                rmu = load_raw8(pay + off_mu + 2 * o);
                rsig = load_raw8(pay + off_sigma + 2 * o);
            }
        }
    }

    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        s_lev[i] = tables[i];
        if (U8) {
            s_mu[i] = tables[256 + i];
            s_sig[i] = tables[512 + i];
        }
    }
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
        unsigned int lev_idx[8];
        level_indices<ABITS, RBITS, FULL>(af[j], rf[j], lev_idx);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const unsigned int idx = lev_idx[i];
            const float lev = SKELETON ? 0.0f : s_lev[idx];
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
"""


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
