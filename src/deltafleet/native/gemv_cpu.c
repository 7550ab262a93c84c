/* Dense matrix-vector products for decode steps with few rows: y = x @ W^T (+ bias), W row-major (N, K).
 *
 * A decode step of a small model multiplies 1-16 token rows by each projection; the weights (hundreds of MB) come
 * from DRAM once per step, so the step is a streaming read of W and its speed is the bandwidth that read reaches.
 * oneDNN's matmul reaches about 14 GB/s on SmolLM2's 576-wide projections at one row (2-core AMD EPYC, bf16),
 * against about 33 GB/s for a plain streaming sum; this kernel reads each weight row once, sequentially, and
 * computes all M rows' dot products from it while it is in L1 (x, M x K, stays in L1/L2). Weight rows are taken
 * four at a time, so each x chunk loaded serves four rows.
 *
 *     for n < N, m < M:  y[m, n] = round( sum_k x[m, k] * W[n, k] + bias[n] )
 *
 *   x (M, K) row stride sx; W (N, K) row stride sw; bias (N,) or NULL; y (M, N) row stride sy.
 *   Products are summed in float32 (four independent accumulators, so the order differs from a sequential sum
 *   by reassociation only); y is rounded once to its dtype (bf16: to nearest even, as torch does).
 *
 * Variants by dtype (x, W and y share it): `gemv_f32` and `gemv_bf16`. bf16 uses AVX512-BF16's dot product
 * (vdpbf16ps, two bf16 products per fp32 lane) where the compiler targets it (-march=native on a CPU with
 * avx512_bf16), else widens bf16 to fp32 (a 16-bit shift) and uses AVX2 FMA, else plain loops. Output rows are
 * split over OpenMP threads (torch's runtime when loaded by it), each thread streaming a contiguous block of W.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DF_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DF_AVX512BF16 1
#endif

#ifndef GEMV_PARALLEL_MIN
#define GEMV_PARALLEL_MIN 65536 /* weights (N * K) below this run on one thread: a fork costs more */
#endif

/* While four weight rows are read, the same offsets of the next four rows (the next block, contiguous after this
 * one) are prefetched: one 64-byte line per row per 64 bytes consumed, a block ahead of the read position. */
#define PREFETCH_NEXT_BLOCK(w, sw, k)                                                                \
    do {                                                                                             \
        __builtin_prefetch((w) + 4 * (sw) + (k), 0, 0);                                              \
        __builtin_prefetch((w) + 5 * (sw) + (k), 0, 0);                                              \
        __builtin_prefetch((w) + 6 * (sw) + (k), 0, 0);                                              \
        __builtin_prefetch((w) + 7 * (sw) + (k), 0, 0);                                              \
    } while (0)


/* ------------------------------------------------------------------------------------------------ float32 */
static inline float dot_f32(const float *w, const float *x, int64_t K) {
#ifdef DF_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), s3);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float acc = _mm_cvtss_f32(h);
    for (; k < K; k++) acc += w[k] * x[k];
    return acc;
#else
    float acc = 0.0f;
    for (int64_t k = 0; k < K; k++) acc += w[k] * x[k];
    return acc;
#endif
}

/* Four weight rows against one x row: x is loaded once for four rows (x traffic per weight byte / 4). */
static inline void dot4_f32(const float *w, int64_t sw, const float *x, int64_t K, float out[4]) {
#ifdef DF_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if ((k & 15) == 0) PREFETCH_NEXT_BLOCK(w, sw, k);
        const __m256 xv = _mm256_loadu_ps(x + k);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), xv, s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + sw + k), xv, s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * sw + k), xv, s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * sw + k), xv, s3);
    }
    __m256 acc[4] = {s0, s1, s2, s3};
    for (int j = 0; j < 4; j++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        out[j] = _mm_cvtss_f32(h);
        for (int64_t t = k; t < K; t++) out[j] += w[j * sw + t] * x[t];
    }
#else
    for (int j = 0; j < 4; j++) out[j] = dot_f32(w + j * sw, x, K);
#endif
}

/* ------------------------------------------------------------------------------------------------ bfloat16 */
static inline float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t K) {
#if defined(DF_AVX512BF16)
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(w + k + 32),
                              (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k + 32 <= K; k += 32)
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    if (k < K) {
        const __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(tail, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif defined(DF_AVX2)
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i w0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k)));
        __m256i x0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + k)));
        __m256i w1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k + 8)));
        __m256i x1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + k + 8)));
        s0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
                             _mm256_castsi256_ps(_mm256_slli_epi32(x0, 16)), s0);
        s1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)),
                             _mm256_castsi256_ps(_mm256_slli_epi32(x1, 16)), s1);
    }
    __m256 s = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float acc = _mm_cvtss_f32(h);
    for (; k < K; k++) acc += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return acc;
#else
    float acc = 0.0f;
    for (int64_t k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return acc;
#endif
}

static inline void dot4_bf16(const uint16_t *w, int64_t sw, const uint16_t *x, int64_t K, float out[4]) {
#if defined(DF_AVX512BF16)
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        PREFETCH_NEXT_BLOCK(w, sw, k);
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(w + k), xv);
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(w + sw + k), xv);
        s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_loadu_si512(w + 2 * sw + k), xv);
        s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_loadu_si512(w + 3 * sw + k), xv);
    }
    if (k < K) {
        const __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + k);
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + k), xv);
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + sw + k), xv);
        s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + 2 * sw + k), xv);
        s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + 3 * sw + k), xv);
    }
    out[0] = _mm512_reduce_add_ps(s0);
    out[1] = _mm512_reduce_add_ps(s1);
    out[2] = _mm512_reduce_add_ps(s2);
    out[3] = _mm512_reduce_add_ps(s3);
#else
    for (int j = 0; j < 4; j++) out[j] = dot_bf16(w + j * sw, x, K);
#endif
}

/* The driver of one dtype T (float or uint16_t = bf16): blocks of four weight rows split over threads; LOAD widens a
 * bias element to float, STORE rounds a float result to T. */
#define DEFINE_GEMV(NAME, T, SUF, LOAD, STORE)                                                       \
void NAME(int64_t M, int64_t K, int64_t N, const T *x, int64_t sx, const T *W, int64_t sw,           \
          const T *bias, T *y, int64_t sy) {                                                         \
    const int64_t blocks = (N + 3) / 4;                                                              \
    _Pragma("omp parallel for schedule(static) if (N * K >= GEMV_PARALLEL_MIN)")                     \
    for (int64_t blk = 0; blk < blocks; blk++) {                                                     \
        const int64_t n0 = blk * 4;                                                                  \
        if (n0 + 4 <= N) {                                                                           \
            for (int64_t m = 0; m < M; m++) {                                                        \
                float d[4];                                                                          \
                dot4_##SUF(W + n0 * sw, sw, x + m * sx, K, d);                                       \
                for (int j = 0; j < 4; j++)                                                          \
                    y[m * sy + n0 + j] = STORE(d[j] + (bias ? LOAD(bias[n0 + j]) : 0.0f));           \
            }                                                                                        \
        } else {                                                                                     \
            for (int64_t n = n0; n < N; n++)                                                         \
                for (int64_t m = 0; m < M; m++)                                                      \
                    y[m * sy + n] = STORE(dot_##SUF(W + n * sw, x + m * sx, K)                       \
                                          + (bias ? LOAD(bias[n]) : 0.0f));                          \
        }                                                                                            \
    }                                                                                                \
}

static inline float f32_identity(float v) { return v; }

DEFINE_GEMV(gemv_f32, float, f32, f32_identity, f32_identity)
DEFINE_GEMV(gemv_bf16, uint16_t, bf16, bf16_to_f32, f32_to_bf16)

/* Which bf16 path this build took (for tests and reports): 2 AVX512-BF16, 1 AVX2 widening, 0 plain loops. */
int gemv_bf16_path(void) {
#if defined(DF_AVX512BF16)
    return 2;
#elif defined(DF_AVX2)
    return 1;
#else
    return 0;
#endif
}
