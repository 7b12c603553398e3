/* What the kernels share. Each kernel's build key hashes this file too (decoding/native.py), so
   an edit here rebuilds every one. */
#ifndef RAPIDQA_COMMON_H
#define RAPIDQA_COMMON_H

#include <stdint.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#endif
