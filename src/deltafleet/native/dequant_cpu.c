/* Group-wise dequantization of densely packed b-bit codes into fp32 (the weight format of store/quantized.py):
 *
 *     W[r, c] = q[r, c] * scale[r, g] - zero[r, g] * scale[r, g],    g = c / group_size
 *
 * q is the little-endian bit stream of `functional.pack_codes` (code e = r*C + c occupies bits e*b .. e*b+b-1,
 * lowest bit first). q * scale and zero * scale are exact in fp32 (integers below 256 times fp16 scales), so the
 * one subtraction rounds exactly as the torch paths in quant/linear.py do: the output is bit-identical to them.
 *
 * Contract (checked by the Python wrapper): C % group_size == 0 and group_size % 8 == 0, so every group starts on
 * a byte boundary and holds whole runs of 8 codes in b bytes; bits in {2, 3, 4, 8}. Rows run on OpenMP threads.
 * out (R, C) row-major; scale, zero (R, C / group_size) fp32. */
#include <stdint.h>

/* b <= 4: a run of 8 codes is b bytes, read as one 32-bit word; code k is (word >> b*k) & mask. Constant shifts
 * over 32-bit lanes let the compiler turn the k loop into one vector shift, mask, convert and fused multiply-add. */
#define GROUP_FN(B)                                                                                   \
    static inline void group_##B(const uint8_t *p, float *o, int64_t gs, float s, float zs) {       \
        for (int64_t run = 0; run < gs / 8; run++) {                                                  \
            uint32_t word = 0;                                                                        \
            for (int t = 0; t < B; t++) word |= (uint32_t)p[run * B + t] << (8 * t);                  \
            for (int k = 0; k < 8; k++)                                                               \
                o[run * 8 + k] = (float)(int32_t)((word >> (B * k)) & ((1u << B) - 1)) * s - zs;      \
        }                                                                                             \
    }
GROUP_FN(2)
GROUP_FN(3)
GROUP_FN(4)

static inline void group_8(const uint8_t *p, float *o, int64_t gs, float s, float zs) {
    for (int64_t c = 0; c < gs; c++) o[c] = (float)p[c] * s - zs;
}

int dequant_groups_f32(int64_t R, int64_t C, int64_t bits, int64_t gs, const uint8_t *packed,
                       const float *scale, const float *zero, float *out) {
    if (gs <= 0 || C % gs || gs % 8) return 1;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 2;
    const int64_t G = C / gs, row_bytes = C * bits / 8, group_bytes = gs * bits / 8;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *p = packed + r * row_bytes + g * group_bytes;
            float *o = out + r * C + g * gs;
            const float s = scale[r * G + g], zs = zero[r * G + g] * s;
            switch (bits) {
                case 2: group_2(p, o, gs, s, zs); break;
                case 3: group_3(p, o, gs, s, zs); break;
                case 4: group_4(p, o, gs, s, zs); break;
                default: group_8(p, o, gs, s, zs); break;
            }
        }
    }
    return 0;
}
