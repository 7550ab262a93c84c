/* Batched gather adapter kernels for CPU decode: every token reads its own adapter's rows in place from the
 * slot pool; no gathered copy of adapter weights, no per-adapter dispatch. One call adapts one projection of a
 * whole mixed batch. The reference semantics are `ReferenceBackend` in serve/engine/backends.py.
 *
 * BGMV, additive (LoRA and low-rank deltas; Punica, Chen et al. 2023, sec. 4):
 *     for every token i with k = idx[i] in [0, null_row) (the pool's last row is the null row; other ids read as it):
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
 * x and y are float32 (`lora_bgmv_f32`, `lora_bgmv_bf16w`, ...) or bfloat16 (`_bf16x_*`: a bfloat16 model; rows
 * widened to float32 on the stack, y rounded back once). Adapter weights (A, B, c, s) are float32 (`_f32`,
 * `_f32w`) or bfloat16 (`_bf16w`, widened to float32 as they are read: half the bytes a decode step streams from
 * memory, the same fp32 arithmetic).
 *
 * A decode step's adapter rows live in DRAM (hundreds of MB per step, read once), so BGMV is a streaming read:
 * each token reads its A rows, then its B rows, one row after another (one sequential stream per matrix, not
 * several interleaved ones), prefetching PREFETCH_AHEAD bytes ahead of the read position and, before a token's
 * work starts, the heads of the streams that come next (its B, the next token's A), which no hardware
 * prefetcher can predict. Tokens are handed to threads one at a time (dynamic): a pool's members are often one
 * contiguous run of the batch (a mixed batch's LoRA rows, say), which a static split would give to one thread. With AVX2 + FMA the row loops are written with intrinsics (four independent
 * accumulators); otherwise they are plain loops left to the compiler. Tokens are independent: the loop over
 * them runs on OpenMP threads (torch's own runtime when loaded by it); RoAd only from ROAD_PARALLEL_MIN outputs
 * per call, below which a thread fork costs more than the work. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DF_AVX2 1
#endif

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 1024
#endif
#ifndef PREFETCH_HEAD
#define PREFETCH_HEAD 1024
#endif
#ifndef RUN_MAX
#define RUN_MAX 4 /* tokens of one slot sharing each weight row's reads in a BGMV call */
#endif
#ifndef RUN_MAX_FEATURES
#define RUN_MAX_FEATURES 8192 /* in + out above this (an LM-head table): one token a unit (stack buffers) */
#endif
#ifndef ROAD_PARALLEL_MIN
#define ROAD_PARALLEL_MIN 8192 /* RoAd runs threaded only from this many outputs per call */
#endif

static inline void prefetch_head(const void *p) {
    const char *c = (const char *)p;
    for (int o = 0; o < PREFETCH_HEAD; o += 64) __builtin_prefetch(c + o, 0, 3);
}

static inline float f32_load(const float *p, int64_t j) { return p[j]; }

static inline float bf16_load(const uint16_t *p, int64_t j) { return bf16_to_f32(p[j]); }

#ifdef DF_AVX2
static inline __m256 f32_load8(const float *p) { return _mm256_loadu_ps(p); }

static inline __m256 bf16_load8(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* M tokens' dot products with one weight row, M axpys of one row (each token's arithmetic in the same order whatever
 * M is: one token alone is M = 1), and RoAd's rotation of one group of 2h outputs. */
#define DEFINE_ROW_OPS(SUF, W)                                                                       \
static inline __attribute__((always_inline)) void dotm_##SUF(const W *a, const float *const *x, const int M, \
                                                             int64_t n, float *out) {                \
    __m256 s[RUN_MAX][4];                                                                            \
    for (int t = 0; t < M; t++) s[t][0] = s[t][1] = s[t][2] = s[t][3] = _mm256_setzero_ps();         \
    int64_t c = 0;                                                                                   \
    for (; c + 32 <= n; c += 32) {                                                                   \
        __builtin_prefetch((const char *)(a + c) + PREFETCH_AHEAD, 0, 3);                            \
        const __m256 a0 = SUF##_load8(a + c), a1 = SUF##_load8(a + c + 8),                           \
                     a2 = SUF##_load8(a + c + 16), a3 = SUF##_load8(a + c + 24);                     \
        for (int t = 0; t < M; t++) {                                                                \
            s[t][0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(x[t] + c), s[t][0]);                       \
            s[t][1] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(x[t] + c + 8), s[t][1]);                   \
            s[t][2] = _mm256_fmadd_ps(a2, _mm256_loadu_ps(x[t] + c + 16), s[t][2]);                  \
            s[t][3] = _mm256_fmadd_ps(a3, _mm256_loadu_ps(x[t] + c + 24), s[t][3]);                  \
        }                                                                                            \
    }                                                                                                \
    for (int t = 0; t < M; t++) {                                                                    \
        float acc = hsum8(_mm256_add_ps(_mm256_add_ps(s[t][0], s[t][1]), _mm256_add_ps(s[t][2], s[t][3]))); \
        for (int64_t cc = c; cc < n; cc++) acc += SUF##_load(a, cc) * x[t][cc];                      \
        out[t] = acc;                                                                                \
    }                                                                                                \
}                                                                                                    \
static inline __attribute__((always_inline)) void axpym_##SUF(const float *h, const W *b, float *const *y, \
                                                              const int M, int64_t n) {              \
    int64_t c = 0;                                                                                   \
    for (; c + 16 <= n; c += 16) {                                                                   \
        __builtin_prefetch((const char *)(b + c) + PREFETCH_AHEAD, 0, 3);                            \
        const __m256 b0 = SUF##_load8(b + c), b1 = SUF##_load8(b + c + 8);                          \
        for (int t = 0; t < M; t++) {                                                                \
            const __m256 hv = _mm256_set1_ps(h[t]);                                                  \
            _mm256_storeu_ps(y[t] + c, _mm256_fmadd_ps(hv, b0, _mm256_loadu_ps(y[t] + c)));          \
            _mm256_storeu_ps(y[t] + c + 8, _mm256_fmadd_ps(hv, b1, _mm256_loadu_ps(y[t] + c + 8)));  \
        }                                                                                            \
    }                                                                                                \
    for (int t = 0; t < M; t++)                                                                      \
        for (int64_t cc = c; cc < n; cc++) y[t][cc] += h[t] * SUF##_load(b, cc);                     \
}                                                                                                    \
static inline float dot_##SUF(const W *a, const float *x, int64_t n) {                               \
    float out;                                                                                       \
    dotm_##SUF(a, &x, 1, n, &out);                                                                   \
    return out;                                                                                      \
}                                                                                                    \
static inline void axpy_##SUF(float h, const W *b, float *y, int64_t n) {                            \
    axpym_##SUF(&h, b, &y, 1, n);                                                                    \
}                                                                                                    \
static inline void rotate_##SUF(float *y, const W *c, const W *s, int64_t h) {                       \
    int64_t j = 0;                                                                                   \
    for (; j + 8 <= h; j += 8) {                                                                     \
        const __m256 a = _mm256_loadu_ps(y + j), b = _mm256_loadu_ps(y + j + h);                     \
        _mm256_storeu_ps(y + j, _mm256_fmsub_ps(a, SUF##_load8(c + j),                               \
                                                _mm256_mul_ps(b, SUF##_load8(s + j))));              \
        _mm256_storeu_ps(y + j + h, _mm256_fmadd_ps(b, SUF##_load8(c + j + h),                       \
                                                    _mm256_mul_ps(a, SUF##_load8(s + j + h))));      \
    }                                                                                                \
    for (; j < h; j++) {                                                                             \
        const float a = y[j], b = y[j + h];                                                          \
        y[j] = a * SUF##_load(c, j) - b * SUF##_load(s, j);                                          \
        y[j + h] = b * SUF##_load(c, j + h) + a * SUF##_load(s, j + h);                              \
    }                                                                                                \
}
#else
#define DEFINE_ROW_OPS(SUF, W)                                                                       \
static inline float dot_##SUF(const W *a, const float *x, int64_t n) {                               \
    float acc = 0.0f;                                                                                \
    for (int64_t c = 0; c < n; c++) acc += SUF##_load(a, c) * x[c];                                  \
    return acc;                                                                                      \
}                                                                                                    \
static inline void axpy_##SUF(float h, const W *b, float *y, int64_t n) {                            \
    for (int64_t c = 0; c < n; c++) y[c] += h * SUF##_load(b, c);                                    \
}                                                                                                    \
static inline void rotate_##SUF(float *y, const W *c, const W *s, int64_t h) {                       \
    for (int64_t j = 0; j < h; j++) {                                                                \
        const float a = y[j], b = y[j + h];                                                          \
        y[j] = a * SUF##_load(c, j) - b * SUF##_load(s, j);                                          \
        y[j + h] = b * SUF##_load(c, j + h) + a * SUF##_load(s, j + h);                              \
    }                                                                                                \
}                                                                                                    \
static inline void dotm_##SUF(const W *a, const float *const *x, const int M, int64_t n, float *out) {  \
    for (int t = 0; t < M; t++) out[t] = dot_##SUF(a, x[t], n);                                      \
}                                                                                                    \
static inline void axpym_##SUF(const float *h, const W *b, float *const *y, const int M, int64_t n) {   \
    for (int t = 0; t < M; t++) axpy_##SUF(h[t], b, y[t], n);                                        \
}
#endif

/* Activations: float32 rows are used in place; bfloat16 rows (a bfloat16 model) are widened to float32 buffers on the
 * stack, the same float32 row operations run on them, and y is rounded back to bfloat16 once, to nearest even
 * (torch's rule; NaN stays NaN): one rounding instead of the three a bfloat16 torch expression makes (h, the delta,
 * the sum). ROW_<X>(row, buf, n) gives the float32 row to work on; STORE_<X>(buf, row, n) writes it back. */
static inline void bf16_widen(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(src[j]);
}

static inline void bf16_narrow(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = f32_to_bf16(src[j]);
}

#define ROW_F32(row, buf, n) ((void)(buf), (row))
#define STORE_F32(buf, row, n) ((void)(buf))
#define ROW_BF16(row, buf, n) (bf16_widen((row), (buf), (n)), (buf))
#define STORE_BF16(buf, row, n) bf16_narrow((buf), (row), (n))

/* Work units of a BGMV call: the member tokens (idx in [0, null_row)) grouped by slot, in order of first
 * appearance, in units of RUN_MAX tokens of one slot (a prefill chunk's rows; a decode batch's tokens of one tenant)
 * and a last, shorter unit per slot; with `group` 0 (rows too wide for RUN_MAX stack buffers), one token a unit.
 * tok[]: the tokens unit after unit; unit u is tok[start[u] .. start[u + 1] - 1]. Returns the unit count. */
static int64_t run_units(int64_t n, const int64_t *idx, int64_t null_row, int group, int64_t *tok, int64_t *start) {
    int64_t units = 0, used = 0;
    if (!group) {
        for (int64_t i = 0; i < n; i++)
            if (idx[i] >= 0 && idx[i] < null_row) { start[units++] = used; tok[used++] = i; }
        start[units] = used;
        return units;
    }
    const int64_t cap = n > 0 ? n : 1;
    int64_t next[cap], last[null_row > 0 ? null_row : 1];
    for (int64_t k = 0; k < null_row; k++) last[k] = -1;
    for (int64_t i = n - 1; i >= 0; i--) { /* next[i]: the following token of i's slot, -1: none */
        next[i] = -1;
        if (idx[i] < 0 || idx[i] >= null_row) continue;
        next[i] = last[idx[i]];
        last[idx[i]] = i;
    }
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= null_row || last[idx[i]] != i) continue; /* null, or not its slot's first */
        for (int64_t j = i, m = RUN_MAX; j >= 0; j = next[j], m++) {
            if (m == RUN_MAX) { start[units++] = used; m = 0; }
            tok[used++] = j;
        }
    }
    start[units] = used;
    return units;
}

#define DEFINE_BGMV(NAME, X, XS, W, SUF)                                                             \
/* m tokens of slot k (rows tok[0..m-1] of x and y), m <= RUN_MAX, each row of A and B read once for all m */     \
static void NAME##_run(int64_t m, const int64_t *tok, int64_t k, int64_t in_f, int64_t out_f, int64_t r,        \
                       const X *x, int64_t sx, X *y, int64_t sy, const W *A, int64_t sa0, int64_t sa1,        \
                       const W *B, int64_t sb0, int64_t sb1) {                                       \
    float xb[m][XS##_BUF(in_f)], yb[m][XS##_BUF(out_f)], h[r > 0 ? r : 1][RUN_MAX];                 \
    const float *xs[RUN_MAX];                                                                        \
    float *ys[RUN_MAX];                                                                              \
    prefetch_head(B + k * sb0);                                                                      \
    for (int64_t t = 0; t < m; t++) xs[t] = ROW_##XS(x + tok[t] * sx, xb[t], in_f);                  \
    for (int64_t j = 0; j < r; j++) {                                                                \
        const W *a = A + k * sa0 + j * sa1;                                                          \
        if (m == RUN_MAX) dotm_##SUF(a, xs, RUN_MAX, in_f, h[j]);                                    \
        else for (int64_t t = 0; t < m; t++) h[j][t] = dot_##SUF(a, xs[t], in_f);                    \
    }                                                                                                \
    for (int64_t t = 0; t < m; t++) ys[t] = ROW_##XS(y + tok[t] * sy, yb[t], out_f);                 \
    for (int64_t j = 0; j < r; j++) {                                                                \
        const W *b = B + k * sb0 + j * sb1;                                                          \
        if (m == RUN_MAX) axpym_##SUF(h[j], b, ys, RUN_MAX, out_f);                                  \
        else for (int64_t t = 0; t < m; t++) axpy_##SUF(h[j][t], b, ys[t], out_f);                   \
    }                                                                                                \
    for (int64_t t = 0; t < m; t++) STORE_##XS(yb[t], y + tok[t] * sy, out_f);                       \
}                                                                                                    \
void NAME(int64_t n, int64_t in_f, int64_t out_f, int64_t r,                                         \
          const X *x, int64_t sx, X *y, int64_t sy,                                                  \
          const W *A, int64_t sa0, int64_t sa1, const W *B, int64_t sb0, int64_t sb1,                \
          const int64_t *idx, int64_t null_row) {                                                    \
    const int64_t cap = n > 0 ? n : 1;                                                               \
    int64_t tok[cap], start[cap + 1];                                                                \
    const int64_t units = run_units(n, idx, null_row, in_f + out_f <= RUN_MAX_FEATURES, tok, start); \
    _Pragma("omp parallel for schedule(dynamic, 1) if (units > 1)")                                  \
    for (int64_t u = 0; u < units; u++) {                                                            \
        const int64_t *tu = tok + start[u], k = idx[tu[0]];                                          \
        if (u + 1 < units) prefetch_head(A + idx[tok[start[u + 1]]] * sa0);                          \
        NAME##_run(start[u + 1] - start[u], tu, k, in_f, out_f, r, x, sx, y, sy, A, sa0, sa1, B, sb0, sb1); \
    }                                                                                                \
}

#define DEFINE_ROAD(NAME, X, XS, W, SUF)                                                             \
void NAME(int64_t n, int64_t out_f, int64_t group, X *y, int64_t sy,                                 \
          const W *c, int64_t sc, const W *s, int64_t ss, const int64_t *idx, int64_t null_row) {    \
    const int64_t h = group / 2;                                                                     \
    _Pragma("omp parallel for schedule(static) if (n * out_f >= ROAD_PARALLEL_MIN)")                 \
    for (int64_t i = 0; i < n; i++) {                                                                \
        const int64_t k = idx[i];                                                                    \
        if (k == null_row) continue;                                                                 \
        float yb[XS##_BUF(out_f)];                                                                   \
        float *yi = ROW_##XS(y + i * sy, yb, out_f);                                                 \
        const W *ci = c + k * sc, *si = s + k * ss;                                                  \
        for (int64_t g = 0; g < out_f; g += group) rotate_##SUF(yi + g, ci + g, si + g, h);          \
        STORE_##XS(yb, y + i * sy, out_f);                                                           \
    }                                                                                                \
}

/* Stack buffer sizes: none needed for float32 rows (used in place). */
#define F32_BUF(n) 1
#define BF16_BUF(n) (n)

DEFINE_ROW_OPS(f32, float)
DEFINE_ROW_OPS(bf16, uint16_t)
/* name, activation type and its row rule, weight type and its row operations */
DEFINE_BGMV(lora_bgmv_f32, float, F32, float, f32)
DEFINE_BGMV(lora_bgmv_bf16w, float, F32, uint16_t, bf16)
DEFINE_BGMV(lora_bgmv_bf16x_f32w, uint16_t, BF16, float, f32)
DEFINE_BGMV(lora_bgmv_bf16x_bf16w, uint16_t, BF16, uint16_t, bf16)
DEFINE_ROAD(road_apply_f32, float, F32, float, f32)
DEFINE_ROAD(road_apply_bf16w, float, F32, uint16_t, bf16)
DEFINE_ROAD(road_apply_bf16x_f32w, uint16_t, BF16, float, f32)
DEFINE_ROAD(road_apply_bf16x_bf16w, uint16_t, BF16, uint16_t, bf16)

/* One-pointer entries for the bound Python callers: a[] holds a kernel's arguments in order, pointers as integers,
 * so a call converts one argument instead of eleven or sixteen (ctypes: about 1.5 us less a call; a mixed decode
 * step makes hundreds). */
#define P(T, v) ((T *)(intptr_t)(v))
#define DEFINE_BGMV_PACKED(NAME, X, W)                                                               \
void NAME##_packed(const int64_t *a) {                                                               \
    NAME(a[0], a[1], a[2], a[3], P(const X, a[4]), a[5], P(X, a[6]), a[7], P(const W, a[8]), a[9], a[10], \
         P(const W, a[11]), a[12], a[13], P(const int64_t, a[14]), a[15]);                           \
}
#define DEFINE_ROAD_PACKED(NAME, X, W)                                                               \
void NAME##_packed(const int64_t *a) {                                                               \
    NAME(a[0], a[1], a[2], P(X, a[3]), a[4], P(const W, a[5]), a[6], P(const W, a[7]), a[8],             \
         P(const int64_t, a[9]), a[10]);                                                             \
}
DEFINE_BGMV_PACKED(lora_bgmv_f32, float, float)
DEFINE_BGMV_PACKED(lora_bgmv_bf16w, float, uint16_t)
DEFINE_BGMV_PACKED(lora_bgmv_bf16x_f32w, uint16_t, float)
DEFINE_BGMV_PACKED(lora_bgmv_bf16x_bf16w, uint16_t, uint16_t)
DEFINE_ROAD_PACKED(road_apply_f32, float, float)
DEFINE_ROAD_PACKED(road_apply_bf16w, float, uint16_t)
DEFINE_ROAD_PACKED(road_apply_bf16x_f32w, uint16_t, float)
DEFINE_ROAD_PACKED(road_apply_bf16x_bf16w, uint16_t, uint16_t)

/* A projection's adapter kernels over several pools in one call: one Python -> C crossing per projection instead of
 * one per pool (a mixed decode step adapts 210 projections, each over up to three pools). c[] holds
 *     count, n, x, y, then count links of CHAIN_LINK int64s:
 *     fn (a `<kernel>_packed` entry), args (its argument array), the positions in args of n, x (< 0: the kernel
 *     takes no x), y, index, null row and rank (< 0: none), a constant's position (< 0: none) and value, and the
 *     link's pool record: int64[4] of the step's index pointer, null row, rank and token count, written once per
 *     step for all of the pool's projections.
 * Every link's record must hold n tokens, else nothing runs and the call returns 1 (the caller then applies each pool
 * its own way). Each link's arguments are written into its array, then its kernel runs, in order: the links of one
 * projection touch disjoint rows of y (each token belongs to one pool), so the order does not change the result. */
#define CHAIN_LINK 11
typedef void (*packed_entry)(const int64_t *);

int chain_packed(const int64_t *c) {
    const int64_t count = c[0], n = c[1], x = c[2], y = c[3];
    for (int64_t j = 0; j < count; j++)
        if (P(const int64_t, c[4 + CHAIN_LINK * j + 10])[3] != n) return 1;
    for (int64_t j = 0; j < count; j++) {
        const int64_t *l = c + 4 + CHAIN_LINK * j, *rec = P(const int64_t, l[10]);
        int64_t *a = P(int64_t, l[1]);
        a[l[2]] = n;
        if (l[3] >= 0) a[l[3]] = x;
        a[l[4]] = y;
        a[l[5]] = rec[0];
        a[l[6]] = rec[1];
        if (l[7] >= 0) a[l[7]] = rec[2];
        if (l[8] >= 0) a[l[8]] = l[9];
        ((packed_entry)(intptr_t)l[0])(a);
    }
    return 0;
}
