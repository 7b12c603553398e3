/* New tokens' K or V into the 8-bit form (decoding/kv_quant.py), written straight into the cache's
 * slots: per token, head and group of 32 channels, scale = bf16(max |x| / 127) and
 * q = round(x / scale) clamped to +-127, bit for bit what kv_quant.quantize computes in torch.
 *
 * Why C: a decode step writes one token's K and V in every layer, and torch's dozen small ops per
 * write cost more than the write itself; one call per layer takes the keys and the values.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#define GROUP 32

/* One head's token: head_dim channels of x (fp32 or bf16) -> head_dim int8 values, then a bf16 scale
 * per group. A group holding a NaN gets a NaN scale (torch's has other NaN bits) and zeros, as
 * where(scale > 0) gives; an infinite one gets an infinite scale and zeros. */
static void quantize_row(const void *x, int bf16, int head_dim, uint8_t *out) {
    for (int g = 0; g < head_dim / GROUP; ++g) {
        float v[GROUP], amax = 0.0f;
        int nan = 0;
        for (int i = 0; i < GROUP; ++i) {
            const int64_t at = (int64_t)g * GROUP + i;
            if (bf16) {
                const uint32_t u = (uint32_t)((const uint16_t *)x)[at] << 16;
                memcpy(&v[i], &u, 4);
            } else {
                v[i] = ((const float *)x)[at];
            }
            const float a = fabsf(v[i]);
            nan |= a != a;
            amax = a > amax ? a : amax;
        }
        const uint16_t scale = nan ? (uint16_t)0x7fc0 : f32_to_bf16(amax / 127.0f);
        const uint32_t wide_bits = (uint32_t)scale << 16;
        float wide;
        memcpy(&wide, &wide_bits, 4);
        for (int i = 0; i < GROUP; ++i) {
            float r = wide > 0.0f ? rintf(v[i] / wide) : 0.0f; /* nearest even, as torch.round */
            r = r != r ? 0.0f : (r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
            out[g * GROUP + i] = (uint8_t)(int8_t)r;
        }
        memcpy(out + head_dim + 2 * g, &scale, 2);
    }
}

/* keys and values: [heads][tokens][head_dim], channels contiguous, heads and tokens the given
 * strides (in elements) apart in each; their 8-bit rows go to key_out / value_out:
 * [heads][tokens][head_dim + head_dim / 16] bytes, out_head bytes from one head to the next.
 * Returns 0, or -1 for a head_dim it does not take. */
int rq_quantize_kv(const void *keys, const void *values, int bf16, int64_t heads, int64_t tokens, int head_dim,
                   const int64_t strides[4], uint8_t *key_out, uint8_t *value_out, int64_t out_head) {
    if (head_dim <= 0 || head_dim % GROUP || head_dim > 4096) return -1;
    const int64_t element = bf16 ? 2 : 4, row_bytes = head_dim + head_dim / 16;
    for (int64_t h = 0; h < heads; ++h)
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t to = h * out_head + t * row_bytes;
            quantize_row((const char *)keys + (h * strides[0] + t * strides[1]) * element, bf16, head_dim, key_out + to);
            quantize_row((const char *)values + (h * strides[2] + t * strides[3]) * element, bf16, head_dim,
                         value_out + to);
        }
    return 0;
}
