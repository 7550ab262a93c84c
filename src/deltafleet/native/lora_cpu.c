/* Batched gather adapter kernels for CPU decode: every token reads its own adapter's rows in place from the
 * slot pool; no gathered copy of adapter weights, no per-adapter dispatch. One call adapts one projection of a
 * whole mixed batch. The reference semantics are `ReferenceBackend` in serve/engine/backends.py.
 *
 * BGMV, additive (LoRA and low-rank deltas; Punica, Chen et al. 2023, sec. 4):
 *     for every token i with k = idx[i] != null_row:
 *         h = A[k, :r, :] @ x[i, :]          (r,)
 *         y[i, :] += h @ B[k, :r, :]         (out,)
 *   x (n, in) row stride sx; y (n, out) row stride sy, updated in place; A (slots, R, in) strides sa0, sa1;
 *   B (slots, R, out) strides sb0, sb1; idx (n,) int64; r <= R.
 *
 * RoAd, element-wise (Liao et al. 2025, sec. 3; rotate_half over groups of G = 2h outputs):
 *     for every token i with k = idx[i] != null_row, every group g, every j < h, with a = y[g*G + j],
 *     b = y[g*G + h + j]:
 *         y[g*G + j]     = a * c[k, g*G + j]     - b * s[k, g*G + j]
 *         y[g*G + h + j] = b * c[k, g*G + h + j] + a * s[k, g*G + h + j]
 *   y (n, out) row stride sy, in place; c, s (slots, out) row strides sc, ss; out % G == 0.
 *
 * x and y are float32. Adapter weights (A, B, c, s) are float32 (`_f32`) or bfloat16 (`_bf16w`, widened to
 * float32 as they are read: half the bytes a decode step streams from memory, the same fp32 arithmetic).
 * Tokens are independent: the loop over them runs on OpenMP threads (torch's own runtime when loaded by it). */
#include <stdint.h>
#include <string.h>

static inline float f32_load(const float *p, int64_t j) { return p[j]; }

static inline float bf16_load(const uint16_t *p, int64_t j) {
    uint32_t u = (uint32_t)p[j] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Rank rows go four at a time: four independent dot products over x (the shrink), and one pass over y per four
 * rows of B (the expand), so neither loop waits on a single accumulator chain and y is read and written r/4
 * times instead of r. */
#define DEFINE_BGMV(NAME, W, LOAD)                                                                  \
void NAME(int64_t n, int64_t in_f, int64_t out_f, int64_t r,                                        \
          const float *x, int64_t sx, float *y, int64_t sy,                                         \
          const W *A, int64_t sa0, int64_t sa1, const W *B, int64_t sb0, int64_t sb1,               \
          const int64_t *idx, int64_t null_row) {                                                   \
    _Pragma("omp parallel for schedule(static) if (n > 1)")                                         \
    for (int64_t i = 0; i < n; i++) {                                                               \
        int64_t k = idx[i];                                                                         \
        if (k == null_row) continue;                                                                \
        const float *xi = x + i * sx;                                                               \
        float *yi = y + i * sy;                                                                     \
        float h[r > 0 ? r + 3 : 4];                                                                 \
        int64_t j = 0;                                                                              \
        for (; j + 4 <= r; j += 4) {                                                                \
            const W *a0 = A + k * sa0 + j * sa1, *a1 = a0 + sa1, *a2 = a1 + sa1, *a3 = a2 + sa1;   \
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                       \
            for (int64_t c = 0; c < in_f; c++) {                                                    \
                const float xc = xi[c];                                                             \
                s0 += LOAD(a0, c) * xc; s1 += LOAD(a1, c) * xc;                                     \
                s2 += LOAD(a2, c) * xc; s3 += LOAD(a3, c) * xc;                                     \
            }                                                                                       \
            h[j] = s0; h[j + 1] = s1; h[j + 2] = s2; h[j + 3] = s3;                                 \
        }                                                                                           \
        for (; j < r; j++) {                                                                        \
            const W *a = A + k * sa0 + j * sa1;                                                     \
            float acc = 0.0f;                                                                       \
            for (int64_t c = 0; c < in_f; c++) acc += LOAD(a, c) * xi[c];                          \
            h[j] = acc;                                                                             \
        }                                                                                           \
        j = 0;                                                                                      \
        for (; j + 4 <= r; j += 4) {                                                                \
            const W *b0 = B + k * sb0 + j * sb1, *b1 = b0 + sb1, *b2 = b1 + sb1, *b3 = b2 + sb1;   \
            const float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];                     \
            for (int64_t c = 0; c < out_f; c++)                                                     \
                yi[c] += h0 * LOAD(b0, c) + h1 * LOAD(b1, c) + h2 * LOAD(b2, c) + h3 * LOAD(b3, c);  \
        }                                                                                           \
        for (; j < r; j++) {                                                                        \
            const W *b = B + k * sb0 + j * sb1;                                                     \
            const float hj = h[j];                                                                  \
            for (int64_t c = 0; c < out_f; c++) yi[c] += hj * LOAD(b, c);                           \
        }                                                                                           \
    }                                                                                               \
}

#define DEFINE_ROAD(NAME, W, LOAD)                                                                  \
void NAME(int64_t n, int64_t out_f, int64_t group, float *y, int64_t sy,                            \
          const W *c, int64_t sc, const W *s, int64_t ss, const int64_t *idx, int64_t null_row) {   \
    const int64_t h = group / 2;                                                                    \
    _Pragma("omp parallel for schedule(static) if (n > 1)")                                         \
    for (int64_t i = 0; i < n; i++) {                                                               \
        int64_t k = idx[i];                                                                         \
        if (k == null_row) continue;                                                                \
        float *yi = y + i * sy;                                                                     \
        const W *ci = c + k * sc, *si = s + k * ss;                                                 \
        for (int64_t g = 0; g < out_f; g += group) {                                                \
            for (int64_t j = g; j < g + h; j++) {                                                   \
                const float a = yi[j], b = yi[j + h];                                               \
                yi[j] = a * LOAD(ci, j) - b * LOAD(si, j);                                          \
                yi[j + h] = b * LOAD(ci, j + h) + a * LOAD(si, j + h);                              \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_BGMV(lora_bgmv_f32, float, f32_load)
DEFINE_BGMV(lora_bgmv_bf16w, uint16_t, bf16_load)
DEFINE_ROAD(road_apply_f32, float, f32_load)
DEFINE_ROAD(road_apply_bf16w, uint16_t, bf16_load)
