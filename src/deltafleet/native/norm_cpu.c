/* RMSNorm rows for CPU decode (Zhang & Sennrich 2019; Hugging Face's Llama semantics): one call per norm instead of
 * the six to eight ATen ops a bf16 RMSNorm dispatches (61 norms a SmolLM2 step).
 *
 *     r = 1 / sqrt(mean_j x[i, j]^2 + eps)       (float32, x widened)
 *     float32:  y[i, j] = x[i, j] * r * w[j]
 *     bfloat16: y[i, j] = bf16( w[j] * bf16(x[i, j] * r) )   (HF: the normalized x cast to bf16, then times w)
 *
 *   x (n, d) row stride sx; w (d,); y (n, d) row stride sy. Rounding to bf16 is to nearest even, as torch's.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

void rms_norm_f32(int64_t n, int64_t d, const float *x, int64_t sx, const float *w, float eps, float *y,
                  int64_t sy) {
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * sx;
        float *yi = y + i * sy;
        float ss = 0.0f;
        for (int64_t j = 0; j < d; j++) ss += xi[j] * xi[j];
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t j = 0; j < d; j++) yi[j] = xi[j] * r * w[j];
    }
}

/* r = 1 / sqrt(mean(x^2) + eps) of one bfloat16 row */
static inline float rms_scale_bf16(const uint16_t *xi, int64_t d, float eps) {
    float ss = 0.0f;
    for (int64_t j = 0; j < d; j++) {
        const float v = bf16_to_f32(xi[j]);
        ss += v * v;
    }
    return 1.0f / sqrtf(ss / (float)d + eps);
}

/* one bfloat16 row: y = bf16(w * bf16(x * r)) */
static inline void norm_row_bf16(const uint16_t *xi, const uint16_t *w, float r, uint16_t *yi, int64_t d) {
    for (int64_t j = 0; j < d; j++)
        yi[j] = f32_to_bf16(bf16_to_f32(w[j]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xi[j]) * r)));
}

void rms_norm_bf16(int64_t n, int64_t d, const uint16_t *x, int64_t sx, const uint16_t *w, float eps, uint16_t *y,
                   int64_t sy) {
    for (int64_t i = 0; i < n; i++)
        norm_row_bf16(x + i * sx, w, rms_scale_bf16(x + i * sx, d, eps), y + i * sy, d);
}

/* Per-token gain deltas on RMSNorm outputs (a whole fine-tune's or HiWi's norms, served in mixed batches):
 *
 *     y[i, j] += u[i, j] * delta[idx[i], j]      for every row i with idx[i] != null_row (others untouched)
 *
 *   u (n, d) the normalised input (row stride su), y (n, d) the norm's output (row stride sy), updated in place;
 *   delta (S, d) row stride sdl, of y's dtype; idx (n,) int64 (an id outside [0, S) is read as the null row).
 *   bfloat16: the product and sum in float32, y rounded once (torch's addcmul on bf16 tensors). */
void norm_gain_f32(int64_t n, int64_t d, const float *u, int64_t su, float *y, int64_t sy, const float *delta,
                   int64_t sdl, int64_t S, const int64_t *idx, int64_t null_row) {
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] == null_row || idx[i] < 0 || idx[i] >= S) continue;
        const float *ui = u + i * su, *di = delta + idx[i] * sdl;
        float *yi = y + i * sy;
        for (int64_t j = 0; j < d; j++) yi[j] += ui[j] * di[j];
    }
}

void norm_gain_bf16(int64_t n, int64_t d, const uint16_t *u, int64_t su, uint16_t *y, int64_t sy,
                    const uint16_t *delta, int64_t sdl, int64_t S, const int64_t *idx, int64_t null_row) {
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] == null_row || idx[i] < 0 || idx[i] >= S) continue;
        const uint16_t *ui = u + i * su, *di = delta + idx[i] * sdl;
        uint16_t *yi = y + i * sy;
        for (int64_t j = 0; j < d; j++)
            yi[j] = f32_to_bf16(bf16_to_f32(yi[j]) + bf16_to_f32(ui[j]) * bf16_to_f32(di[j]));
    }
}

/* An RMSNorm and a per-token gain delta in one pass (bfloat16; a whole fine-tune's norms served in a mixed batch):
 *
 *     u = bf16(x[i, j] * r)                            (the normalised input, `unit_rms`)
 *     y[i, j] = bf16(w[j] * u)                         (rms_norm_bf16)
 *     y[i, j] = bf16(y[i, j] + u * delta[idx[i], j])   (norm_gain_bf16) for every row with idx[i] in [0, S), != null_row
 *
 * bit-identical to rms_norm_bf16, the unit (rms_norm_bf16 with w = 1) and norm_gain_bf16 in turn, in one call and
 * one pass over x instead of three calls. */
void rms_norm_gain_bf16(int64_t n, int64_t d, const uint16_t *x, int64_t sx, const uint16_t *w, float eps, uint16_t *y,
                        int64_t sy, const uint16_t *delta, int64_t sdl, int64_t S, const int64_t *idx,
                        int64_t null_row) {
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *xi = x + i * sx;
        uint16_t *yi = y + i * sy;
        const float r = rms_scale_bf16(xi, d, eps);
        const int64_t k = idx[i];
        if (k == null_row || k < 0 || k >= S) {
            norm_row_bf16(xi, w, r, yi, d);
            continue;
        }
        const uint16_t *di = delta + k * sdl;
        for (int64_t j = 0; j < d; j++) {
            const float u = bf16_to_f32(f32_to_bf16(bf16_to_f32(xi[j]) * r));
            yi[j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(w[j]) * u)) + u * bf16_to_f32(di[j]));
        }
    }
}
