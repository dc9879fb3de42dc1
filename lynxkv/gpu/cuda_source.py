"""CUDA C++ source of the dequantizing kernels (compiled by CuPy's NVRTC at first use).

One kernel template serves the lynx and uniform codecs, anchor-only and full decodes,
both layouts and three output types. Design for memory bandwidth (docs: bench/gpu.py):

* one launch per (codec variant, K or V) for a whole batch of sections: a section of
  256 tokens is only ~100 KB of output, far too small to fill the GPU alone, so a job
  table gives each section's payload pointers and destination base;
* a thread owns 8 consecutive channels (one packed group: ``BITS`` bytes, a 32-bit load
  for 4-bit fields) of ``TPT`` consecutive tokens; it issues all its code loads before
  using any, keeps the per-channel metadata in registers while the page or chunk does
  not change, and stores its 8 outputs as one 16-byte vector (two for float32);
* lookup tables (signed level per field index, u8 mu and sigma) live in shared memory;
* the destination row of each token comes from ``row_off`` (``-1``: skip), so one
  kernel writes the ``hnd`` layout (a token offset) and vLLM's ``paged`` layout
  (``slot_mapping``) alike.

Arithmetic: float32 with explicit round-to-nearest intrinsics (``__fadd_rn``,
``__fmul_rn``) so that the compiler contracts nothing into an FMA: each value is
computed by the same float32 operations, in the same order, as the numpy reference
(``lynxkv.gpu.tables`` states them), hence bit-identical before the final rounding to
bf16 / fp16 (round-to-nearest-even, as torch's ``.to``).

Tuning (H200, bench/gpu.py ``--variants``, lynx-a4 bf16, 2026-11-30): the kernel holds
~110 registers at its natural allocation, so only 2 blocks of 256 fit an SM; capping
it at 3 blocks (85 registers, no spills) measured best: decode 0.53 and refine 0.40 of
copy bandwidth, against 0.45 / 0.32 uncapped; 4 blocks (64 registers) spills; 16 tokens
per thread was worse (0.24), 4 about equal. The targets (0.75) are not reached yet:
see bench/results/gpu.txt.
"""

from __future__ import annotations

__all__ = ["MIN_BLOCKS", "SOURCE", "TOKENS_PER_THREAD", "kernel_name"]

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
#define EPS 1e-6f  // lynxkv.codec.codes.EPS, float32

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
__device__ __forceinline__ typename WordOf<(BITS <= 4)>::type load_fields(const unsigned char* p) {
    if (BITS == 4 && ((size_t)p & 3) == 0) return __ldg((const unsigned int*)p);
    if (BITS == 2 && ((size_t)p & 1) == 0) return __ldg((const unsigned short*)p);
    // odd widths, or a short last tensor's unaligned codes: byte by byte
    typedef typename WordOf<(BITS <= 4)>::type Word;
    Word w = 0;
#pragma unroll
    for (int i = 0; i < BITS; ++i) w |= (Word)__ldg(p + i) << (8 * i);
    return w;
}

// 8 consecutive f16 (16-byte aligned) to float.
__device__ __forceinline__ void load_half8(const unsigned char* p, float* out) {
    uint4 u = __ldg((const uint4*)p);
    const __half2* h = (const __half2*)&u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Page metadata of 8 channels: g_min and g_scale + EPS.
__device__ __forceinline__ void load_page(
    const unsigned char* pay, long long off_scale, long long o, float* pmin, float* pscl) {
    load_half8(pay + o, pmin);
    load_half8(pay + off_scale + o, pscl);
#pragma unroll
    for (int i = 0; i < 8; ++i) pscl[i] = __fadd_rn(pscl[i], EPS);
}

// Per-channel chunk metadata of 8 channels (element index o of [Q, C]): mu, sigma + EPS.
template <bool U8>
__device__ __forceinline__ void load_chunk(
    const unsigned char* pay, long long off_mu, long long off_sigma, long long o,
    const float* s_mu, const float* s_sig, float* cmu, float* csig) {
    if (U8) {
        uint2 um = __ldg((const uint2*)(pay + off_mu + o));
        uint2 us = __ldg((const uint2*)(pay + off_sigma + o));
        const unsigned char* bm = (const unsigned char*)&um;
        const unsigned char* bs = (const unsigned char*)&us;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            cmu[i] = s_mu[bm[i]];
            csig[i] = s_sig[bs[i]];
        }
    } else {
        load_half8(pay + off_mu + 2 * o, cmu);
        load_half8(pay + off_sigma + 2 * o, csig);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) csig[i] = __fadd_rn(csig[i], EPS);
}

__device__ __forceinline__ void store8(float* dst, const float* v) {
    ((float4*)dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4*)dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* dst, const float* v) {
    uint4 u;
    __nv_bfloat162* p = (__nv_bfloat162*)&u;
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *(uint4*)dst = u;
}
__device__ __forceinline__ void store8(__half* dst, const float* v) {
    uint4 u;
    __half2* p = (__half2*)&u;
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *(uint4*)dst = u;
}

// PAGE: lynx (page stage g_min/g_scale); BY_TOKEN: chunk metadata [T, H] (else [Q, C]);
// U8: chunk metadata fields are u8 looked up in tables (else f16); FULL: anchor and
// residual (field index = anchor << RBITS | residual), else the anchor alone.
template <typename OutT, int ABITS, int RBITS, bool FULL, bool PAGE, bool BY_TOKEN, bool U8>
__global__ void __launch_bounds__(256, MIN_BLOCKS) dequant(
    const Job* __restrict__ jobs, const long long* __restrict__ row_off,
    const float* __restrict__ tables,  // [3][256]: level, u8 mu, u8 sigma
    int T, int H, int D, int chunk_tokens, int page_tokens,
    long long off_scale, long long off_mu, long long off_sigma, long long off_codes,
    long long stride_h, int items_per_job) {
    __shared__ float s_lev[256];
    __shared__ float s_mu[U8 ? 256 : 1];
    __shared__ float s_sig[U8 ? 256 : 1];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        s_lev[i] = tables[i];
        if (U8) {
            s_mu[i] = tables[256 + i];
            s_sig[i] = tables[512 + i];
        }
    }
    __syncthreads();

    // One job (section) per grid row: no 64-bit division to find it.
    const int item = blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= items_per_job) return;
    const int C = H * D;
    const int G = C >> 3;
    const int g = item % G;
    const int t0 = (item / G) * TPT;
    const int c0 = g << 3;
    const int h = c0 / D;
    const Job jb = jobs[blockIdx.y];
    const unsigned char* pay = (const unsigned char*)jb.anchor;
    const unsigned char* res = (const unsigned char*)jb.residual;
    OutT* dst = (OutT*)jb.dst + h * stride_h + (c0 - h * D);

    // Every load this thread needs is issued before the first use, so the codes, the
    // row offsets and the metadata travel in one round trip (the common case: TPT
    // divides chunk_tokens and page_tokens, so no metadata is reloaded in the loop).
    typename WordOf<(ABITS <= 4)>::type af[TPT];
    typename WordOf<(RBITS <= 4)>::type rf[TPT];
    long long ro[TPT];
    unsigned char tmu[TPT], tsig[TPT];  // BY_TOKEN && U8: the token's fields
    __half hmu[TPT], hsig[TPT];         // BY_TOKEN && !U8
#pragma unroll
    for (int j = 0; j < TPT; ++j) {
        const int t = t0 + j;
        af[j] = rf[j] = 0;
        ro[j] = -1;
        if (t < T) {
            const long long e8 = ((long long)t * C + c0) >> 3;  // index of the 8-group
            af[j] = load_fields<ABITS>(pay + off_codes + e8 * ABITS);
            if (FULL) rf[j] = load_fields<RBITS>(res + e8 * RBITS);
            ro[j] = __ldg(row_off + t);
            if (BY_TOKEN) {
                const long long o = (long long)t * H + h;
                if (U8) {
                    tmu[j] = __ldg(pay + off_mu + o);
                    tsig[j] = __ldg(pay + off_sigma + o);
                } else {
                    hmu[j] = __ldg((const __half*)(pay + off_mu) + o);
                    hsig[j] = __ldg((const __half*)(pay + off_sigma) + o);
                }
            }
        }
    }

    float pmin[8], pscl[8], cmu[8], csig[8];
    // The first token's page and chunk metadata, unconditionally (t0 < T always), so
    // that these loads do not wait on ``row_off`` in the loop; later tokens reload only
    // past the end of that page or chunk (compared, not divided: divisions by run-time
    // values cost tens of instructions).
    int page_end = (t0 / page_tokens + 1) * page_tokens;
    int chunk_end = (t0 / chunk_tokens + 1) * chunk_tokens;
    if (PAGE) load_page(pay, off_scale, ((long long)(t0 / page_tokens) * C + c0) * 2, pmin, pscl);
    if (!BY_TOKEN) {
        const long long o = (long long)(t0 / chunk_tokens) * C + c0;
        load_chunk<U8>(pay, off_mu, off_sigma, o, s_mu, s_sig, cmu, csig);
    }
#pragma unroll
    for (int j = 0; j < TPT; ++j) {
        const int t = t0 + j;
        if (t >= T) break;
        if (ro[j] < 0) continue;  // paged: slot -1
        if (PAGE && t >= page_end) {
            const int page = t / page_tokens;
            page_end = (page + 1) * page_tokens;
            load_page(pay, off_scale, ((long long)page * C + c0) * 2, pmin, pscl);
        }
        if (BY_TOKEN) {  // one value for the head's D channels
            const float m = U8 ? s_mu[tmu[j]] : __half2float(hmu[j]);
            const float sg = __fadd_rn(U8 ? s_sig[tsig[j]] : __half2float(hsig[j]), EPS);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                cmu[i] = m;
                csig[i] = sg;
            }
        } else if (t >= chunk_end) {
            const int chunk = t / chunk_tokens;
            chunk_end = (chunk + 1) * chunk_tokens;
            const long long o = (long long)chunk * C + c0;
            load_chunk<U8>(pay, off_mu, off_sigma, o, s_mu, s_sig, cmu, csig);
        }
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            unsigned int idx = (unsigned int)(af[j] >> (ABITS * i)) & ((1u << ABITS) - 1);
            if (FULL) {
                const unsigned int r = (unsigned int)(rf[j] >> (RBITS * i)) & ((1u << RBITS) - 1);
                idx = (idx << RBITS) | r;
            }
            const float lev = s_lev[idx];
            if (PAGE) {  // xn = mu + (sigma + EPS) * y;  x = g_min + (g_scale + EPS) * xn
                const float xn = __fadd_rn(cmu[i], __fmul_rn(csig[i], lev));
                v[i] = __fadd_rn(pmin[i], __fmul_rn(pscl[i], xn));
            } else {  // x = min + (u / 255) * (scale + EPS)
                v[i] = __fadd_rn(cmu[i], __fmul_rn(lev, csig[i]));
            }
        }
        store8(dst + ro[j], v);
    }
}
"""


def kernel_name(
    out: str, a_bits: int, r_bits: int, full: bool, page: bool, by_token: bool, u8: bool
) -> str:
    """The C++ name of one instantiation (``out``: ``float``, ``__nv_bfloat16``, ``__half``)."""
    flags = ", ".join("true" if f else "false" for f in (full, page, by_token, u8))
    return f"dequant<{out}, {a_bits}, {r_bits}, {flags}>"
