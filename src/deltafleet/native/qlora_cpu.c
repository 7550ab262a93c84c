/* Quantized BGMV for CPU decode: each token's compressed-delta rows are dequantized as they are read, in place from
 * the slot pool (the compact form of Delta-CoMe's mixed-precision low-rank deltas, Ping et al. 2024, sec. 3: a
 * delta is U diag(S) V^T with singular vectors in bands of 2/3/4/8-bit or fp16). A decode step then streams the
 * stored bytes (2 bits a weight at 1/64) instead of an expanded bf16 copy (16 bits a weight). The reference
 * semantics are `adapters.qadditive` (`dense_rows`) and `ReferenceBackend.apply_qadditive`.
 *
 * A slot k holds up to R rows; row j has bit width bits[k, j] in {2, 3, 4, 8, 16} (0: no row; rows are packed
 * from j = 0 and a slot's first 0 ends them). Row j of A (R, in) and of B (R, out) are byte ranges of the slot's
 * data buffer starting at aoff[k, j], boff[k, j]: little-endian bit streams of codes (`store.quantized`), or fp16
 * values for 16. Every G columns of a row form a group with a float32 scale and bias: w = code * scale + bias
 * (scale = fp16 scale, bias = -zero * scale; S folded into A's; fp16 rows have scale 1 or S, bias 0).
 *
 *     for every token i with k = idx[i] != null_row:
 *         h[j]  = sum_c A_kj[c] * x[i, c]          for the slot's rows j
 *         y[i] += sum_j h[j] * B_kj                (out,)
 *
 *   x (n, in) row stride sx, y (n, out) row stride sy (float32, or bfloat16 widened on the stack and rounded back
 *   once); bits (S, R) uint8; aoff, boff (S, R) int64; data (S, D) uint8 row stride sd, with at least 32 bytes
 *   after each row's end readable; ascale, abias (S, R, ceil(in / G)); bscale, bbias (S, R, ceil(out / G))
 *   float32. Contract (checked by the caller): in, out and G multiples of 64.
 *
 * Embedding lookup of a table (A (R, H), B (R, V)): y[i] += sum_j B_kj[t_i] * A_kj for token ids t (n,).
 *
 * Vector layout (AVX2): a block is 8 lanes of L bytes each holding K codes; a lane's codes are consecutive
 * columns, so one unpack yields K vectors of 8 codes whose columns stride by K. b = 2, 4, 8: L = 1, K = 8 / b;
 * b = 3: L = 3, K = 8; b = 16: one fp16 per lane. Activations are permuted once per token and band into the same
 * order (x[blk + l*K + s] -> xp[blk + s*8 + l]), so the row loops are plain loads, shifts, converts and FMAs;
 * B rows accumulate into a permuted buffer that is added back once per band. Without AVX2 the rows are read
 * code by code in column order.
 *
 * The tokens of one slot (a prefill chunk's rows, or several decode rows of one tenant) form groups of up to
 * QRUN_MAX tokens: each row is then dequantized once into a float buffer and applied to every token of the group,
 * instead of once per token. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DF_AVX2 1
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define DF_BF16DP 1
#endif
#endif

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal: renormalise */
        uint32_t e = 113u, m = man;
        while (!(m & 0x400u)) { m <<= 1; e--; }
        u = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* code c of a row (column order), b in {2, 3, 4, 8, 16}, as a float */
static inline float code_at(const uint8_t *p, int b, int64_t c) {
    if (b == 16) {
        uint16_t h;
        memcpy(&h, p + 2 * c, 2);
        return f16_to_f32(h);
    }
    const int64_t bit = c * b;
    const uint32_t w = (uint32_t)p[bit >> 3] | ((uint32_t)p[(bit >> 3) + 1] << 8);
    return (float)((w >> (bit & 7)) & ((1u << b) - 1u));
}

static inline int64_t lane_codes(int b) { return b == 3 ? 8 : (b == 16 ? 1 : 8 / b); }

#ifdef DF_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 lanes of one block, as 32-bit integers (b = 2, 4, 8: a byte each; 3: three bytes each) */
static inline __m256i lanes_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

static inline __m256i lanes_u24(const uint8_t *p) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p); /* bytes 0..31; 24..31 unused (padding) */
    const __m256i dw = _mm256_permutevar8x32_epi32(raw, _mm256_setr_epi32(0, 1, 2, 3, 3, 4, 5, 6));
    const __m256i sh = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                        0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    return _mm256_shuffle_epi8(dw, sh);
}

/* One row's dot product with the permuted activation xp, and one row's update of the permuted output yp, for a
 * bit width B_ with K_ codes a lane and LANES(p) the block's lanes; BLK_BYTES bytes a block. */
#define DEFINE_QROW(B_, K_, BLK_BYTES, LANES)                                                         \
static inline float qdot_b##B_(const uint8_t *p, const float *xp, const float *sc, const float *bi, \
                                const float *xs, int64_t C, int64_t G) {                             \
    const __m256i mask = _mm256_set1_epi32((1 << B_) - 1);                                           \
    float total = 0.0f;                                                                              \
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {                                            \
        const int64_t end = g0 + G < C ? g0 + G : C;                                                  \
        __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();                                \
        for (int64_t c = g0; c < end; c += 8 * K_) {                                                 \
            const __m256i v = LANES(p + (c / (8 * K_)) * BLK_BYTES);                                 \
            for (int s = 0; s < K_; s += 2) {                                                        \
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(                           \
                          _mm256_srli_epi32(v, s * B_), mask)), _mm256_loadu_ps(xp + c + 8 * s), acc); \
                if (s + 1 < K_)                                                                      \
                    acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(                      \
                               _mm256_srli_epi32(v, (s + 1) * B_), mask)),                           \
                               _mm256_loadu_ps(xp + c + 8 * (s + 1)), acc2);                         \
            }                                                                                        \
        }                                                                                            \
        total += sc[gi] * hsum8(_mm256_add_ps(acc, acc2)) + bi[gi] * xs[gi];                         \
    }                                                                                                \
    return total;                                                                                    \
}                                                                                                    \
static inline void qaxpy_b##B_(float h, const uint8_t *p, const float *sc, const float *bi, float *yp, \
                               int64_t C, int64_t G) {                                               \
    const __m256i mask = _mm256_set1_epi32((1 << B_) - 1);                                           \
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {                                            \
        const int64_t end = g0 + G < C ? g0 + G : C;                                                  \
        const __m256 hs = _mm256_set1_ps(h * sc[gi]), hb = _mm256_set1_ps(h * bi[gi]);               \
        for (int64_t c = g0; c < end; c += 8 * K_) {                                                 \
            const __m256i v = LANES(p + (c / (8 * K_)) * BLK_BYTES);                                 \
            for (int s = 0; s < K_; s++) {                                                           \
                float *o = yp + c + 8 * s;                                                           \
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(             \
                    _mm256_srli_epi32(v, s * B_), mask)), hs, _mm256_add_ps(_mm256_loadu_ps(o), hb))); \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
}

DEFINE_QROW(2, 4, 8, lanes_u8)
DEFINE_QROW(4, 2, 8, lanes_u8)
DEFINE_QROW(8, 1, 8, lanes_u8)
DEFINE_QROW(3, 8, 24, lanes_u24)

/* One row dequantized into w (C,) in the permuted order of its bit width (the order of xp, yp). */
#define DEFINE_QDEQ(B_, K_, BLK_BYTES, LANES)                                                         \
static inline void qdeq_b##B_(const uint8_t *p, const float *sc, const float *bi, float *w, int64_t C, \
                              int64_t G) {                                                           \
    const __m256i mask = _mm256_set1_epi32((1 << B_) - 1);                                           \
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {                                            \
        const int64_t end = g0 + G < C ? g0 + G : C;                                                  \
        const __m256 vs = _mm256_set1_ps(sc[gi]), vb = _mm256_set1_ps(bi[gi]);                       \
        for (int64_t c = g0; c < end; c += 8 * K_) {                                                 \
            const __m256i v = LANES(p + (c / (8 * K_)) * BLK_BYTES);                                 \
            for (int s = 0; s < K_; s++)                                                             \
                _mm256_storeu_ps(w + c + 8 * s, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(  \
                    _mm256_srli_epi32(v, s * B_), mask)), vs, vb));                                  \
        }                                                                                            \
    }                                                                                                \
}

DEFINE_QDEQ(2, 4, 8, lanes_u8)
DEFINE_QDEQ(4, 2, 8, lanes_u8)
DEFINE_QDEQ(8, 1, 8, lanes_u8)
DEFINE_QDEQ(3, 8, 24, lanes_u24)

static inline void qdeq_b16(const uint8_t *p, const float *sc, const float *bi, float *w, int64_t C, int64_t G) {
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        const __m256 vs = _mm256_set1_ps(sc[gi]), vb = _mm256_set1_ps(bi[gi]);
        for (int64_t c = g0; c < end; c += 8)
            _mm256_storeu_ps(w + c, _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * c))),
                                                    vs, vb));
    }
}

static inline void qdeq(int b, const uint8_t *p, const float *sc, const float *bi, float *w, int64_t C, int64_t G) {
    switch (b) {
    case 2: qdeq_b2(p, sc, bi, w, C, G); break;
    case 3: qdeq_b3(p, sc, bi, w, C, G); break;
    case 4: qdeq_b4(p, sc, bi, w, C, G); break;
    case 8: qdeq_b8(p, sc, bi, w, C, G); break;
    default: qdeq_b16(p, sc, bi, w, C, G);
    }
}

static inline float qdot_b16(const uint8_t *p, const float *xp, const float *sc, const float *bi, const float *xs,
                             int64_t C, int64_t G) {
    float total = 0.0f;
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = g0; c < end; c += 8)
            acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * c))),
                                  _mm256_loadu_ps(xp + c), acc);
        total += sc[gi] * hsum8(acc) + bi[gi] * xs[gi];
    }
    return total;
}

static inline void qaxpy_b16(float h, const uint8_t *p, const float *sc, const float *bi, float *yp, int64_t C,
                             int64_t G) {
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        const __m256 hs = _mm256_set1_ps(h * sc[gi]), hb = _mm256_set1_ps(h * bi[gi]);
        for (int64_t c = g0; c < end; c += 8) {
            const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * c)));
            _mm256_storeu_ps(yp + c, _mm256_fmadd_ps(w, hs, _mm256_add_ps(_mm256_loadu_ps(yp + c), hb)));
        }
    }
}

static inline float qdot(int b, const uint8_t *p, const float *xp, const float *sc, const float *bi,
                         const float *xs, int64_t C, int64_t G) {
    switch (b) {
    case 2: return qdot_b2(p, xp, sc, bi, xs, C, G);
    case 3: return qdot_b3(p, xp, sc, bi, xs, C, G);
    case 4: return qdot_b4(p, xp, sc, bi, xs, C, G);
    case 8: return qdot_b8(p, xp, sc, bi, xs, C, G);
    default: return qdot_b16(p, xp, sc, bi, xs, C, G);
    }
}

static inline void qaxpy(int b, float h, const uint8_t *p, const float *sc, const float *bi, float *yp, int64_t C,
                         int64_t G) {
    switch (b) {
    case 2: qaxpy_b2(h, p, sc, bi, yp, C, G); break;
    case 3: qaxpy_b3(h, p, sc, bi, yp, C, G); break;
    case 4: qaxpy_b4(h, p, sc, bi, yp, C, G); break;
    case 8: qaxpy_b8(h, p, sc, bi, yp, C, G); break;
    default: qaxpy_b16(h, p, sc, bi, yp, C, G);
    }
}

static inline int64_t layout_codes(int b) { return lane_codes(b); }

#ifdef DF_BF16DP
/* Rows of 2 or 4 bits with bfloat16 activations, on AVX512-BF16. A unit is 16 bytes of one row (64 columns at 2
 * bits, 32 at 4), widened to 16 words; slice s of every word (its s-th code c) becomes the bfloat16 128 + c exactly
 * (0x4300 | c: exponent 2^7, mantissa step 1), and vdpbf16ps adds two exact products per fp32 lane; 128 times the
 * sum of the other operand is taken off once per group. Word i of a unit at column u is lane i % 8 of block i / 8,
 * so its slice s is column u + (i / 8) * 8K + (i % 8) * K + s (K = 8 / b codes a byte).
 *   A rows (h = A x): the activation is permuted once per token into that order (xq[u + 16 s + i]).
 *   B rows (y += B^T h): columns outer, rows inner, two rows a step (their words interleaved into lane pairs),
 *   accumulated in registers and transposed back to column order once per unit. The coefficient h[j] * sc[j, g]
 *   is rounded to bfloat16, as a bf16 matmul rounds the intermediate of a LoRA product.
 * Numerics: bf16-level (the activations and y are bf16). fp32 activations keep the AVX2 rows. */
static inline int fast16(int b, int act_bf16) { return act_bf16 && (b == 2 || b == 4); }

static inline __m256i unit_words(const uint8_t *p) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
}

static inline __m256i slice_bf16(__m256i w, int shift, __m256i mask, __m256i base) {
    return _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, shift), mask, base, 0xEA); /* (w >> shift & mask) | base */
}

static inline int64_t unit_column(int64_t i, int64_t s, int64_t K) { return (i / 8) * 8 * K + (i % 8) * K + s; }

/* x (C,) bfloat16 in column order -> xq in unit order for K codes a byte (C a multiple of 64) */
static void permute16(const uint16_t *x, uint16_t *xq, int64_t C, int64_t K) {
    uint16_t idx[64];
    for (int64_t t = 0; t < 16 * K; t++) idx[t] = (uint16_t)unit_column(t % 16, t / 16, K);
    const __m512i i0 = _mm512_loadu_si512(idx);
    if (K == 4) {
        const __m512i i1 = _mm512_loadu_si512(idx + 32);
        for (int64_t u = 0; u < C; u += 64) {
            const __m512i lo = _mm512_loadu_si512(x + u), hi = _mm512_loadu_si512(x + u + 32);
            _mm512_storeu_si512(xq + u, _mm512_permutex2var_epi16(lo, i0, hi));
            _mm512_storeu_si512(xq + u + 32, _mm512_permutex2var_epi16(lo, i1, hi));
        }
    } else {
        for (int64_t u = 0; u < C; u += 32)
            _mm512_storeu_si512(xq + u, _mm512_permutexvar_epi16(i0, _mm512_loadu_si512(x + u)));
    }
}

/* One row's h = sum_g sc[g] * sum_{c in g} code_c x_c + bi[g] * xs[g], for B bits (a constant once inlined) */
static inline __attribute__((always_inline)) float qdot16_b(const int B, const uint8_t *p, const uint16_t *xq,
                                                            const float *sc, const float *bi, const float *xs,
                                                            int64_t C, int64_t G) {
    const int64_t K = 8 / B, uc = 16 * K;
    const __m256i mask = _mm256_set1_epi16((short)((1 << B) - 1)), base = _mm256_set1_epi16(0x4300);
    __m256 total = _mm256_setzero_ps();
    float corr = 0.0f;
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
        for (int64_t c = g0; c < end; c += uc) {
            const __m256i w = unit_words(p + c / uc * 16);
            for (int64_t s = 0; s < K; s += 2) {
                acc = _mm256_dpbf16_ps(acc, (__m256bh)slice_bf16(w, (int)(s * B), mask, base),
                                       (__m256bh)_mm256_loadu_si256((const __m256i *)(xq + c + 16 * s)));
                acc2 = _mm256_dpbf16_ps(acc2, (__m256bh)slice_bf16(w, (int)((s + 1) * B), mask, base),
                                        (__m256bh)_mm256_loadu_si256((const __m256i *)(xq + c + 16 * (s + 1))));
            }
        }
        total = _mm256_fmadd_ps(_mm256_set1_ps(sc[gi]), _mm256_add_ps(acc, acc2), total);
        corr += xs[gi] * (bi[gi] - 128.0f * sc[gi]);
    }
    return hsum8(total) + corr;
}

static inline float qdot16(int b, const uint8_t *p, const uint16_t *xq, const float *sc, const float *bi,
                           const float *xs, int64_t C, int64_t G) {
    return b == 2 ? qdot16_b(2, p, xq, sc, bi, xs, C, G) : qdot16_b(4, p, xq, sc, bi, xs, C, G);
}

/* Four rows of one width at once (rows j..j+3 of a token: codes at p[r], scales sc + r * gin): each activation
 * slice is loaded once for the four, and eight independent accumulators hide vdpbf16ps's latency, which bounds one
 * row's two chains (the A side of a decode token took about half the kernel's time one row at a time). The same
 * sums as `qdot16_b`, in the same order within each row. */
static inline __attribute__((always_inline)) void qdot16x4_b(const int B, const uint8_t *const p[4],
                                                             const uint16_t *xq, const float *sc, const float *bi,
                                                             int64_t gin, const float *xs, int64_t C, int64_t G,
                                                             float *h) {
    const int64_t K = 8 / B, uc = 16 * K;
    const __m256i mask = _mm256_set1_epi16((short)((1 << B) - 1)), base = _mm256_set1_epi16(0x4300);
    __m256 total[4];
    float corr[4];
    for (int r = 0; r < 4; r++) total[r] = _mm256_setzero_ps(), corr[r] = 0.0f;
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        __m256 acc[4], acc2[4];
        for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps(), acc2[r] = _mm256_setzero_ps();
        for (int64_t c = g0; c < end; c += uc) {
            __m256i w[4];
            for (int r = 0; r < 4; r++) w[r] = unit_words(p[r] + c / uc * 16);
            for (int64_t s = 0; s < K; s += 2) {
                const __m256bh x0 = (__m256bh)_mm256_loadu_si256((const __m256i *)(xq + c + 16 * s));
                const __m256bh x1 = (__m256bh)_mm256_loadu_si256((const __m256i *)(xq + c + 16 * (s + 1)));
                for (int r = 0; r < 4; r++) {
                    acc[r] = _mm256_dpbf16_ps(acc[r], (__m256bh)slice_bf16(w[r], (int)(s * B), mask, base), x0);
                    acc2[r] = _mm256_dpbf16_ps(acc2[r], (__m256bh)slice_bf16(w[r], (int)((s + 1) * B), mask, base),
                                               x1);
                }
            }
        }
        for (int r = 0; r < 4; r++) {
            const float scr = sc[r * gin + gi];
            total[r] = _mm256_fmadd_ps(_mm256_set1_ps(scr), _mm256_add_ps(acc[r], acc2[r]), total[r]);
            corr[r] += xs[gi] * (bi[r * gin + gi] - 128.0f * scr);
        }
    }
    for (int r = 0; r < 4; r++) h[r] = hsum8(total[r]) + corr[r];
}

static inline void qdot16x4(int b, const uint8_t *const p[4], const uint16_t *xq, const float *sc, const float *bi,
                            int64_t gin, const float *xs, int64_t C, int64_t G, float *h) {
    if (b == 2)
        qdot16x4_b(2, p, xq, sc, bi, gin, xs, C, G, h);
    else
        qdot16x4_b(4, p, xq, sc, bi, gin, xs, C, G, h);
}

/* cf (np, ng): row pair q's coefficients in group g, bf16(h[2q] sc[2q, g]) | bf16(h[2q+1] sc[2q+1, g]) << 16 (a
 * missing odd row: 0); corr (ng,): sum_j h[j] bi[j, g] - 128 sum_j (the coefficients as rounded) */
static void band16_coefficients(int64_t nr, const float *sc, const float *bi, int64_t ng, const float *h, uint32_t *cf,
                                float *corr) {
    const int64_t np = (nr + 1) / 2;
    for (int64_t g = 0; g < ng; g += 16) {
        const __mmask16 m = ng - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (ng - g)) - 1u);
        __m512 cv = _mm512_setzero_ps();
        for (int64_t q = 0; q < np; q++) {
            __m512i dw = _mm512_setzero_si512();
            for (int64_t r = 0; r < 2 && 2 * q + r < nr; r++) {
                const int64_t j = 2 * q + r;
                const __m512 c = _mm512_mul_ps(_mm512_set1_ps(h[j]), _mm512_maskz_loadu_ps(m, sc + j * ng + g));
                const __m512i w = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(c));
                cv = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), _mm512_maskz_loadu_ps(m, bi + j * ng + g), cv);
                cv = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), cv);
                dw = _mm512_or_si512(dw, _mm512_slli_epi32(w, (unsigned)(16 * r)));
            }
            _mm512_mask_storeu_epi32(cf + q * ng + g, m, dw);
        }
        _mm512_mask_storeu_ps(corr + g, m, cv);
    }
}

/* y[c + 0..7] += v + corr */
static inline void add8(float *y, __m256 v, __m256 corr) {
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), _mm256_add_ps(v, corr)));
}

/* y (C,) float32 += sum_j h[j] * row_j over the nr rows of one band of b = 2 or 4 bits (offsets off, scales sc and
 * biases bi (nr, ng)) */
static inline __attribute__((always_inline)) void band16_axpy_b(const int b, int64_t nr, const int64_t *off,
                                                                 const uint8_t *data, const float *sc, const float *bi,
                                                                 int64_t ng, const float *h, float *y, int64_t C,
                                                                 int64_t G) {
    const int64_t K = 8 / b, uc = 16 * K, np = (nr + 1) / 2;
    const __m256i mask = _mm256_set1_epi16((short)((1 << b) - 1)), base = _mm256_set1_epi16(0x4300);
    uint32_t cf[np * ng];
    float corr[ng];
    band16_coefficients(nr, sc, bi, ng, h, cf, corr);
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        const __m256 cg = _mm256_set1_ps(corr[gi]);
        for (int64_t c = g0; c < end; c += uc) {
            __m256 acc[8]; /* acc[2 s + half], lane d: word (d & 3) + 4 half + 8 (d >> 2), slice s */
            for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t q = 0; q < np; q++) {
                const uint8_t *pa = data + off[2 * q] + c / uc * 16;
                const uint8_t *pb = 2 * q + 1 < nr ? data + off[2 * q + 1] + c / uc * 16 : pa; /* coefficient 0 */
                const __m256i wa = unit_words(pa), wb = unit_words(pb);
                const __m256bh v = (__m256bh)_mm256_set1_epi32((int)cf[q * ng + gi]);
                for (int64_t s = 0; s < K; s++) {
                    const __m256i ra = slice_bf16(wa, (int)(s * b), mask, base);
                    const __m256i rb = slice_bf16(wb, (int)(s * b), mask, base);
                    acc[2 * s] = _mm256_dpbf16_ps(acc[2 * s], (__m256bh)_mm256_unpacklo_epi16(ra, rb), v);
                    acc[2 * s + 1] = _mm256_dpbf16_ps(acc[2 * s + 1], (__m256bh)_mm256_unpackhi_epi16(ra, rb), v);
                }
            }
            for (int64_t half = 0; half < 2; half++) {
                if (K == 4) { /* column 32 blk + 16 half + 4 (d & 3) + s: a 4 x 4 transpose per block */
                    const __m256 t0 = _mm256_unpacklo_ps(acc[half], acc[2 + half]);
                    const __m256 t1 = _mm256_unpackhi_ps(acc[half], acc[2 + half]);
                    const __m256 t2 = _mm256_unpacklo_ps(acc[4 + half], acc[6 + half]);
                    const __m256 t3 = _mm256_unpackhi_ps(acc[4 + half], acc[6 + half]);
                    const __m256 r0 = _mm256_shuffle_ps(t0, t2, 0x44), r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                    const __m256 r2 = _mm256_shuffle_ps(t1, t3, 0x44), r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                    float *o = y + c + 16 * half;
                    add8(o, _mm256_permute2f128_ps(r0, r1, 0x20), cg);
                    add8(o + 8, _mm256_permute2f128_ps(r2, r3, 0x20), cg);
                    add8(o + 32, _mm256_permute2f128_ps(r0, r1, 0x31), cg);
                    add8(o + 40, _mm256_permute2f128_ps(r2, r3, 0x31), cg);
                } else { /* column 16 blk + 8 half + 2 (d & 3) + s */
                    const __m256 lo = _mm256_unpacklo_ps(acc[half], acc[2 + half]);
                    const __m256 hi = _mm256_unpackhi_ps(acc[half], acc[2 + half]);
                    float *o = y + c + 8 * half;
                    add8(o, _mm256_permute2f128_ps(lo, hi, 0x20), cg);
                    add8(o + 16, _mm256_permute2f128_ps(lo, hi, 0x31), cg);
                }
            }
        }
    }
}

static void band16_axpy(int b, int64_t nr, const int64_t *off, const uint8_t *data, const float *sc, const float *bi,
                        int64_t ng, const float *h, float *y, int64_t C, int64_t G) {
    if (b == 2)
        band16_axpy_b(2, nr, off, data, sc, bi, ng, h, y, C, G);
    else
        band16_axpy_b(4, nr, off, data, sc, bi, ng, h, y, C, G);
}
#endif
#else
/* Portable rows: column order (no permutation). */
static inline float qdot(int b, const uint8_t *p, const float *xp, const float *sc, const float *bi,
                         const float *xs, int64_t C, int64_t G) {
    float total = 0.0f;
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        float acc = 0.0f;
        for (int64_t c = g0; c < end; c++) acc += code_at(p, b, c) * xp[c];
        total += sc[gi] * acc + bi[gi] * xs[gi];
    }
    return total;
}

static inline void qaxpy(int b, float h, const uint8_t *p, const float *sc, const float *bi, float *yp, int64_t C,
                         int64_t G) {
    for (int64_t g0 = 0, gi = 0; g0 < C; g0 += G, gi++) {
        const int64_t end = g0 + G < C ? g0 + G : C;
        const float hs = h * sc[gi], hb = h * bi[gi];
        for (int64_t c = g0; c < end; c++) yp[c] += code_at(p, b, c) * hs + hb;
    }
}

static inline void qdeq(int b, const uint8_t *p, const float *sc, const float *bi, float *w, int64_t C, int64_t G) {
    for (int64_t c = 0; c < C; c++) w[c] = code_at(p, b, c) * sc[c / G] + bi[c / G];
}

static inline int64_t layout_codes(int b) { (void)b; return 1; }
#endif

/* x (n,) column order -> xp in the unpack order of K codes a lane (K = 1: a copy) */
static void permute(const float *x, float *xp, int64_t n, int64_t K) {
    if (K == 1) {
        memcpy(xp, x, (size_t)n * sizeof *x);
        return;
    }
    for (int64_t blk = 0; blk < n; blk += 8 * K)
        for (int64_t l = 0; l < 8; l++)
            for (int64_t s = 0; s < K; s++) xp[blk + s * 8 + l] = x[blk + l * K + s];
}

static void unpermute_add(const float *yp, float *y, int64_t n, int64_t K) {
    if (K == 1) {
        for (int64_t c = 0; c < n; c++) y[c] += yp[c];
        return;
    }
    for (int64_t blk = 0; blk < n; blk += 8 * K)
        for (int64_t l = 0; l < 8; l++)
            for (int64_t s = 0; s < K; s++) y[blk + l * K + s] += yp[blk + s * 8 + l];
}

/* y (C,) += sum over rows j0 <= j < j1 of h[j] * row_j, rows taken band by band (equal bit widths are adjacent) */
static void rows_axpy(const uint8_t *bits, const int64_t *off, const uint8_t *data, const float *sc, const float *bi,
                      int64_t ng, const float *h, int64_t nrows, float *y, float *yp, int64_t C, int64_t G,
                      int act_bf16) {
    (void)act_bf16; /* read only by the AVX512-BF16 build */
    for (int64_t j = 0; j < nrows;) {
        const int b = bits[j];
#ifdef DF_BF16DP
        if (fast16(b, act_bf16)) {
            int64_t e = j;
            while (e < nrows && bits[e] == b) e++;
            band16_axpy(b, e - j, off + j, data, sc + j * ng, bi + j * ng, ng, h + j, y, C, G);
            j = e;
            continue;
        }
#endif
        const int64_t K = layout_codes(b);
        memset(yp, 0, (size_t)C * sizeof *yp);
        for (; j < nrows && bits[j] == b; j++) qaxpy(b, h[j], data + off[j], sc + j * ng, bi + j * ng, yp, C, G);
        unpermute_add(yp, y, C, K);
    }
}

static inline int64_t rows_of(const uint8_t *bits, int64_t R) {
    int64_t r = 0;
    while (r < R && bits[r]) r++;
    return r;
}

static inline void widen(const void *src, int is_bf16, float *dst, int64_t n) {
    if (is_bf16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void narrow(const float *src, void *dst, int is_bf16, int64_t n) {
    if (is_bf16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t j = 0; j < n; j++) d[j] = f32_to_bf16(src[j]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* One token: rows dequantized as they are streamed (a decode step's case: each row is read once). */
static void qtoken(int64_t in_f, int64_t out_f, int64_t G, int64_t gin, int64_t gout, const void *xi, void *yi,
                   int act_bf16, const uint8_t *bk, int64_t nrows, const int64_t *ao, const int64_t *bo,
                   const uint8_t *dk, const float *as, const float *ab, const float *bs, const float *bb) {
    float xf[in_f], xp[in_f], xs[gin], h[nrows], yf[out_f], yp[out_f];
    widen(xi, act_bf16, xf, in_f);
    for (int64_t g = 0; g < gin; g++) {
        const int64_t end = (g + 1) * G < in_f ? (g + 1) * G : in_f; /* one bound: the sum vectorises */
        float s = 0.0f;
        for (int64_t c = g * G; c < end; c++) s += xf[c];
        xs[g] = s;
    }
    int64_t K = -1;
#ifdef DF_BF16DP
    uint16_t xq[in_f];
    int64_t K16 = -1;
#endif
    for (int64_t j = 0; j < nrows; j++) {
        const int b = bk[j];
#ifdef DF_BF16DP
        if (fast16(b, act_bf16)) {
            if (8 / b != K16) {
                K16 = 8 / b;
                permute16((const uint16_t *)xi, xq, in_f, K16);
            }
            if (j + 4 <= nrows && bk[j + 1] == b && bk[j + 2] == b && bk[j + 3] == b) {
                const uint8_t *const p4[4] = {dk + ao[j], dk + ao[j + 1], dk + ao[j + 2], dk + ao[j + 3]};
                qdot16x4(b, p4, xq, as + j * gin, ab + j * gin, gin, xs, in_f, G, h + j);
                j += 3;
                continue;
            }
            h[j] = qdot16(b, dk + ao[j], xq, as + j * gin, ab + j * gin, xs, in_f, G);
            continue;
        }
#endif
        if (layout_codes(b) != K) {
            K = layout_codes(b);
            permute(xf, xp, in_f, K);
        }
        h[j] = qdot(b, dk + ao[j], xp, as + j * gin, ab + j * gin, xs, in_f, G);
    }
    widen(yi, act_bf16, yf, out_f);
    rows_axpy(bk, bo, dk, bs, bb, gout, h, nrows, yf, yp, out_f, G, act_bf16);
    narrow(yf, yi, act_bf16, out_f);
}

/* m > 1 tokens of one slot (tok: their rows in x and y): each row dequantized once into w, then applied to every
 * token of the group, in the row's permuted order (activations permuted per band, outputs added back per band). */
static void qrun(int64_t m, const int64_t *tok, int64_t in_f, int64_t out_f, int64_t G, int64_t gin, int64_t gout,
                 const char *x, int64_t sx, char *y, int64_t sy, int64_t esz, int act_bf16, const uint8_t *bk,
                 int64_t nrows, const int64_t *ao, const int64_t *bo, const uint8_t *dk, const float *as,
                 const float *ab, const float *bs, const float *bb) {
    const int64_t wn = in_f > out_f ? in_f : out_f;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(m * (2 * in_f + 2 * out_f + nrows) + wn));
    if (buf == NULL) { /* out of memory: one token at a time needs no heap */
        for (int64_t t = 0; t < m; t++)
            qtoken(in_f, out_f, G, gin, gout, x + tok[t] * sx * esz, y + tok[t] * sy * esz, act_bf16, bk, nrows, ao,
                   bo, dk, as, ab, bs, bb);
        return;
    }
    float *xf = buf, *xp = xf + m * in_f, *yf = xp + m * in_f, *yp = yf + m * out_f, *h = yp + m * out_f,
          *w = h + m * nrows;
    for (int64_t t = 0; t < m; t++) widen(x + tok[t] * sx * esz, act_bf16, xf + t * in_f, in_f);
    int64_t K = -1;
    for (int64_t j = 0; j < nrows; j++) {
        const int b = bk[j];
        if (layout_codes(b) != K) {
            K = layout_codes(b);
            for (int64_t t = 0; t < m; t++) permute(xf + t * in_f, xp + t * in_f, in_f, K);
        }
        qdeq(b, dk + ao[j], as + j * gin, ab + j * gin, w, in_f, G);
        for (int64_t t = 0; t < m; t++) {
            const float *xt = xp + t * in_f;
            float acc = 0.0f;
            for (int64_t c = 0; c < in_f; c++) acc += w[c] * xt[c];
            h[t * nrows + j] = acc;
        }
    }
    for (int64_t t = 0; t < m; t++) widen(y + tok[t] * sy * esz, act_bf16, yf + t * out_f, out_f);
    for (int64_t j = 0; j < nrows;) {
        const int b = bk[j];
        memset(yp, 0, sizeof(float) * (size_t)(m * out_f));
        for (; j < nrows && bk[j] == b; j++) {
            qdeq(b, dk + bo[j], bs + j * gout, bb + j * gout, w, out_f, G);
            for (int64_t t = 0; t < m; t++) {
                float *yt = yp + t * out_f;
                const float ht = h[t * nrows + j];
                for (int64_t c = 0; c < out_f; c++) yt[c] += ht * w[c];
            }
        }
        for (int64_t t = 0; t < m; t++) unpermute_add(yp + t * out_f, yf + t * out_f, out_f, layout_codes(b));
    }
    for (int64_t t = 0; t < m; t++) narrow(yf + t * out_f, y + tok[t] * sy * esz, act_bf16, out_f);
    free(buf);
}

#ifndef QRUN_MAX
#define QRUN_MAX 16 /* tokens of one slot sharing a row's dequantization (heap: QRUN_MAX * (in + out) floats x 2) */
#endif

/* Whether every row of a slot takes the AVX512-BF16 path: its tokens then run one by one (faster than a group's
 * shared fp32 dequantization). */
static inline int all_fast16(const uint8_t *bk, int64_t R, int act_bf16) {
#ifdef DF_BF16DP
    for (int64_t j = 0; j < R && bk[j]; j++)
        if (!fast16(bk[j], act_bf16)) return 0;
    return 1;
#else
    (void)bk, (void)R, (void)act_bf16;
    return 0;
#endif
}

static inline void prefetch_span(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

/* Every byte a unit of one slot reads (its rows' codes, scales and biases), requested at once before the unit's work:
 * in DRAM, a row is a few cache lines in five arrays, too short a stream for the hardware prefetcher. A mixed decode
 * step (32 tenants resident, 10 of them `ft`) took 1.5 ms less with it (median of 40 paired steps, 2-core EPYC). */
static void prefetch_slot(const uint8_t *bk, int64_t nrows, const int64_t *ao, const int64_t *bo, const uint8_t *dk,
                          const float *as, const float *ab, const float *bs, const float *bb, int64_t in_f,
                          int64_t out_f, int64_t gin, int64_t gout) {
    int64_t lo = INT64_MAX, hi = 0;
    for (int64_t j = 0; j < nrows; j++) {
        const int64_t a0 = ao[j], a1 = a0 + in_f * bk[j] / 8, b0 = bo[j], b1 = b0 + out_f * bk[j] / 8;
        lo = a0 < lo ? a0 : lo;
        lo = b0 < lo ? b0 : lo;
        hi = a1 > hi ? a1 : hi;
        hi = b1 > hi ? b1 : hi;
    }
    if (nrows > 0) prefetch_span(dk + lo, hi - lo);
    prefetch_span(as, nrows * gin * 4);
    prefetch_span(ab, nrows * gin * 4);
    prefetch_span(bs, nrows * gout * 4);
    prefetch_span(bb, nrows * gout * 4);
}

/* act_bf16: whether x, y are bfloat16 (else float32). The tokens of one slot, wherever they sit in the batch (a
 * prefill chunk's, or the decode rows of a tenant with several requests), form groups of at most QRUN_MAX tokens,
 * in order of first appearance; groups are handed to threads one at a time. */
void qlora_bgmv(int64_t n, int64_t in_f, int64_t out_f, int64_t R, int64_t G, const void *x, int64_t sx, void *y,
                int64_t sy, int64_t act_bf16, const uint8_t *bits, const int64_t *aoff, const int64_t *boff,
                const uint8_t *data, int64_t sd, const float *ascale, const float *abias, const float *bscale,
                const float *bbias, const int64_t *idx, int64_t null_row) {
    const int64_t gin = (in_f + G - 1) / G, gout = (out_f + G - 1) / G, esz = act_bf16 ? 2 : 4;
    const int64_t cap = n > 0 ? n : 1;
    int64_t tok[cap], start[cap], len[cap], next[cap], last[null_row + 1], groups = 0, used = 0;
    /* next[i]: the following token of i's slot (-1: none), so each slot's tokens are walked once (slots <= null_row) */
    for (int64_t k = 0; k <= null_row; k++) last[k] = -1;
    for (int64_t i = n - 1; i >= 0; i--) {
        next[i] = -1;
        if (idx[i] < 0 || idx[i] > null_row) continue; /* (never from the engine) read as the null row */
        next[i] = last[idx[i]];
        last[idx[i]] = i;
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t k = idx[i];
        if (k < 0 || k >= null_row || last[k] != i || bits[k * R] == 0) continue; /* null, a later token, no rows */
        const int64_t run = all_fast16(bits + k * R, R, (int)act_bf16) ? 1 : QRUN_MAX;
        for (int64_t j = i, m = run; j >= 0; j = next[j], m++) {
            if (m == run) {
                start[groups] = used;
                len[groups++] = 0;
                m = 0;
            }
            tok[used++] = j;
            len[groups - 1]++;
        }
    }
    _Pragma("omp parallel for schedule(dynamic, 1) if (groups > 1)")
    for (int64_t r = 0; r < groups; r++) {
        const int64_t *tr = tok + start[r], k = idx[tr[0]], nrows = rows_of(bits + k * R, R);
        const uint8_t *bk = bits + k * R, *dk = data + k * sd;
        const int64_t *ao = aoff + k * R, *bo = boff + k * R;
        const float *as = ascale + k * R * gin, *ab = abias + k * R * gin, *bs = bscale + k * R * gout,
                    *bb = bbias + k * R * gout;
        prefetch_slot(bk, nrows, ao, bo, dk, as, ab, bs, bb, in_f, out_f, gin, gout);
        if (len[r] == 1)
            qtoken(in_f, out_f, G, gin, gout, (const char *)x + tr[0] * sx * esz, (char *)y + tr[0] * sy * esz,
                   (int)act_bf16, bk, nrows, ao, bo, dk, as, ab, bs, bb);
        else
            qrun(len[r], tr, in_f, out_f, G, gin, gout, (const char *)x, sx, (char *)y, sy, esz, (int)act_bf16, bk,
                 nrows, ao, bo, dk, as, ab, bs, bb);
    }
}

/* One-pointer entry for the bound Python caller: a[] holds qlora_bgmv's arguments in order, pointers as integers
 * (ctypes converts one argument instead of twenty-one). */
void qlora_bgmv_packed(const int64_t *a) {
#define P(T, v) ((T *)(intptr_t)(v))
    qlora_bgmv(a[0], a[1], a[2], a[3], a[4], P(const void, a[5]), a[6], P(void, a[7]), a[8], a[9],
               P(const uint8_t, a[10]), P(const int64_t, a[11]), P(const int64_t, a[12]), P(const uint8_t, a[13]),
               a[14], P(const float, a[15]), P(const float, a[16]), P(const float, a[17]), P(const float, a[18]),
               P(const int64_t, a[19]), a[20]);
#undef P
}

void qlora_embed(int64_t n, int64_t H, int64_t V, int64_t R, int64_t G, const int64_t *ids, void *y, int64_t sy,
                 int64_t act_bf16, const uint8_t *bits, const int64_t *aoff, const int64_t *boff,
                 const uint8_t *data, int64_t sd, const float *ascale, const float *abias, const float *bscale,
                 const float *bbias, const int64_t *idx, int64_t null_row) {
    const int64_t gh = (H + G - 1) / G, gv = (V + G - 1) / G, esz = act_bf16 ? 2 : 4;
    _Pragma("omp parallel for schedule(dynamic, 1) if (n > 1)")
    for (int64_t i = 0; i < n; i++) {
        const int64_t k = idx[i];
        if (k == null_row) continue;
        const uint8_t *bk = bits + k * R;
        const int64_t nrows = rows_of(bk, R), t = ids[i], g = t / G;
        if (nrows == 0) continue;
        const uint8_t *dk = data + k * sd;
        float coef[nrows], yf[H], yp[H];
        for (int64_t j = 0; j < nrows; j++)
            coef[j] = code_at(dk + boff[k * R + j], bk[j], t) * bscale[(k * R + j) * gv + g] + bbias[(k * R + j) * gv + g];
        void *yi = (char *)y + i * sy * esz;
        widen(yi, (int)act_bf16, yf, H);
        rows_axpy(bk, aoff + k * R, dk, ascale + k * R * gh, abias + k * R * gh, gh, coef, nrows, yf, yp, H, G,
                  (int)act_bf16);
        narrow(yf, yi, (int)act_bf16, H);
    }
}

/* 3: AVX2 row loops with AVX512-BF16 rows of 2 and 4 bits, 2: AVX2 row loops, 0: portable */
int qlora_path(void) {
#if defined(DF_BF16DP)
    return 3;
#elif defined(DF_AVX2)
    return 2;
#else
    return 0;
#endif
}
