/* OneBit's packed sign matmul (store/signs.py layout), fp32:
 *
 *     y[n, r] = h[r] * sum_c S[r, c] * xg[n, c],    S[r, c] = +1 where bit c % 8 of byte c / 8 of row r is set, else -1
 *
 * computed without multiplications by the signs (sign-select-add): with T[n] = sum_c xg[n, c] and P[n, r] the sum of
 * xg[n, c] over the +1 columns of row r, sum_c S[r, c] xg[n, c] = 2 P[n, r] - T[n]. P is one masked add per 16 columns
 * on AVX-512 (the 16 sign bits are the mask); on AVX2, one AND of 8 x values with the mask made from one byte (a
 * compare against the bit pattern) and one add; on the portable path, a dot product of xg with the row's bits
 * expanded once to 0.0 / 1.0 floats (reused by every token of the call). xg = x * g (the input scale) is formed by
 * the caller. Rows run on OpenMP threads; a row's tokens go in blocks of 4 so each mask load serves 4 accumulators.
 *
 * Layout: xg (N, C) with row stride sx; packed (R, Cb) with Cb = ceil(C / 8); h (R,); y (N, R) with row stride sy.
 * Returns 0, or 1 when Cb is too small for C. */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SIGN_PATH 2
#elif defined(__AVX2__)
#include <immintrin.h>
#define SIGN_PATH 1
#else
#define SIGN_PATH 0
#endif
#define SIGN_SIMD (SIGN_PATH > 0)

int sign_matmul_path(void) { return SIGN_PATH; }

static inline int bit_at(const uint8_t *row, int64_t c) { return (row[c >> 3] >> (c & 7)) & 1; }

#if SIGN_PATH == 2
/* P for tokens n0 .. n0 + nt - 1 (nt <= 4) of one row. */
static void plus_sums(int64_t C, const float *xg, int64_t sx, int64_t n0, int nt, const uint8_t *row, float *P) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        const __mmask16 m = (__mmask16)(row[c >> 3] | ((unsigned)row[(c >> 3) + 1] << 8));
        for (int t = 0; t < nt; t++)
            acc[t] = _mm512_mask_add_ps(acc[t], m, acc[t], _mm512_loadu_ps(xg + (n0 + t) * sx + c));
    }
    for (int t = 0; t < nt; t++) {
        float s = _mm512_reduce_add_ps(acc[t]);
        for (int64_t k = c; k < C; k++)
            if (bit_at(row, k)) s += xg[(n0 + t) * sx + k];
        P[t] = s;
    }
}
#elif SIGN_PATH == 1
static void plus_sums(int64_t C, const float *xg, int64_t sx, int64_t n0, int nt, const uint8_t *row, float *P) {
    const __m256i pattern = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
        const __m256i b = _mm256_and_si256(_mm256_set1_epi32(row[c >> 3]), pattern);
        const __m256 m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, pattern));
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_add_ps(acc[t], _mm256_and_ps(m, _mm256_loadu_ps(xg + (n0 + t) * sx + c)));
    }
    for (int t = 0; t < nt; t++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h);
        for (int64_t k = c; k < C; k++)
            if (bit_at(row, k)) s += xg[(n0 + t) * sx + k];
        P[t] = s;
    }
}
#else
static void plus_sums(int64_t C, const float *xg, int64_t sx, int64_t n0, int nt, const float *ones, float *P) {
    for (int t = 0; t < nt; t++) {
        const float *x = xg + (n0 + t) * sx;
        float s = 0.0f;
        for (int64_t c = 0; c < C; c++) s += ones[c] * x[c];
        P[t] = s;
    }
}
#endif

int sign_matmul_f32(int64_t N, int64_t C, int64_t R, const float *xg, int64_t sx, const uint8_t *packed, int64_t Cb,
                    const float *h, float *y, int64_t sy) {
    if (Cb * 8 < C) return 1;
    float *T = malloc(sizeof(float) * (N > 0 ? N : 1));
    for (int64_t n = 0; n < N; n++) {
        float s = 0.0f;
        for (int64_t c = 0; c < C; c++) s += xg[n * sx + c];
        T[n] = s;
    }
    #pragma omp parallel
    {
#if !SIGN_SIMD
        float *ones = malloc(sizeof(float) * (C > 0 ? C : 1));
#endif
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const uint8_t *row = packed + r * Cb;
#if !SIGN_SIMD
            for (int64_t c = 0; c < C; c++) ones[c] = (float)bit_at(row, c);
#endif
            for (int64_t n0 = 0; n0 < N; n0 += 4) {
                const int nt = N - n0 < 4 ? (int)(N - n0) : 4;
                float P[4];
#if SIGN_SIMD
                plus_sums(C, xg, sx, n0, nt, row, P);
#else
                plus_sums(C, xg, sx, n0, nt, ones, P);
#endif
                for (int t = 0; t < nt; t++) y[(n0 + t) * sy + r] = h[r] * (2.0f * P[t] - T[n0 + t]);
            }
        }
#if !SIGN_SIMD
        free(ones);
#endif
    }
    free(T);
    return 0;
}

/* The ±1 matrix S of `packed` written out densely (for large token counts, where a dense matmul over S beats the
 * sign-select-add loop): out (R, C) row-major, as bf16 bit patterns (+1 = 0x3F80, -1 = 0xBF80) when bf16 is
 * nonzero, else as fp32. Each byte's 8 values are copied from a 256-entry table. One thread: it takes about 0.1 ms
 * for a 1536 x 576 matrix, and the matmul that follows runs on torch's threads, which OpenMP threads of this
 * library left spinning would slow (measured: fp32 matmul after a parallel unpack 2.8x slower). */
#include <string.h>

static float table_f32[256][8];
static uint16_t table_bf16[256][8];

static void build_tables(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 8; k++) {
            table_f32[b][k] = ((b >> k) & 1) ? 1.0f : -1.0f;
            table_bf16[b][k] = ((b >> k) & 1) ? 0x3F80u : 0xBF80u;
        }
}

void sign_unpack(int64_t R, int64_t C, const uint8_t *packed, int64_t Cb, int64_t bf16, void *out) {
    if (table_f32[0][0] == 0.0f) build_tables(); /* once, before the threads start */
    const int64_t full = C / 8;
    for (int64_t r = 0; r < R; r++) {
        const uint8_t *row = packed + r * Cb;
        if (bf16) {
            uint16_t *o = (uint16_t *)out + r * C;
            for (int64_t j = 0; j < full; j++) memcpy(o + 8 * j, table_bf16[row[j]], sizeof table_bf16[0]);
            for (int64_t c = 8 * full; c < C; c++) o[c] = table_bf16[row[c >> 3]][c & 7];
        } else {
            float *o = (float *)out + r * C;
            for (int64_t j = 0; j < full; j++) memcpy(o + 8 * j, table_f32[row[j]], sizeof table_f32[0]);
            for (int64_t c = 8 * full; c < C; c++) o[c] = table_f32[row[c >> 3]][c & 7];
        }
    }
}
