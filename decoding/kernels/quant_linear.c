/* y = x W^T for weights kept in the GGUF's quantized values, for decode and verify passes on a CPU.
 *
 * Why: decoding on a CPU is bound by the bytes of weights read per token; 4-8 bit blocks read
 * 2.5-4x fewer bytes than bf16. Activations are quantized to int8 per 32 values (one float scale
 * each) so the inner products are integer dot products (AVX512-VNNI vpdpbusd: u8 x s8).
 *
 * Weight layouts (the Python side builds them; both tile 16 output columns, so one 512-bit
 * vector holds 4 consecutive inputs of each of the 16 columns):
 *   kind 4: groups of 32 inputs; q in 0..15; w = scale * q - min (fp32 scale, fp32 min per
 *           column and group). 256 bytes per tile and group: byte 64h + 4j + b holds input
 *           4h + b of column j in its low nibble and input 16 + 4h + b in its high nibble.
 *   kind 8: groups of 16 or 32 inputs; q stored as u8 = signed value + 128; w = scale * (u - 128).
 *           byte 64p + 4j + b holds input 4p + b of column j.
 *   q is [n/16][k/group][tile bytes], scale and min are [n/16][k/group][16].
 *
 * Exactness: a row's result depends only on that row: its quantization uses its own values,
 * integer sums are exact, and the float sums run over groups in a fixed order for every row,
 * however many rows the call has, how they are blocked, or how many threads run. So a decode
 * step and a verify pass give bit-identical rows (eta = 0 speculative decoding equals plain
 * decoding by construction). Built without -ffast-math and with -ffp-contract=off, so only the
 * fused multiply-adds written below are fused.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define RQ_VNNI 1
#endif

#define TILE 16    /* output columns per tile */
#define QBLOCK 32  /* activation values per quantization block */
#define MAX_R 8    /* rows per pass over a tile's weights (accumulators stay in registers) */
#define TILES_PER_ITEM 4 /* tiles per work item (see rq_linear) */

const int rq_tile = TILE;
const int rq_qblock = QBLOCK;
#ifdef RQ_VNNI
const int rq_vnni = 1;
#else
const int rq_vnni = 0;
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Activations: per row and 32-value block, xs = amax / 127 and xq = round(x / xs); bsum16 holds
 * the sum of xq per 16 values (for the 8-bit offset), xsb = xs * (sum of xq per 32) (for mins). */
int rq_quantize_rows(const void *x, int x_bf16, int rows, int k, int8_t *xq, float *xs, int32_t *bsum16,
                     float *xsb, int n_threads) {
    if (k % QBLOCK) return 1;
    const int nb = k / QBLOCK;
    /* a parallel region costs a barrier: worth it only for prefill-sized calls */
#pragma omp parallel for schedule(static) num_threads(n_threads) if (rows >= 16)
    for (int r = 0; r < rows; r++) {
        float v[QBLOCK];
        for (int b = 0; b < nb; b++) {
            const int64_t base = (int64_t)r * k + (int64_t)b * QBLOCK;
            float amax = 0.0f;
            for (int i = 0; i < QBLOCK; i++) {
                v[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[base + i]) : ((const float *)x)[base + i];
                float a = fabsf(v[i]);
                amax = a > amax ? a : amax;
            }
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            int32_t s0 = 0, s1 = 0;
            for (int i = 0; i < QBLOCK; i++) {
                int q = (int)nearbyintf(v[i] * id);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                xq[base + i] = (int8_t)q;
                if (i < 16) s0 += q; else s1 += q;
            }
            xs[(int64_t)r * nb + b] = d;
            bsum16[(int64_t)r * nb * 2 + 2 * b] = s0;
            bsum16[(int64_t)r * nb * 2 + 2 * b + 1] = s1;
            xsb[(int64_t)r * nb + b] = d * (float)(s0 + s1);
        }
    }
    return 0;
}

/* A block of up to MAX_R rows' activations, interleaved by row so that one base pointer with
 * constant offsets reaches every row (per-row pointers ran out of registers and were spilled):
 * xp[quad][r] = 4 consecutive int8 values as one int32; xs, xsb per 32 values; off16 and off32
 * = 128 * (sum of xq over 16 or 32 values), which the 8-bit layout's +128 offset adds. */
typedef struct {
    const int32_t *xp;
    const float *xs;
    const float *xsb;
    const int32_t *off16;
    const int32_t *off32;
} Block;

#ifdef RQ_VNNI

/* One tile (16 columns) of kind 4 for R rows. */
static inline __attribute__((always_inline)) void tile4(const Block *a, const int R, const uint8_t *q,
                                                        const float *scale, const float *min, int ng, float *out) {
    __m512 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int g = 0; g < ng; g++) {
        const uint8_t *qg = q + (int64_t)g * 256;
        const int32_t *xg = a->xp + (int64_t)g * 8 * R;
        __m512i iacc[MAX_R];
        for (int r = 0; r < R; r++) iacc[r] = _mm512_setzero_si512();
        for (int h = 0; h < 4; h++) {
            const __m512i packed = _mm512_loadu_si512(qg + 64 * h);
            const __m512i lo = _mm512_and_si512(packed, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            for (int r = 0; r < R; r++) {
                iacc[r] = _mm512_dpbusd_epi32(iacc[r], lo, _mm512_set1_epi32(xg[h * R + r]));
                iacc[r] = _mm512_dpbusd_epi32(iacc[r], hi, _mm512_set1_epi32(xg[(4 + h) * R + r]));
            }
        }
        const __m512 sc = _mm512_loadu_ps(scale + (int64_t)g * TILE);
        const __m512 mn = _mm512_loadu_ps(min + (int64_t)g * TILE);
        for (int r = 0; r < R; r++) {
            const __m512 s = _mm512_mul_ps(sc, _mm512_set1_ps(a->xs[g * R + r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), s, acc[r]);
            acc[r] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(a->xsb[g * R + r]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * TILE, acc[r]);
}

/* One tile of kind 8 (groups of G = 16 or 32 inputs) for R rows. */
static inline __attribute__((always_inline)) void tile8(const Block *a, const int R, const int G, const uint8_t *q,
                                                        const float *scale, int ng, float *out) {
    __m512 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const int32_t *off = G == 16 ? a->off16 : a->off32;
    for (int g = 0; g < ng; g++) {
        const uint8_t *qg = q + (int64_t)g * 16 * G;
        const int32_t *xg = a->xp + (int64_t)g * (G / 4) * R;
        /* the stored u8 is value + 128: start from -128 * sum(xq) over the group (exact) */
        __m512i iacc[MAX_R];
        for (int r = 0; r < R; r++) iacc[r] = _mm512_set1_epi32(-off[g * R + r]);
        for (int p = 0; p < G / 4; p++) {
            const __m512i w = _mm512_loadu_si512(qg + 64 * p);
            for (int r = 0; r < R; r++) iacc[r] = _mm512_dpbusd_epi32(iacc[r], w, _mm512_set1_epi32(xg[p * R + r]));
        }
        const __m512 sc = _mm512_loadu_ps(scale + (int64_t)g * TILE);
        const int b = G == 16 ? g / 2 : g;
        for (int r = 0; r < R; r++) {
            const __m512 s = _mm512_mul_ps(sc, _mm512_set1_ps(a->xs[b * R + r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * TILE, acc[r]);
}

#define DISPATCH(CALL)                                                                                    \
    switch (R) {                                                                                          \
    case 1: CALL(1); break;                                                                               \
    case 2: CALL(2); break;                                                                               \
    case 3: CALL(3); break;                                                                               \
    case 4: CALL(4); break;                                                                               \
    case 5: CALL(5); break;                                                                               \
    case 6: CALL(6); break;                                                                               \
    case 7: CALL(7); break;                                                                               \
    default: CALL(8); break;                                                                              \
    }

static void tile_rows(const Block *a, int R, int kind, int G, const uint8_t *q, const float *scale,
                      const float *min, int ng, float *out) {
    if (kind == 4) {
#define T4(n) tile4(a, n, q, scale, min, ng, out)
        DISPATCH(T4)
    } else if (G == 16) {
#define T8A(n) tile8(a, n, 16, q, scale, ng, out)
        DISPATCH(T8A)
    } else {
#define T8B(n) tile8(a, n, 32, q, scale, ng, out)
        DISPATCH(T8B)
    }
}

#else /* portable: the same integer sums and the same float operations per row, lane by lane */

static inline int8_t quad_byte(const int32_t *xp, int R, int index, int r) {
    return ((const int8_t *)&xp[(index / 4) * R + r])[index % 4];
}

static void tile_rows(const Block *a, int R, int kind, int G, const uint8_t *q, const float *scale,
                      const float *min, int ng, float *out) {
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < TILE; j++) {
            float acc = 0.0f;
            for (int g = 0; g < ng; g++) {
                int32_t isum = 0;
                if (kind == 4) {
                    const uint8_t *qg = q + (int64_t)g * 256;
                    for (int h = 0; h < 4; h++)
                        for (int b = 0; b < 4; b++) {
                            const uint8_t byte = qg[64 * h + 4 * j + b];
                            isum += (byte & 15) * quad_byte(a->xp, R, g * 32 + 4 * h + b, r) +
                                    (byte >> 4) * quad_byte(a->xp, R, g * 32 + 16 + 4 * h + b, r);
                        }
                    const float s = scale[(int64_t)g * TILE + j] * a->xs[g * R + r];
                    acc = fmaf((float)isum, s, acc);
                    acc = fmaf(-min[(int64_t)g * TILE + j], a->xsb[g * R + r], acc);
                } else {
                    const uint8_t *qg = q + (int64_t)g * 16 * G;
                    for (int p = 0; p < G / 4; p++)
                        for (int b = 0; b < 4; b++)
                            isum += qg[64 * p + 4 * j + b] * quad_byte(a->xp, R, g * G + 4 * p + b, r);
                    isum -= (G == 16 ? a->off16 : a->off32)[g * R + r];
                    const float s = scale[(int64_t)g * TILE + j] * a->xs[(G == 16 ? g / 2 : g) * R + r];
                    acc = fmaf((float)isum, s, acc);
                }
            }
            out[r * TILE + j] = acc;
        }
    }
}

#endif

/* y[r, col] (row stride ldy floats) = sum over k of x[r, k] w[col, k] (+ bias[col]), for the n
 * columns of one weight in the layout above; the activations come from rq_quantize_rows.
 * Returns nonzero for shapes it does not take. */
int rq_linear(const int8_t *xq, const float *xs, const int32_t *bsum16, const float *xsb, int rows, int k,
              const uint8_t *q, const float *scale, const float *min, int kind, int group, int n,
              const float *bias, float *y, int64_t ldy, int n_threads) {
    if (k % QBLOCK || n % TILE || (kind != 4 && kind != 8)) return 1;
    if (kind == 4 && group != 32) return 1;
    if (kind == 8 && group != 16 && group != 32) return 1;
    const int ng = k / group, nb = k / QBLOCK;
    const int n_tiles = n / TILE;
    const int n_blocks = (rows + MAX_R - 1) / MAX_R;
    const int64_t tile_bytes = kind == 4 ? (int64_t)ng * 256 : (int64_t)ng * 16 * group;
    const int64_t quads = k / 4;
    int32_t *xp = malloc(sizeof(int32_t) * (size_t)n_blocks * MAX_R * (size_t)(quads + 3 * nb));
    float *fs = malloc(sizeof(float) * (size_t)n_blocks * MAX_R * 2 * (size_t)nb);
    if (!xp || !fs) {
        free(xp);
        free(fs);
        return 2;
    }
    /* Work items of TILES_PER_ITEM tiles: with many rows (prefill) each row block's activations
     * serve all of them from L1 while their weights stay in L2. Dynamic: on a shared host a
     * preempted thread must not hold the other's half hostage. A column is computed whole by one
     * thread either way, so results do not depend on the split. One parallel region (one
     * fork/join) per call: the interleaving of the activations is its first loop. */
    const int n_items = (n_tiles + TILES_PER_ITEM - 1) / TILES_PER_ITEM;
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int blk = 0; blk < n_blocks; blk++) {
            const int r0 = blk * MAX_R, R = rows - r0 < MAX_R ? rows - r0 : MAX_R;
            int32_t *bx = xp + (int64_t)blk * MAX_R * (quads + 3 * nb);
            int32_t *o16 = bx + quads * R, *o32 = o16 + 2 * nb * R;
            float *bs = fs + (int64_t)blk * MAX_R * 2 * nb, *bsb = bs + nb * R;
            for (int r = 0; r < R; r++) {
                const int64_t row = r0 + r;
                for (int64_t i = 0; i < quads; i++) memcpy(&bx[i * R + r], xq + row * k + 4 * i, 4);
                for (int b = 0; b < nb; b++) {
                    const int32_t s0 = bsum16[row * 2 * nb + 2 * b], s1 = bsum16[row * 2 * nb + 2 * b + 1];
                    o16[(2 * b) * R + r] = 128 * s0;
                    o16[(2 * b + 1) * R + r] = 128 * s1;
                    o32[b * R + r] = 128 * (s0 + s1);
                    bs[b * R + r] = xs[row * nb + b];
                    bsb[b * R + r] = xsb[row * nb + b];
                }
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < n_items; item++) {
            float out[MAX_R * TILE];
            const int t_end = (item + 1) * TILES_PER_ITEM < n_tiles ? (item + 1) * TILES_PER_ITEM : n_tiles;
            for (int blk = 0; blk < n_blocks; blk++) {
                const int r0 = blk * MAX_R, R = rows - r0 < MAX_R ? rows - r0 : MAX_R;
                const int32_t *bx = xp + (int64_t)blk * MAX_R * (quads + 3 * nb);
                const float *bs = fs + (int64_t)blk * MAX_R * 2 * nb;
                const Block a = {bx, bs, bs + nb * R, bx + quads * R, bx + quads * R + 2 * nb * R};
                for (int t = item * TILES_PER_ITEM; t < t_end; t++) {
                    const uint8_t *qt = q + t * tile_bytes;
                    const float *st = scale + (int64_t)t * ng * TILE;
                    const float *mt = kind == 4 ? min + (int64_t)t * ng * TILE : 0;
                    tile_rows(&a, R, kind, group, qt, st, mt, ng, out);
                    for (int r = 0; r < R; r++) {
                        float *dst = y + (int64_t)(r0 + r) * ldy + (int64_t)t * TILE;
                        for (int j = 0; j < TILE; j++)
                            dst[j] = bias ? out[r * TILE + j] + bias[t * TILE + j] : out[r * TILE + j];
                    }
                }
            }
        }
    }
    free(xp);
    free(fs);
    return 0;
}

/* Dequantize columns `cols` (all n when cols is NULL) of a weight into out [count, k], fp32 or
 * bf16. Values equal the GGUF's own dequantization: scale * q - min in fp32, unfused. */
int rq_dequantize(const uint8_t *q, const float *scale, const float *min, int kind, int group, int n, int k,
                  const int64_t *cols, int count, void *out, int out_bf16, int n_threads) {
    if (k % group || n % TILE) return 1;
    const int ng = k / group;
    const int64_t tile_bytes = kind == 4 ? (int64_t)ng * 256 : (int64_t)ng * 16 * group;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int i = 0; i < count; i++) {
        const int64_t col = cols ? cols[i] : i;
        if (col < 0 || col >= n) continue;
        const int64_t t = col / TILE, j = col % TILE;
        const uint8_t *qt = q + t * tile_bytes;
        for (int g = 0; g < ng; g++) {
            const float s = scale[(t * ng + g) * TILE + j];
            float v[32];
            if (kind == 4) {
                const float m = min[(t * ng + g) * TILE + j];
                const uint8_t *qg = qt + (int64_t)g * 256;
                for (int h = 0; h < 4; h++)
                    for (int b = 0; b < 4; b++) {
                        const uint8_t byte = qg[64 * h + 4 * j + b];
                        const float p0 = s * (float)(byte & 15), p1 = s * (float)(byte >> 4);
                        v[4 * h + b] = p0 - m;
                        v[16 + 4 * h + b] = p1 - m;
                    }
            } else {
                const uint8_t *qg = qt + (int64_t)g * 16 * group;
                for (int p = 0; p < group / 4; p++)
                    for (int b = 0; b < 4; b++) v[4 * p + b] = s * (float)((int)qg[64 * p + 4 * j + b] - 128);
            }
            const int64_t base = (int64_t)i * k + (int64_t)g * group;
            if (out_bf16)
                for (int e = 0; e < group; e++) ((uint16_t *)out)[base + e] = f32_to_bf16(v[e]);
            else
                for (int e = 0; e < group; e++) ((float *)out)[base + e] = v[e];
        }
    }
    return 0;
}
