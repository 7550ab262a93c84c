/* Batched gather LoRA ("BGMV", Punica, Chen et al. 2023, sec. 4) for CPU decode: every token reads its own
 * adapter's A and B rows in place from the slot pool; no gathered copy of adapter weights, no per-adapter
 * dispatch. One call adapts one projection of a whole mixed batch:
 *
 *     for every token i with k = idx[i] != null_row:
 *         h = A[k, :r, :] @ x[i, :]          (r,)
 *         y[i, :] += h @ B[k, :r, :]         (out,)
 *
 * Shapes (row-major, last dimension contiguous): x (n, in) row stride sx; y (n, out) row stride sy, updated in
 * place; A (slots, R, in) strides sa0, sa1; B (slots, R, out) strides sb0, sb1; idx (n,) int64; r <= R.
 * Tokens are independent: the loop over them runs on OpenMP threads (torch's own runtime when loaded by it).
 * The reference semantics are `ReferenceBackend.additive` in serve/engine/backends.py. */
#include <stdint.h>

void lora_bgmv_f32(int64_t n, int64_t in_f, int64_t out_f, int64_t r,
                   const float *x, int64_t sx, float *y, int64_t sy,
                   const float *A, int64_t sa0, int64_t sa1,
                   const float *B, int64_t sb0, int64_t sb1,
                   const int64_t *idx, int64_t null_row) {
    #pragma omp parallel for schedule(static) if (n > 1)
    for (int64_t i = 0; i < n; i++) {
        int64_t k = idx[i];
        if (k == null_row) continue;
        const float *xi = x + i * sx;
        float *yi = y + i * sy;
        float h[r > 0 ? r : 1];
        for (int64_t j = 0; j < r; j++) {
            const float *a = A + k * sa0 + j * sa1;
            float acc = 0.0f;
            for (int64_t c = 0; c < in_f; c++) acc += a[c] * xi[c];
            h[j] = acc;
        }
        for (int64_t j = 0; j < r; j++) {
            const float *b = B + k * sb0 + j * sb1;
            const float hj = h[j];
            for (int64_t c = 0; c < out_f; c++) yi[c] += hj * b[c];
        }
    }
}
