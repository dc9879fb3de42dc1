"""CUDA C++ source of the encoding kernel (compiled by CuPy's NVRTC at first use).

One block quantizes one (page, kv head) tile of one section: ``page_tokens`` tokens
(256 for uniform, whose groups need no page) by the head's D channels. A warp owns one
32-token chunk; a lane owns 8 consecutive channels of D/8 consecutive tokens, so the
lanes of one token and head are D/8 neighbours (per-token statistics are a few
shuffles) and the lanes of one channel are the warp's other token runs (per-chunk
statistics are a few more). The tile is copied global -> shared once (``cp.async``,
every load of a thread in flight together) and read from there by both passes:

1. chunk minima and maxima per channel (and the input check: NaN, inf, |x| > 30000);
   with lynx, one thread a channel reduces them over the block's warps to the page's
   extremes and its metadata, left in shared memory for the lanes;
2. the chunk metadata, rounded to their stored precision first (as the numpy codec
   does; per-channel chunks: half the channels by each of two lanes, per-token chunks:
   two tokens a step, one reduced and described by each lane of a pair), then every
   element's fields, 8 at a time: codes and signs gathered 4 to a word, split into
   anchor and residual fields byte-parallel.

Arithmetic: float32 with explicit round-to-nearest intrinsics (no FMA contraction), in
the numpy codec's order. The two transcendental steps read decision tables built from
numpy's own functions (``lynxkv.gpu.encode_tables``): a fast approximate code, the
field or one below it, is decided by one threshold read, so the result is numpy's
wherever numpy's function is monotone. The lynx code's read compares y = (xn - mu) /
(sigma + EPS) with a threshold without forming y (``code_bits``), and where the host
allows it (``code_round``) a value far enough from every step takes its rounded
estimate and reads nothing. Chunk extremes of ``xn`` come from the
extremes of ``x`` (the map is monotone), so only lynx-a4-paper's mean needs another
sweep (one lane per channel, in token order, to add in numpy's order).

Divisions by a shared divisor (per channel or token) take its reciprocal once and per
element only div.rn's fast path (``div_fast``), exact for the operand range it accepts;
where a proof covers every division of a lane, pass 2 runs a copy without checks.

Measured (H200, bench/gpu.py, 2026-11-30 13:30 UTC at 2fb477c, GPU time of the
launches, K's and V's kernels on two streams as encode() runs them): 0.605 of copy
bandwidth for lynx-a4, 0.81 for uniform-a4, 0.49 for lynx-a4-paper, with no field
differing from numpy's on the sampled sections; the target is 0.60. ``ncu``
(bench/gpu_profile.py, at 942eb81, before 97df4c3's 4-byte table entries): lynx-a4 27.7
(K) and 29.2 (V) instructions an element (30.7 / 36.1 at b3ee5ac), with the L1/shared
pipe at 83% of its throughput: the table reads' wavefronts, not the instructions, bound
K since. docs/benchmarks.md has each step and the reading.

Known gap: CuPy hands NVRTC ``-ftz=true`` after the caller's options (cupy/cupy#9576;
the SASS on the H200 reads FADD.FTZ), so float32 arithmetic here flushes subnormals:
values below 2^-126 in magnitude (not met in KV caches so far, but possible) may be
coded differently from numpy. The decoding kernel shares it.
"""

from __future__ import annotations

from lynxkv.gpu.async_copy import ASYNC_COPY

__all__ = ["ENC_MIN_BLOCKS", "SOURCE", "kernel_name"]

#: Blocks per SM the kernel's register budget allows by default (``ENC_MIN_BLOCKS``).
ENC_MIN_BLOCKS = 3

SOURCE = (
    r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
"""
    + ASYNC_COPY
    + r"""

#define EPS 1e-6f          // lynxkv.codec.codes.EPS
#define MAX_ABS 30000.0f   // lynxkv.codec.sections.MAX_ABS
#define CODE_TABLE 128     // encode_tables.CODE_TABLE
#define TABLES (CODE_TABLE + 512)
#define SIGMA_STEPS 16.0f  // lynxkv.codec.lynx.SIGMA_U8_STEPS
#define SIGMA_BIAS 239.0f  // lynxkv.codec.lynx.SIGMA_U8_BIAS
#define FULL 0xffffffffu
#ifndef ENC_UNROLL
#define ENC_UNROLL (BY_TOKEN ? 1 : 2)  // tokens in the body of pass 2's loop (H200:
                                     // per-token chunks 1, per-channel 2, by 4-6%)
#endif
#define PRAGMA(x) _Pragma(#x)
#define UNROLL(n) PRAGMA(unroll n)
#ifndef ENC_SPLIT
#define ENC_SPLIT 1  // per-channel lynx chunks: two lanes share a chunk's metadata work
#endif
#ifndef ENC_MIN_BLOCKS
#define ENC_MIN_BLOCKS 3  // blocks per SM the register budget must allow (a lynx tile
                          // takes ~75 KB of shared memory: 3 fit)
#endif
#define INF __int_as_float(0x7f800000)  // NVRTC has no <math.h> INFINITY

struct EncJob {
    // device addresses: element (t=0, h=0, d=0) of the source, the anchor payload, the
    // residual payload
    unsigned long long src, anchor, residual;
};

// 8 consecutive values (16-byte aligned) to float.
__device__ __forceinline__ void get8(const __nv_bfloat16* p, float* v) {
    // bf16 is the high half of a float32: one shift or one mask a value (the intrinsic
    // pair conversion spends two instructions on the high value)
    const uint4 u = *(const uint4*)p;
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void get8(const __half* p, float* v) {
    const uint4 u = *(const uint4*)p;
    const __half2* h = (const __half2*)&u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void get8(const float* p, float* v) {
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float h2f(unsigned int bits) {
    return __half2float(__ushort_as_half((unsigned short)bits));
}
// float16 bits rounded towards -inf / +inf (codes.f16_down / f16_up: numpy's nextafter)
__device__ __forceinline__ unsigned int f16_down(float x) {
    unsigned int b = __half_as_ushort(__float2half_rn(x));
    if (h2f(b) > x) b = (b & 0x7fffu) == 0 ? 0x8001u : ((b & 0x8000u) ? b + 1 : b - 1);
    return b;
}
__device__ __forceinline__ unsigned int f16_up(float x) {
    unsigned int b = __half_as_ushort(__float2half_rn(x));
    if (h2f(b) < x) b = (b & 0x7fffu) == 0 ? 0x0001u : ((b & 0x8000u) ? b - 1 : b + 1);
    return b;
}

// N = 4 or 8 float16 (bits) at a 2-byte aligned address, in one store where aligned.
template <int N>
__device__ __forceinline__ void store_halves(unsigned char* p, const unsigned int* b) {
    if (((size_t)p & (2 * N - 1)) == 0) {
        const unsigned int w0 = b[0] | b[1] << 16, w1 = b[2] | b[3] << 16;
        if (N == 8) {
            *(uint4*)p = make_uint4(w0, w1, b[4 % N] | b[5 % N] << 16, b[6 % N] | b[7 % N] << 16);
        } else {
            *(uint2*)p = make_uint2(w0, w1);
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) ((unsigned short*)p)[i] = (unsigned short)b[i];
    }
}
// N = 4 or 8 bytes (the low bytes of b), in one store where aligned.
template <int N>
__device__ __forceinline__ void store_bytes(unsigned char* p, const unsigned int* b) {
    if (((size_t)p & (N - 1)) == 0) {
        const unsigned int w0 = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24;
        if (N == 8) {
            *(uint2*)p = make_uint2(w0, b[4 % N] | b[5 % N] << 8 | b[6 % N] << 16 | b[7 % N] << 24);
        } else {
            *(unsigned int*)p = w0;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) p[i] = (unsigned char)b[i];
    }
}

// 8 fields of BITS bits (bitpack.py: a little-endian bit stream) as BITS bytes; ``p`` is
// aligned to BITS bytes for BITS in {2, 4, 8} (the code planes are 16-byte aligned).
template <int BITS>
__device__ __forceinline__ void store_fields(unsigned char* p, const unsigned int* f) {
    unsigned long long w = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) w |= (unsigned long long)f[i] << (BITS * i);
    if (BITS == 4) {
        *(unsigned int*)p = (unsigned int)w;
    } else if (BITS == 2) {
        *(unsigned short*)p = (unsigned short)w;
    } else if (BITS == 8) {
        *(uint2*)p = make_uint2((unsigned int)w, (unsigned int)(w >> 32));
    } else {
#pragma unroll
        for (int b = 0; b < BITS; ++b) p[b] = (unsigned char)(w >> (8 * b));
    }
}

// 8 fields of BITS bits given as the bytes of the even (0, 2, 4, 6) and odd values.
template <int BITS>
__device__ __forceinline__ void store_packed(unsigned char* p, unsigned int ev, unsigned int od) {
    if (BITS == 4) {
        *(unsigned int*)p = ev | od << 4;
    } else {
        unsigned int f[8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            f[2 * k] = ev >> 8 * k & 0xffu;
            f[2 * k + 1] = od >> 8 * k & 0xffu;
        }
        store_fields<BITS>(p, f);
    }
}

// The u8 sigma field of a spread: the largest k with thr[k] <= spread (thr[0] = 0).
// Its steps are where u = log2(spread) * SIGMA_STEPS + SIGMA_BIAS + 1/2 crosses k - 1/2,
// so f = floor(u), from an approximate log2 (u within 1/2 of exact), is k or k - 1
// (encode_tables.sigma_estimate; clamped, as k is, to the table).
__device__ __forceinline__ int sigma_index(float spread, const float* thr) {
    float l;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l) : "f"(spread));  // -inf for 0
    const int f = __float2int_rd(__fmaf_rn(l, SIGMA_STEPS, SIGMA_BIAS + 0.5f));
    const int k = min(max(f, 0), 254);
    return k + (spread >= thr[k + 1]);
}

// Round-to-nearest-even of r in [0, 2^22) by one float add (what rintf gives, without
// the conversion pipe's FRND and F2I): the integer is in the low bits of the sum.
#define MAGIC 12582912.0f  // 1.5 * 2^23
__device__ __forceinline__ int rint_small(float r) {
    return __float_as_int(__fadd_rn(r, MAGIC)) - __float_as_int(MAGIC);
}

// The magnitude code of |y|, y = fl(a / s) as numpy divides (s = sigma + EPS > 0, and
// |y| <= 1), without the division, as 255 - code in the low byte of the result. Its
// steps are where e = log2(1 + alpha |y|) * scale crosses k - 1/2 (scale = top /
// log2(1 + alpha)), so f = floor(e), from an approximate e (within 1/2 of exact, from
// ar = alpha / s to a few ulps), is the code or the code - 1; the code is f + 1 where
// |y| >= T = thr[f + 1] (thr[0] = 0, thr[top + 1] = +inf; encode_tables.
// magnitude_estimate). One FMA rounding up onto MAGIC254 gives MAGIC254 - f exactly (f
// is small, >= -1), whose bits index the table (stored in reverse); the sign bit of the
// test below adds 1 where |y| < T (255 - f - 1 + 1 = 255 - f, the code f).
//
// The test, from the table's V = pred(T), the float below T (-1 for T = 0, +inf kept):
// fl(|a| / s) >= T exactly where |a| / s > M = V + ulp(V) / 2, the midpoint of V and T
// where the rounding turns (no float32 |a|, s put |a| / s on it: M has 25 significant
// bits), i.e. where |a| - V s - h s > 0, h = ulp(V) / 2 = 2^(e_V - 24), so h s = (V's
// exponent bits as a float) * (s * 2^-24). r1 = fl(|a| - V s), then r2 = fl(r1 - h s),
// two FMAs, has its sign: near M, |a| and V s are within a factor 2, so |a| - V s is a
// multiple of u = ulp(V) ulp(s) / 2 (the last bit of the exact product) and, below 2^24
// u, r1 is exact and r2 the correctly rounded difference, nonzero (a multiple of u / 4
// that is not 0), so its sign is kept; beyond, |r1| > 2 h s and the sign is r1's either
// way. Nothing is subnormal: s >= EPS and V >= pred(thr[1]) keep u / 4 >= 2^-126 while
// thr[1] >= 2^-58, and it is near 2^-24 for the largest alpha a codec takes (1e6;
// tests). The 4-byte entries matter: 8-byte (T, h) pairs, one read, cost more in shared
// memory wavefronts (random entries conflict) than the two integer operations saved.
#define MAGIC_BITS 0x4B400000u  // the bits of MAGIC
#define MAGIC254 12583166.0f    // MAGIC + 254
// ``thr_at`` is the shared-memory address of the V entries minus 4 * (MAGIC_BITS + 128)
// (mod 2^32): entry k = f + 1 is V[127 - k], at thr_at + 4 * b.
__device__ __forceinline__ unsigned int code_bits(float a, float s, float s24, float ar,
                                                  unsigned int thr_at, float scale) {
    float l, v;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l) : "f"(__fmaf_rn(ar, fabsf(a), 1.0f)));
    const unsigned int b = __float_as_uint(__fmaf_ru(l, -scale, MAGIC254));  // + 254 - f
    asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(thr_at + 4 * b));
    const float ve = __uint_as_float(__float_as_uint(v) & 0x7f800000u);  // 2^e_V
    const float r = __fmaf_rn(-ve, s24, __fmaf_rn(-v, s, fabsf(a)));
    return b + (__float_as_uint(r) >> 31);
}

// The code without the table, where the estimate allows it: round(e) (as code_bits,
// 255 - code in the low byte), and ``near`` set where e is within the margin of a step
// (|e - round(e)| >= half_m = 1/2 - encode_tables.certain_margin): outside it numpy's
// steps, within d_np of k - 1/2, and the estimate's error leave one code possible; a
// lane with a value near a step redoes its token's with code_bits.
#define MAGIC255 12583167.0f  // MAGIC + 255
__device__ __forceinline__ unsigned int code_round(float a, float ar, float scale,
                                                   float half_m, bool& near) {
    float l;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l) : "f"(__fmaf_rn(ar, fabsf(a), 1.0f)));
    const float rb = __fmaf_rn(l, -scale, MAGIC255);                // MAGIC255 - round(e)
    const float d = __fmaf_rn(l, scale, __fsub_rn(rb, MAGIC255));  // e - round(e)
    near |= !(fabsf(d) < half_m);
    return __float_as_uint(rb);
}

// prmt.b32 (default mode: a selector nibble with bit 3 set copies the sign of its byte).
__device__ __forceinline__ unsigned int prmt(unsigned int a, unsigned int b, unsigned int s) {
    unsigned int r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
    return r;
}
// One byte of each of 4 words as the bytes of one: their low bytes (LOW_BYTES), or 0xff
// where the word (a float) is negative and 0 elsewhere (SIGN_BYTES).
#define LOW_BYTES 0x0040u
#define SIGN_BYTES 0x00fbu
__device__ __forceinline__ unsigned int gather4(unsigned int a, unsigned int b, unsigned int c,
                                                unsigned int d, unsigned int sel) {
    return prmt(prmt(a, b, sel), prmt(c, d, sel), 0x5410u);
}

// The anchor and residual fields of 4 magnitude codes (bytes 255 - code of ``nc``) with
// the signs ``s`` (bytes 0xff where y < 0), 4 at a time in the bytes of a word (no byte
// carries: codes are <= 126): m = (code + 2^(R-1) - 1) >> R; anchor m, or -(m + 1) =
// ~m for y < 0, in ABITS bits; residual m * 2^R - code + 2^(R-1), in [1, 2^R). (The
// codes ~nc cost nothing: the two additions take -nc - 1 and nc + 1 as operands.)
template <int ABITS>
__device__ __forceinline__ void split4(unsigned int nc, unsigned int s, unsigned int& a,
                                       unsigned int& r) {
    const unsigned int c = ~nc;
    constexpr int R = 8 - ABITS;
    constexpr unsigned int ONES = 0x01010101u;
    const unsigned int x = c + ((1u << (R - 1)) - 1) * ONES;
    a = ((x >> R) ^ s) & (((1u << ABITS) - 1) * ONES);
    r = (x & ((0xffu << R) & 0xffu) * ONES) + (1u << (R - 1)) * ONES - c;
}

// Division by a divisor b shared by many dividends, rounded exactly as __fdiv_rn: the
// reciprocal and its Newton step once (rcp_step), then per dividend the fast path of
// div.rn.f32 (a product and one correction). That path is exact where the operands and
// quotient are far from the float32 range limits (what div.rn checks with FCHK): here b
// in [2^-40, 2^48] (rcp_ok) and a = 0 or |a| in [2^-40, 2^48]; div_slow flags the rest,
// and the caller redoes those with __fdiv_rn.
#define DIV_LO 0x2b800000u  // 2^-40
#define DIV_HI 0x57800000u  // 2^48
__device__ __forceinline__ float rcp_approx(float b) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(b));
    return y;
}
__device__ __forceinline__ float rcp_step(float b) {
    const float y = rcp_approx(b);
    return __fmaf_rn(y, __fmaf_rn(-b, y, 1.0f), y);
}
__device__ __forceinline__ bool rcp_ok(float b) {
    return __float_as_uint(b) - DIV_LO < DIV_HI - DIV_LO;  // positive, in range
}
__device__ __forceinline__ bool div_slow(float a) {
    const unsigned int m = __float_as_uint(a) & 0x7fffffffu;
    return m != 0 && m - DIV_LO >= DIV_HI - DIV_LO;
}
__device__ __forceinline__ float div_fast(float a, float b, float y) {
    const float q = __fmul_rn(a, y);
    return __fmaf_rn(y, __fmaf_rn(-b, q, a), q);
}
// q = (x - base) / d for N values, rounded as __fdiv_rn: div_fast with the reciprocals
// r, each dividend checked unless ``exact`` (a proof covers them all), and __fdiv_rn for
// all N when a dividend, or (``ok`` false) a divisor, is outside div_fast's range.
template <int N>
__device__ __forceinline__ void divn(const float* x, const float* base, const float* d,
                                     const float* r, bool ok, bool exact, float* q) {
    bool slow = !ok;
    if (exact) {
#pragma unroll
        for (int i = 0; i < N; ++i) q[i] = div_fast(__fsub_rn(x[i], base[i]), d[i], r[i]);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float a = __fsub_rn(x[i], base[i]);
            slow |= div_slow(a);
            q[i] = div_fast(a, d[i], r[i]);
        }
    }
    if (slow) {  // + 0 turns a -0 into +0, as div_fast's last FMA does
#pragma unroll
        for (int i = 0; i < N; ++i)
            q[i] = __fadd_rn(__fdiv_rn(__fsub_rn(x[i], base[i]), d[i]), 0.0f);
    }
}
__device__ __forceinline__ void div8(const float* x, const float* base, const float* d,
                                     const float* r, bool ok, bool exact, float* q) {
    divn<8>(x, base, d, r, ok, exact, q);
}

// The sums of a chunk's xn over its n tokens, per channel of the lane's 8 (``sum``), added
// in token order as numpy does. The 32 / (D / 8) lanes of a channel group (s = 0, 1, ..)
// split its 8 channels (up to 8 lanes, CPL channels each); each channel's sum is then
// read from the lane that made it. ``x``: the chunk's first row at the lane's channels.
template <typename InT, int D>
__device__ __forceinline__ void mean_sums(const InT* x, int n, int s, int g,
                                          const float* gmin, const float* gscl,
                                          const float* grcp, bool ok, bool exact, float* sum) {
    constexpr int GB = D / 8, NS = 32 / GB;     // lanes of a channel group
    constexpr int WORKERS = NS < 8 ? NS : 8;    // those that add
    constexpr int CPL = 8 / WORKERS;            // channels each
    float b[CPL], d[CPL], r[CPL], acc[CPL];    // the lane's channels: page metadata, sum
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
        b[k] = gmin[k];
        d[k] = gscl[k];
        r[k] = grcp[k];
#pragma unroll
        for (int w = 1; w < WORKERS; ++w) {
            if (s == w) {
                b[k] = gmin[w * CPL + k];
                d[k] = gscl[w * CPL + k];
                r[k] = grcp[w * CPL + k];
            }
        }
        acc[k] = 0.0f;
    }
    if (s < WORKERS) {
        const InT* p = x + s * CPL;
        for (int j = 0; j < n; ++j) {
            float v[CPL], xn[CPL];
#pragma unroll
            for (int k = 0; k < CPL; ++k) v[k] = to_float(p[j * D + k]);
            divn<CPL>(v, b, d, r, ok, exact, xn);
#pragma unroll
            for (int k = 0; k < CPL; ++k) acc[k] = __fadd_rn(acc[k], xn[k]);
        }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sum[i] = __shfl_sync(FULL, acc[i % CPL], (i / CPL) * GB + g);
}

template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// Pairs of 16-bit values: NaN-propagating minimum and maximum, two values an instruction.
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 a) { return __bfloat1622float2(a); }
__device__ __forceinline__ float2 to_float2(__half2 a) { return __half22float2(a); }
template <typename Two, unsigned int POS, unsigned int NEG>  // NEG, POS: -inf, +inf bits
struct PairOf {
    using T2 = Two;
    static constexpr unsigned int POS_INF = POS, NEG_INF = NEG;
    static __device__ __forceinline__ T2 bits(unsigned int w) { return *(const T2*)&w; }
    static __device__ __forceinline__ T2 splat(unsigned int b) { return bits(b * 0x10001u); }
    static __device__ __forceinline__ T2 min(T2 a, T2 b) { return __hmin2_nan(a, b); }
    static __device__ __forceinline__ T2 max(T2 a, T2 b) { return __hmax2_nan(a, b); }
};
template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> : PairOf<__nv_bfloat162, 0x7f80u, 0xff80u> {};
template <>
struct Pair<__half> : PairOf<__half2, 0x7c00u, 0xfc00u> {};

// LYNX: the lynx codec (page stage, log companding), else uniform. BY_TOKEN: chunk
// statistics per token over a head's D channels (else per channel over 32 tokens).
// U8: lynx chunk fields are u8 (else float16). MEAN: lynx chunks centred on their mean
// (else on the middle of their range). FAST: lynx codes from code_round where it can
// (the host's choice: where few values fall within its margin).
template <typename InT, int D, bool LYNX, int ABITS, bool BY_TOKEN, bool U8, bool MEAN,
          bool FAST>
__global__ void __launch_bounds__(256, ENC_MIN_BLOCKS) encode(
    const EncJob* __restrict__ jobs, const float* __restrict__ tables, int* __restrict__ status,
    int T, int H, int page_tokens, long long stride_t, long long stride_h,
    long long off_scale, long long off_mu, long long off_sigma, long long off_codes,
    float alpha, float scale, float half_m) {
    constexpr int RBITS = 8 - ABITS;
    constexpr int GB = D / 8;  // channel groups of a head = tokens per lane
    static_assert(D >= 8 && D <= 256 && (32 % GB) == 0, "head_dim must be 8 << n, <= 256");
    static_assert(!(MEAN && BY_TOKEN), "mean-centred per-token chunks are not supported");
    static_assert(LYNX || !MEAN, "uniform groups have no centre");

    extern __shared__ __align__(16) unsigned char smem[];
    float* s_thr = (float*)smem;         // [CODE_TABLE] code thresholds' pred, reversed
    float* s_sthr = s_thr + CODE_TABLE;  // [256] u8 sigma thresholds
    float* s_sig = s_sthr + 256;         // [256] u8 sigma values
    const int NW = blockDim.x >> 5;
    float* s_pmin = s_sig + 256;  // LYNX: [NW][D] chunk minima, then maxima
    float* s_pmax = s_pmin + NW * D;
    InT* tile = (InT*)(s_pmin + (LYNX ? 2 * NW * D : 0));  // [page_tokens][D]

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane % GB, s = lane / GB;
    const int h = blockIdx.x;
    const EncJob jb = jobs[blockIdx.z];
    unsigned char* const anchor = (unsigned char*)jb.anchor;
    unsigned char* const resid = (unsigned char*)jb.residual;
    const int C = H * D;
    const int d0 = g * 8, c0 = h * D + d0;
    const int tw = blockIdx.y * page_tokens + warp * 32;  // the warp's chunk
    const int row0 = warp * 32 + s * GB;                  // the lane's first tile row
    const int t0 = tw + s * GB;                           // and its token

    // A lane whose tokens are all in the section runs without a test per token (the
    // tested loops re-derive addresses in every token's branch); pass 2 runs the untested
    // loop where the whole warp's are (its lanes take one branch).
    const bool lane_full = t0 + GB <= T;
    const bool warp_full = __all_sync(FULL, lane_full);
    {
        const InT* from = (const InT*)jb.src + h * stride_h + d0 + (long long)t0 * stride_t;
        InT* dst = tile + row0 * D + d0;
        const int n = lane_full ? GB : max(0, min(GB, T - t0));
#pragma unroll
        for (int j = 0; j < GB; ++j) {
            if (j < n) {
                cp_async16(dst, from);
                if (sizeof(InT) == 4) cp_async16(dst + 4, from + 4);
            }
            from += stride_t;
            dst += D;
        }
    }
    cp_async_commit();
    // tables: T [CODE_TABLE], then the sigma thresholds and values [512]; here V = pred(T)
    // in reverse (code_bits), then the sigma tables
    for (int i = threadIdx.x; i < TABLES; i += blockDim.x) {
        const float t = tables[i];
        if (i >= CODE_TABLE) {
            s_thr[i] = t;
        } else {
            const unsigned int below = __float_as_uint(t) - 1;  // t > 0 finite: pred(t)
            s_thr[CODE_TABLE - 1 - i] = t == 0.0f ? -1.0f : t == INF ? t : __uint_as_float(below);
        }
    }
    cp_async_wait();
    __syncthreads();

    // Pass 1: extremes of the lane's tokens, then of the warp's chunk, per channel.
    float cmin[8], cmax[8];
    // The input check: NaN and inf are read off the extremes (16-bit sources take them
    // with NaN-propagating pair instructions, float32 with one FMA an element: x * 0 +
    // acc stays zero unless some x is NaN or infinite); |x| > MAX_ABS too.
    bool nan = false;
    if constexpr (sizeof(InT) == 2) {
        using P = Pair<InT>;
        typename P::T2 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = P::splat(P::POS_INF);
            hi[i] = P::splat(P::NEG_INF);
        }
        auto stats = [&](int j) {
            const uint4 u = *(const uint4*)(tile + (row0 + j) * D + d0);
            const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                lo[i] = P::min(lo[i], P::bits(w[i]));
                hi[i] = P::max(hi[i], P::bits(w[i]));
            }
        };
        if (lane_full) {
#pragma unroll
            for (int j = 0; j < GB; ++j) stats(j);
        } else {
#pragma unroll
            for (int j = 0; j < GB; ++j)
                if (t0 + j < T) stats(j);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 a = to_float2(lo[i]), b = to_float2(hi[i]);
            cmin[2 * i] = a.x;
            cmin[2 * i + 1] = a.y;
            cmax[2 * i] = b.x;
            cmax[2 * i + 1] = b.y;
        }
    } else {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            cmin[i] = INF;
            cmax[i] = -INF;
        }
        auto stats = [&](int j) {
            float v[8];
            get8(tile + (row0 + j) * D + d0, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                acc = __fmaf_rn(v[i], 0.0f, acc);
                cmin[i] = fminf(cmin[i], v[i]);
                cmax[i] = fmaxf(cmax[i], v[i]);
            }
        };
        if (lane_full) {
#pragma unroll
            for (int j = 0; j < GB; ++j) stats(j);
        } else {
#pragma unroll
            for (int j = 0; j < GB; ++j)
                if (t0 + j < T) stats(j);
        }
        nan = acc != acc;
    }
    // bit 0: NaN or inf; bit 1: |x| > MAX_ABS (encode.py words the errors, bit 0 first)
    int bad = nan ? 1 : 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        // the initial +inf / -inf of a lane without tokens count as neither
        const float m = fmaxf(-cmin[i], cmax[i]);
        bad |= (cmin[i] != cmin[i] || cmax[i] != cmax[i] || m == INF) ? 1 : 0;
        bad |= m > MAX_ABS ? 2 : 0;
    }
    if (bad) atomicOr(status, bad);
    if (LYNX || !BY_TOKEN) {
#pragma unroll
        for (int o = GB; o < 32; o <<= 1) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                cmin[i] = fminf(cmin[i], __shfl_xor_sync(FULL, cmin[i], o));
                cmax[i] = fmaxf(cmax[i], __shfl_xor_sync(FULL, cmax[i], o));
            }
        }
    }

    // Whether a division's dividends are all known to suit div_fast, so that no element
    // needs div_slow (each proof needs |dividend| = 0 or >= 2^-40, and <= 2^48):
    // * a 16-bit source x minus a float16 ``base`` (uniform's group minimum, lynx's page
    //   minimum g_min; base <= x): a bf16 x with |x| >= 2^-32 is a multiple of 2^-39, and
    //   so is a float16 base (a multiple of 2^-24), so a nonzero x - base is at least
    //   2^-39; a smaller |x| against base != 0 leaves at least 2^-24 - 2^-32; float16 x
    //   are multiples of 2^-24. Above, |x - base| <= 2 * MAX_ABS unless the input is
    //   flagged (and dropped). With base == 0, x - base = x may be tiny: checked.
    // (lynx's second division, by sigma + EPS, is not done: code_bits)
    auto nonzero8 = [](const float* b) {
        bool zero = false;
#pragma unroll
        for (int i = 0; i < 8; ++i) zero |= b[i] == 0.0f;
        return !zero;
    };
    auto exact_dividends = [&](const float* mu) {  // uniform's division
        return sizeof(InT) == 2 && nonzero8(mu);
    };
    // Page metadata (lynx): g_min rounded down, g_scale = max - g_min rounded up.
    float gmin[8], gscl[8], grcp[8];  // grcp: rcp_step(gscl)
    bool gok = true;                   // every gscl suits div_fast
    int block_bad = 0;                 // lynx: some input of the block is flagged
    if (LYNX) {
        if (s == 0) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                s_pmin[warp * D + d0 + i] = cmin[i];
                s_pmax[warp * D + d0 + i] = cmax[i];
            }
        }
        block_bad = __syncthreads_or(bad);
        // one thread a channel: the page's extremes, its metadata (stored), and g_min and
        // g_scale + EPS for the lanes in warp 0's rows
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float pmin = s_pmin[c], pmax = s_pmax[c];
            for (int w = 1; w < NW; ++w) {
                pmin = fminf(pmin, s_pmin[w * D + c]);
                pmax = fmaxf(pmax, s_pmax[w * D + c]);
            }
            const unsigned int bmin = f16_down(pmin);
            const float gm = h2f(bmin);
            const unsigned int bscl = f16_up(__fsub_rn(pmax, gm));
            const long long o = (long long)blockIdx.y * C + h * D + c;
            ((unsigned short*)anchor)[o] = (unsigned short)bmin;
            ((unsigned short*)(anchor + off_scale))[o] = (unsigned short)bscl;
            s_pmin[c] = gm;
            s_pmax[c] = __fadd_rn(h2f(bscl), EPS);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            gmin[i] = s_pmin[d0 + i];
            gscl[i] = s_pmax[d0 + i];
            grcp[i] = rcp_step(gscl[i]);
            gok &= rcp_ok(gscl[i]);
        }
    }
    // the page division's (lynx), the same for all of the lane's tokens
    const bool page_exact = LYNX && sizeof(InT) == 2 && nonzero8(gmin);
    const float r255 = rcp_step(255.0f);  // u8 mu = k / 255 by div_fast: exact for k <= 255

    // Chunk metadata per channel: lynx mu and sigma (+ EPS), uniform min and scale (+ EPS).
    // cmul: lynx alpha / (sigma + EPS), approximately (the code estimate's); uniform the
    // reciprocal for div8.
    float cmu[8], csig[8], cmul[8];
    bool cok = true;  // uniform: every csig suits div_fast
    if (!BY_TOKEN) {
        unsigned int fmu[8], fsg[8];
        if (LYNX) {
            // A channel group's NS = 32 / GB lanes have the same chunks: lanes s and s ^ 1
            // each compute half of the 8 channels' metadata (SPLIT) and swap them.
            constexpr int SPLIT = (32 / GB >= 2 && ENC_SPLIT) ? 2 : 1, CH = 8 / SPLIT;
            const bool upper = SPLIT == 2 && (s & 1);  // the lane's half: channels 4-7
            float sum[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) sum[i] = 0.0f;
            if (MEAN) mean_sums<InT, D>(tile + warp * 32 * D + d0, min(32, T - tw), s, g,
                                        gmin, gscl, grcp, gok, page_exact, sum);
            // the lane's CH channels' extremes, page metadata and sums
            float hi[CH], lo[CH], gm[CH], gs[CH], gr[CH], sm[CH];
#pragma unroll
            for (int k = 0; k < CH; ++k) {
                const int i = (k + CH) % 8;  // channel k of the upper half (k without a split)
                hi[k] = upper ? cmax[i] : cmax[k];
                lo[k] = upper ? cmin[i] : cmin[k];
                gm[k] = upper ? gmin[i] : gmin[k];
                gs[k] = upper ? gscl[i] : gscl[k];
                gr[k] = upper ? grcp[i] : grcp[k];
                sm[k] = upper ? sum[i] : sum[k];
            }
            float xhi[CH], xlo[CH], mus[CH], sgs[CH], muls[CH];
            divn<CH>(hi, gm, gs, gr, gok, page_exact, xhi);
            divn<CH>(lo, gm, gs, gr, gok, page_exact, xlo);
            const double count = (double)max(1, min(32, T - tw));
#pragma unroll
            for (int k = 0; k < CH; ++k) {
                const float mid = __fmul_rn(__fadd_rn(xhi[k], xlo[k]), 0.5f);
                const double mean = (double)sm[k] / count;
                float mu;
                if (U8) {
                    float q = MEAN ? (float)rint(mean * 255.0) : rintf(__fmul_rn(mid, 255.0f));
                    q = fminf(fmaxf(q, 0.0f), 255.0f);
                    fmu[k] = (unsigned int)q;
                    mu = div_fast(q, 255.0f, r255);
                } else {
                    fmu[k] = __half_as_ushort(MEAN ? __double2half(mean) : __float2half_rn(mid));
                    mu = h2f(fmu[k]);
                }
                const float spread =
                    fmaxf(fabsf(__fsub_rn(xhi[k], mu)), fabsf(__fsub_rn(xlo[k], mu)));
                float sg;
                if (U8) {
                    fsg[k] = sigma_index(spread, s_sthr);
                    sg = s_sig[fsg[k]];
                } else {
                    fsg[k] = f16_up(spread);
                    sg = h2f(fsg[k]);
                }
                mus[k] = mu;
                sgs[k] = __fadd_rn(sg, EPS);
                muls[k] = __fmul_rn(alpha, rcp_approx(sgs[k]));
            }
#pragma unroll
            for (int k = 0; k < CH; ++k) {
                if (SPLIT == 1) {
                    cmu[k] = mus[k];
                    csig[k] = sgs[k];
                    cmul[k] = muls[k];
                } else {  // the partner's half
                    const float om = __shfl_xor_sync(FULL, mus[k], GB),
                                os = __shfl_xor_sync(FULL, sgs[k], GB),
                                ol = __shfl_xor_sync(FULL, muls[k], GB);
                    const int i = (k + CH) % 8;
                    cmu[k] = upper ? om : mus[k];
                    csig[k] = upper ? os : sgs[k];
                    cmul[k] = upper ? ol : muls[k];
                    cmu[i] = upper ? mus[k] : om;
                    csig[i] = upper ? sgs[k] : os;
                    cmul[i] = upper ? muls[k] : ol;
                }
            }
            if (s < SPLIT && tw < T) {  // the lane's CH channels' fields
                const long long o = (long long)(tw >> 5) * C + c0 + (upper ? CH : 0);
                if (U8) {
                    store_bytes<CH>(anchor + off_mu + o, fmu);
                    store_bytes<CH>(anchor + off_sigma + o, fsg);
                } else {
                    store_halves<CH>(anchor + off_mu + 2 * o, fmu);
                    store_halves<CH>(anchor + off_sigma + 2 * o, fsg);
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                fmu[i] = f16_down(cmin[i]);
                cmu[i] = h2f(fmu[i]);
                fsg[i] = f16_up(__fsub_rn(cmax[i], cmu[i]));
                csig[i] = __fadd_rn(h2f(fsg[i]), EPS);
                cmul[i] = rcp_step(csig[i]);
                cok &= rcp_ok(csig[i]);
            }
            if (s == 0 && tw < T) {
                const long long o = (long long)(tw >> 5) * C + c0;  // chunk * C + channel
                store_halves<8>(anchor + off_mu + 2 * o, fmu);
                store_halves<8>(anchor + off_sigma + 2 * o, fsg);
            }
        }
    }


    // A flagged input fails the whole encode (encode.py), so its fields are not needed;
    // skipping them keeps pass 2's bound on |y| (below) unconditional.
    if (LYNX && block_bad) return;

    // Pass 2: the fields of every element, the per-token statistics first where needed.
    // (through a shuffle, which the compiler cannot fold: else it splits the constant
    // back out of the address, one more instruction an element)
    const unsigned int thr_at = __shfl_sync(
        FULL, (unsigned int)__cvta_generic_to_shared(s_thr) - 4 * (MAGIC_BITS + 128), 0);
    // the lane's first token's code fields (a token's are C * BITS / 8 bytes further)
    const long long e0 = ((long long)t0 * C + c0) >> 3;
    unsigned char* const a_codes = anchor + off_codes + e0 * ABITS;
    unsigned char* const r_codes = resid + e0 * RBITS;
    // BY_TOKEN: the stored fields of token t0 + g (the GB lanes of a token run are GB
    // tokens long: each stores one token's, once, rather than one lane each token)
    unsigned int tok_mu = 0, tok_sig = 0;
    // lynx, per-token chunks: a token's fields and its y's divisor sigma + EPS, from the
    // extremes of its xn
    auto token_meta = [&](float hi, float lo, unsigned int& fmu, unsigned int& fsg, float& mu,
                          float& sig) {
        const float mid = __fmul_rn(__fadd_rn(hi, lo), 0.5f);
        if (U8) {
            const float k = fminf(fmaxf(rintf(__fmul_rn(mid, 255.0f)), 0.0f), 255.0f);
            fmu = (unsigned int)k;
            mu = div_fast(k, 255.0f, r255);
        } else {
            fmu = __half_as_ushort(__float2half_rn(mid));
            mu = h2f(fmu);
        }
        // max |xn - mu| over the token is at its extremes (a rounded difference is
        // monotone), as numpy's max over every element
        const float spread = fmaxf(fabsf(__fsub_rn(hi, mu)), fabsf(__fsub_rn(lo, mu)));
        float sg;
        if (U8) {
            fsg = sigma_index(spread, s_sthr);
            sg = s_sig[fsg];
        } else {
            fsg = f16_up(spread);
            sg = h2f(fsg);
        }
        sig = __fadd_rn(sg, EPS);
    };
    // The extremes of the lane's 8 values.
    auto extremes8 = [](const float* x, float& hi, float& lo) {
        hi = -INF;
        lo = INF;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            hi = fmaxf(hi, x[i]);
            lo = fminf(lo, x[i]);
        }
    };
    // Two forms of pass 2: EXACT where every page division of the lane is known to suit
    // div_fast (no per-element check, no fallback: fewer registers live), else checked.
    auto pass2 = [&](auto exact) {
    constexpr bool EXACT = decltype(exact)::value;
    const bool page_fast = EXACT || page_exact;
    // token j's values at the lane's channels (0 past the section's end), lynx's
    // page-normalised
    auto load_x = [&](int j, bool valid, float* x) {
        float v[8];
        if (valid) {
            get8(tile + (row0 + j) * D + d0, v);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = 0.0f;
        }
        if (LYNX) {
            div8(v, gmin, gscl, grcp, EXACT || gok, page_fast, x);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = v[i];
        }
    };
    // token j's fields at the lane's channels, from x and the chunk metadata per channel
    auto fields = [&](const float* x, const float* mu, const float* sg, const float* mul,
                      bool ok, int j, bool valid) {
        if constexpr (LYNX) {
            // y = (xn - mu) / (sigma + EPS), decided from its numerator (code_bits). |y|
            // <= 1 without numpy's clamp: |xn - mu| (rounded) <= spread, the largest of
            // them over the chunk, <= sigma (rounded up from it, or the u8 scale covering
            // it) < sigma + EPS, and a correctly rounded quotient of a <= b is <= 1; the
            // table lookup relies on it (an input that is not finite never gets here).
            // Tokens past the section's end (not stored) read entry 1 whatever their
            // chunk's metadata (NaN in a warp without tokens: no extremes).
            float a[8];
            unsigned int cb[8];
            bool near = false;
            auto exact = [&](int i, float ai) {
                // (s * 2^-24: one product a channel for two tokens, one a token for a
                // token's chunk; kept per channel instead, 8 more registers spill)
                const float s24 = __fmul_rn(sg[i], 0x1p-24f);
                return code_bits(ai, sg[i], s24, valid ? mul[i] : 0.0f, thr_at, scale);
            };
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                a[i] = valid ? __fsub_rn(x[i], mu[i]) : 0.0f;
                cb[i] = FAST ? code_round(a[i], valid ? mul[i] : 0.0f, scale, half_m, near)
                             : exact(i, a[i]);
            }
            if (FAST && near) {  // (only such lanes read the table)
#pragma unroll
                for (int i = 0; i < 8; ++i) cb[i] = exact(i, a[i]);
            }
            // the even and odd values' codes (as 255 - code) and signs, 4 to a word
            // (bitpack order: value 2k is in the lower field); a is never -0 (xn - mu
            // rounds an exact 0 to +0) and never so small that y would round to 0, so its
            // sign is y < 0
            unsigned int ae, ao, re, ro;
            split4<ABITS>(gather4(cb[0], cb[2], cb[4], cb[6], LOW_BYTES),
                          gather4(__float_as_uint(a[0]), __float_as_uint(a[2]),
                                  __float_as_uint(a[4]), __float_as_uint(a[6]), SIGN_BYTES),
                          ae, re);
            split4<ABITS>(gather4(cb[1], cb[3], cb[5], cb[7], LOW_BYTES),
                          gather4(__float_as_uint(a[1]), __float_as_uint(a[3]),
                                  __float_as_uint(a[5]), __float_as_uint(a[7]), SIGN_BYTES),
                          ao, ro);
            if (valid) {
                store_packed<ABITS>(a_codes + j * (C >> 3) * ABITS, ae, ao);
                store_packed<RBITS>(r_codes + j * (C >> 3) * RBITS, re, ro);
            }
        } else {
            // uniform (x - min) / (scale + EPS)
            float q[8];
            div8(x, mu, sg, mul, ok, exact_dividends(mu), q);
            if constexpr (ABITS == 4) {
                // u = round((x - min) / (scale + EPS) * 255) as in numpy, whose clamp to
                // [0, 255] never binds here: min rounds down and scale up from the group's
                // extremes, so 0 <= x - min <= scale < scale + EPS and the rounded quotient
                // is in [0, 1]. The magic add leaves u in the low byte of the sum's bits;
                // the even and odd values' bytes are gathered in two words, whose high
                // nibbles are the anchor fields and low nibbles the residual fields
                // (bitpack order: value 2k in the low nibble of byte k, 2k + 1 in the high).
                unsigned int b[8];
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    b[i] = __float_as_uint(__fadd_rn(__fmul_rn(q[i], 255.0f), MAGIC));
                const unsigned int ev = __byte_perm(__byte_perm(b[0], b[2], 0x0040),
                                                    __byte_perm(b[4], b[6], 0x0040), 0x5410);
                const unsigned int od = __byte_perm(__byte_perm(b[1], b[3], 0x0040),
                                                    __byte_perm(b[5], b[7], 0x0040), 0x5410);
                if (valid) {
                    const int o = j * (C >> 1);  // C / 2 bytes a token
                    *(unsigned int*)(a_codes + o) = (ev >> 4 & 0x0F0F0F0Fu) | (od & 0xF0F0F0F0u);
                    *(unsigned int*)(r_codes + o) = (ev & 0x0F0F0F0Fu) | (od << 4 & 0xF0F0F0F0u);
                }
            } else {
                unsigned int af[8], rf[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    // u = round((x - min) / (scale + EPS) * 255); high and low bits; rint
                    // commutes with the clamp to [0, 255] (integer bounds)
                    const float u = fminf(fmaxf(__fmul_rn(q[i], 255.0f), 0.0f), 255.0f);
                    const unsigned int ui = (unsigned int)rint_small(u);
                    af[i] = ui >> RBITS;
                    rf[i] = ui & ((1u << RBITS) - 1);
                }
                if (valid) {
                    store_fields<ABITS>(a_codes + j * (C >> 3) * ABITS, af);
                    store_fields<RBITS>(r_codes + j * (C >> 3) * RBITS, rf);
                }
            }
        }
    };
    // One token a step (per-channel chunks, and per-token ones of one lane a token or of
    // uniform): per-token statistics by the GB lanes of the token, in the same shuffles.
    auto encode_token = [&](int j, bool valid) {
        float x[8];
        load_x(j, valid, x);
        if (BY_TOKEN) {
            float hi, lo;
            extremes8(x, hi, lo);
#pragma unroll
            for (int o = 1; o < GB; o <<= 1) {
                hi = fmaxf(hi, __shfl_xor_sync(FULL, hi, o));
                lo = fminf(lo, __shfl_xor_sync(FULL, lo, o));
            }
            unsigned int fmu, fsg;
            float mu, sig, mul;
            if (LYNX) {
                token_meta(hi, lo, fmu, fsg, mu, sig);
                mul = __fmul_rn(alpha, rcp_approx(sig));
            } else {
                fmu = f16_down(lo);
                mu = h2f(fmu);
                fsg = f16_up(__fsub_rn(hi, mu));
                sig = __fadd_rn(h2f(fsg), EPS);
                mul = rcp_step(sig);
                cok = rcp_ok(sig);
            }
            if (j == g) {  // this lane stores token j's fields after the loop
                tok_mu = fmu;
                tok_sig = fsg;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                cmu[i] = mu;
                csig[i] = sig;
                cmul[i] = mul;
            }
        }
        fields(x, cmu, csig, cmul, cok, j, valid);
    };
    // Lynx per-token chunks, two tokens a step (j even): lane pairs (g, g ^ 1) hold the
    // two tokens in opposite order, "first" token j + (g & 1), so that the first shuffle
    // adds the partner's extremes of the lane's first token (its second) to the lane's:
    // then each lane reduces and computes the metadata of one token only, and reads its
    // second token's from the partner. Per token: half the shuffles and metadata.
    auto encode_pair = [&](int j, bool full) {
        const int jf = j + (g & 1), js = j + 1 - (g & 1);
        const bool vf = full || t0 + jf < T, vs = full || t0 + js < T;
        float xf[8], xs[8];
        load_x(jf, vf, xf);
        load_x(js, vs, xs);
        float hi, lo, hs, ls;
        extremes8(xf, hi, lo);
        extremes8(xs, hs, ls);
        hi = fmaxf(hi, __shfl_xor_sync(FULL, hs, 1));
        lo = fminf(lo, __shfl_xor_sync(FULL, ls, 1));
#pragma unroll
        for (int o = 2; o < GB; o <<= 1) {
            hi = fmaxf(hi, __shfl_xor_sync(FULL, hi, o));
            lo = fminf(lo, __shfl_xor_sync(FULL, lo, o));
        }
        unsigned int fmu, fsg;
        float mu, sig;
        token_meta(hi, lo, fmu, fsg, mu, sig);
        const float mul = __fmul_rn(alpha, rcp_approx(sig));
        if (jf == g) {  // this lane stores token jf's fields after the loop
            tok_mu = fmu;
            tok_sig = fsg;
        }
        const float mu2 = __shfl_xor_sync(FULL, mu, 1), sig2 = __shfl_xor_sync(FULL, sig, 1),
                    mul2 = __shfl_xor_sync(FULL, mul, 1);
        float m[8], sg[8], r[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            m[i] = mu;
            sg[i] = sig;
            r[i] = mul;
        }
        fields(xf, m, sg, r, true, jf, vf);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            m[i] = mu2;
            sg[i] = sig2;
            r[i] = mul2;
        }
        fields(xs, m, sg, r, true, js, vs);
    };
    if (LYNX && BY_TOKEN && GB >= 2) {
        if (warp_full) {
#pragma unroll 1
            for (int j = 0; j < GB; j += 2) encode_pair(j, true);
        } else {
#pragma unroll 1
            for (int j = 0; j < GB; j += 2) encode_pair(j, false);
        }
    } else if (warp_full) {
        UNROLL(ENC_UNROLL)
        for (int j = 0; j < GB; ++j) encode_token(j, true);
    } else {
        UNROLL(ENC_UNROLL)
        for (int j = 0; j < GB; ++j) encode_token(j, t0 + j < T);
    }
    };
    // exact: the lynx page division, all of the warp's (uniform has no page, and its
    // group division is checked alone)
    if (__all_sync(FULL, LYNX && page_exact && gok)) {
        pass2(Flag<true>{});
    } else {
        pass2(Flag<false>{});
    }
    if (BY_TOKEN && t0 + g < T) {
        const long long o = (long long)(t0 + g) * H + h;
        if (LYNX && U8) {
            anchor[off_mu + o] = (unsigned char)tok_mu;
            anchor[off_sigma + o] = (unsigned char)tok_sig;
        } else {
            ((unsigned short*)(anchor + off_mu))[o] = (unsigned short)tok_mu;
            ((unsigned short*)(anchor + off_sigma))[o] = (unsigned short)tok_sig;
        }
    }
}
"""
)


def kernel_name(
    source: str,
    dim: int,
    lynx: bool,
    a_bits: int,
    by_token: bool,
    u8: bool,
    mean: bool,
    fast: bool = False,
) -> str:
    """The C++ name of one instantiation (``source``: ``__nv_bfloat16``, ``__half``, ``float``)."""

    def flag(f: bool) -> str:
        return "true" if f else "false"

    return (
        f"encode<{source}, {dim}, {flag(lynx)}, {a_bits}, {flag(by_token)}, "
        f"{flag(u8)}, {flag(mean)}, {flag(fast)}>"
    )
