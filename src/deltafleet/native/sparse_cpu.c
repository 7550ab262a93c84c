/* Batched sparse-additive adapters for CPU decode (PaFi, Liao et al. 2023, "Parameter-Efficient Fine-Tuning
 * without Introducing New Latency": every tenant trains the same fixed subset of a projection's entries,
 * chosen from the base weights, so a projection's sparsity pattern is one CSR structure shared by the whole pool
 * and each slot holds only its values). One call adds the deltas of one projection for a whole mixed batch, every
 * token reading its own slot's values in place:
 *
 *     for every token i with k = idx[i] != null_row, every output row r < out_f:
 *         y[i, r] += sum_{j = row_ptr[r]}^{row_ptr[r+1]-1} values[k, j] * x[i, cols[j]]
 *
 *   x (n, in_f) row stride sx; y (n, out_f) row stride sy, updated in place; values (slots, nnz) row stride sv;
 *   cols (nnz,) int32, column indices within [0, in_f); row_ptr (out_f + 1,) int32, non-decreasing, CSR row
 *   pointers into cols and a values row; idx (n,) int64. Tokens on the null row are left untouched (its values are
 *   zeros; skipping them saves the work).
 *
 * Products are summed in float32 per output row (in vector lanes, then across them: the order differs from a
 * sequential sum by reassociation only). x and y are float32 (`sparse_add_f32`, `sparse_add_bf16w`) or bfloat16
 * (`_bf16x_*`: a bfloat16 model; x rows widened to float32 on the stack, each y entry read, added to and rounded
 * back once to nearest even). Values are float32 (`_f32`, `_f32w`) or bfloat16 (`_bf16w`, widened as read).
 *
 * Work items are (token, block of output rows); blocks hold about SPARSE_BLOCK_NNZ nonzeros each (found by binary
 * search on row_ptr, so a pattern whose rows differ in length still splits evenly) and run on OpenMP threads
 * (torch's runtime when loaded by it) from SPARSE_PARALLEL_MIN products per call. Null tokens are dropped before
 * the split, so every thread gets real work.
 *
 * With AVX-512 (F, BW, VL) a row of SPARSE_GATHER_MIN or more nonzeros gathers 16 entries of x per instruction
 * (vgatherdps, two accumulators, the tail under a mask); shorter rows, and every row without AVX-512, take a plain
 * loop. Measured on a virtualised 2-core Intel Xeon with AVX-512 (bench/kernels.py --sparse, and variants of this
 * file): gathers pay about 1.35x over the plain x86-64 loop at 150 nonzeros per row, but at a 2%-dense SmolLM2
 * projection's 11-31 nonzeros per row a masked gather and a horizontal sum per row are no faster than scalar
 * loads, and streaming full-width gathers across row boundaries loses what it gains to the per-row segment sums. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DF_AVX512 1
#endif

#ifndef SPARSE_BLOCK_NNZ
#define SPARSE_BLOCK_NNZ 2048 /* nonzeros per work item (token, row block) */
#endif
#ifndef SPARSE_GATHER_MIN
#define SPARSE_GATHER_MIN 32 /* nonzeros from which a row's dot product gathers 16 entries of x at a time */
#endif
#ifndef SPARSE_PARALLEL_MIN
#define SPARSE_PARALLEL_MIN 16384 /* products per call below which one thread does it all: a fork costs more */
#endif

static inline float f32_load(const float *p, int64_t j) { return p[j]; }

static inline float bf16_load(const uint16_t *p, int64_t j) { return bf16_to_f32(p[j]); }

#ifdef DF_AVX512
static inline __m512 f32_load16(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

static inline __m512 bf16_load16(const uint16_t *p, __mmask16 m) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* sum_{j < len} v[j] * x[cols[j]]. From SPARSE_GATHER_MIN nonzeros, 16 gathered entries of x per step (two
 * accumulators) and the tail under a mask (masked-off lanes read nothing, so no load runs past the row); shorter
 * rows take the scalar loop, which a masked gather and a horizontal sum do not beat. */
#define DEFINE_SPARSE_DOT(SUF, W)                                                                    \
static inline float sparse_dot_##SUF(const W *v, const int32_t *cols, const float *x, int64_t len) {  \
    if (len < SPARSE_GATHER_MIN) {                                                                   \
        float acc = 0.0f;                                                                            \
        for (int64_t j = 0; j < len; j++) acc += SUF##_load(v, j) * x[cols[j]];                      \
        return acc;                                                                                  \
    }                                                                                                \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;                                                        \
    int64_t j = 0;                                                                                   \
    for (; j + 32 <= len; j += 32) {                                                                 \
        const __m512i c0 = _mm512_loadu_si512((const void *)(cols + j));                             \
        const __m512i c1 = _mm512_loadu_si512((const void *)(cols + j + 16));                        \
        a0 = _mm512_fmadd_ps(SUF##_load16(v + j, 0xffff), _mm512_i32gather_ps(c0, x, 4), a0);        \
        a1 = _mm512_fmadd_ps(SUF##_load16(v + j + 16, 0xffff), _mm512_i32gather_ps(c1, x, 4), a1);   \
    }                                                                                                \
    for (; j < len; j += 16) {                                                                       \
        const __mmask16 m = len - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - j)) - 1u); \
        const __m512i c = _mm512_maskz_loadu_epi32(m, cols + j);                                     \
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, x, 4);                 \
        a0 = _mm512_fmadd_ps(SUF##_load16(v + j, m), xv, a0);                                        \
    }                                                                                                \
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                                              \
}
#else
#define DEFINE_SPARSE_DOT(SUF, W)                                                                    \
static inline float sparse_dot_##SUF(const W *v, const int32_t *cols, const float *x, int64_t len) {  \
    float acc = 0.0f;                                                                                \
    for (int64_t j = 0; j < len; j++) acc += SUF##_load(v, j) * x[cols[j]];                          \
    return acc;                                                                                      \
}
#endif

/* Activations, as in lora_cpu.c: float32 x rows are read in place, bfloat16 ones widened to a float32 buffer on the
 * stack (ROW_<X>); ADD_<X>(y, acc) adds a row's float32 sum to one y entry, rounding a bfloat16 entry once. */
static inline void bf16_widen(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(src[j]);
}

#define ROW_F32(row, buf, n) ((void)(buf), (row))
#define ROW_BF16(row, buf, n) (bf16_widen((row), (buf), (n)), (buf))
#define ADD_F32(y, acc) (*(y) += (acc))
#define ADD_BF16(y, acc) (*(y) = f32_to_bf16(bf16_to_f32(*(y)) + (acc)))
/* Stack buffer sizes: none needed for float32 rows (used in place). */
#define F32_BUF(n) 1
#define BF16_BUF(n) (n)

/* The first row r of [0, out_f] with row_ptr[r] >= target (row_ptr is non-decreasing). */
static inline int64_t first_row_at(const int32_t *row_ptr, int64_t out_f, int64_t target) {
    int64_t lo = 0, hi = out_f;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (row_ptr[mid] < target) lo = mid + 1; else hi = mid;
    }
    return lo;
}

#define DEFINE_SPARSE_ADD(NAME, X, XS, W, SUF)                                                       \
void NAME(int64_t n, int64_t in_f, int64_t out_f, const X *x, int64_t sx, X *y, int64_t sy,          \
          const W *values, int64_t sv, const int32_t *cols, const int32_t *row_ptr,                  \
          const int64_t *idx, int64_t null_row) {                                                    \
    int64_t active[n > 0 ? n : 1], na = 0;                                                           \
    for (int64_t i = 0; i < n; i++)                                                                  \
        if (idx[i] != null_row) active[na++] = i;                                                    \
    const int64_t p0 = row_ptr[0], nnz = row_ptr[out_f] - p0;                                        \
    if (na == 0 || nnz <= 0) return;                                                                 \
    int64_t nb = (nnz + SPARSE_BLOCK_NNZ - 1) / SPARSE_BLOCK_NNZ;                                    \
    if (nb > out_f) nb = out_f;                                                                      \
    _Pragma("omp parallel for schedule(static) if (na * nnz >= SPARSE_PARALLEL_MIN)")                \
    for (int64_t t = 0; t < na * nb; t++) {                                                          \
        const int64_t i = active[t / nb], b = t % nb, k = idx[i];                                    \
        const int64_t r0 = b == 0 ? 0 : first_row_at(row_ptr, out_f, p0 + b * nnz / nb);             \
        const int64_t r1 = b == nb - 1 ? out_f : first_row_at(row_ptr, out_f, p0 + (b + 1) * nnz / nb); \
        if (r0 >= r1 || row_ptr[r0] == row_ptr[r1]) continue;                                        \
        float xb[XS##_BUF(in_f)];                                                                    \
        const float *xi = ROW_##XS(x + i * sx, xb, in_f);                                            \
        const W *vk = values + k * sv;                                                               \
        X *yi = y + i * sy;                                                                          \
        for (int64_t r = r0; r < r1; r++) {                                                          \
            const int64_t j0 = row_ptr[r], len = row_ptr[r + 1] - j0;                                \
            if (len > 0) ADD_##XS(yi + r, sparse_dot_##SUF(vk + j0, cols + j0, xi, len));            \
        }                                                                                            \
    }                                                                                                \
}

DEFINE_SPARSE_DOT(f32, float)
DEFINE_SPARSE_DOT(bf16, uint16_t)
/* name, activation type and its row rule, value type and its dot product */
DEFINE_SPARSE_ADD(sparse_add_f32, float, F32, float, f32)
DEFINE_SPARSE_ADD(sparse_add_bf16w, float, F32, uint16_t, bf16)
DEFINE_SPARSE_ADD(sparse_add_bf16x_f32w, uint16_t, BF16, float, f32)
DEFINE_SPARSE_ADD(sparse_add_bf16x_bf16w, uint16_t, BF16, uint16_t, bf16)
