/* y = x W^T for weights kept in the GGUF's quantized values, for decode and verify passes on a CPU.
 *
 * Why: decoding on a CPU is bound by the bytes of weights read per token; 4-8 bit blocks read
 * 2.5-4x fewer bytes than bf16. Activations are quantized to int8 per 32 values (one float scale
 * each) so the inner products are integer dot products (AVX512-VNNI vpdpbusd: u8 x s8; on AVX2,
 * vpmaddubsw + vpmaddwd; plain C elsewhere - all three give the same bits).
 *
 * Weight layouts (the Python side builds them; both tile 16 output columns, so one 512-bit
 * vector holds 4 consecutive inputs of each of the 16 columns):
 *   kind 4: groups of 32 inputs; q in 0..15; w = scale * q - min. 256 bytes per tile and group:
 *           byte 64h + 4j + b holds input 4h + b of column j in its low nibble and input
 *           16 + 4h + b in its high nibble.
 *   kind 5: groups of 32 inputs (Q5_0); u = signed value + 16 in 0..31; w = scale * (u - 16).
 *           320 bytes per tile and group: the low 4 bits as in kind 4 (bytes 0-255), then the
 *           fifth bits: byte 256 + 4j + b holds, in bit h, that of input 4h + b of column j and,
 *           in bit 4 + h, that of input 16 + 4h + b. Q5_0 read as 8-bit groups would cost 8.5
 *           bits per weight; this costs 5.5, and the drafter's step is bound by those bytes.
 *   kind 8: groups of 16 or 32 inputs; q stored as u8 = signed value + 128; w = scale * (u - 128).
 *           byte 64p + 4j + b holds input 4p + b of column j.
 *   kind 6: groups of 16 inputs (Q6_K); u = signed value + 32 in 0..63; w = scale * (u - 32).
 *           384 bytes per tile and 32 inputs (two groups): the low 4 bits as in kind 4 (bytes
 *           0-255), then the high 2 bits: byte 256 + 64c + 4j + b holds, in bits 2h and 2h + 1,
 *           those of input 16c + 4h + b of column j.
 *   q is [n/16][k/group][tile bytes] (kind 6: [n/16][k/32][384]).
 * Kinds 5, 6 and 8 form the same integer sum of (value x activation) per group and the same
 * float steps, so one set of values gives the same bits in any of them.
 * Scales keep the GGUF's own two levels (Q4_K, Q6_K: an fp16 scale per super-block of `per`
 * groups times a signed 8-bit sub-scale per group), so they cost what they cost in the file:
 *   scale = d[g / per] * sub[g]  (fp16 d [n/16][ceil(ng/per)][16], int8 sub [n/16][ng][16]);
 *   min   = dmin[g / per] * msub[g] (kind 4 only, same shapes). Without sub (Q5_0, Q8_0: per = 1)
 *   scale = d[g]. The fp32 products are exact (11-bit by 8-bit mantissas), so they equal the
 *   products gguf forms when it dequantizes.
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

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define RQ_VNNI 1
#define RQ_ISA "avx512-vnni"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define RQ_AVX2 1
#define RQ_ISA "avx2"
#else
#define RQ_ISA "portable"
#endif

#define TILE 16    /* output columns per tile */
#define QBLOCK 32  /* activation values per quantization block */
#define MAX_R 8    /* rows per pass over a tile's weights (accumulators stay in registers) */
#define TILES_PER_ITEM 4 /* tiles per work item (see rq_linear) */
/* Weights are prefetched this many bytes ahead of the group being multiplied: with several rows
 * the core is busy with dot products and the hardware prefetcher alone left the stream stalled
 * (bench.quant_linear: 1024-16384 tried on this CPU, 4096 best). A prefetch past the end of a
 * buffer is only a hint: it cannot fault. */
#define PF_AHEAD 4096

const int rq_tile = TILE;
const int rq_qblock = QBLOCK;
#ifdef RQ_VNNI
const int rq_vnni = 1;
#else
const int rq_vnni = 0;
#endif

/* The instruction set this build's dot products use (the Python side reports it). */
const char *rq_isa(void) { return RQ_ISA; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}


static inline float f16_to_f32(uint16_t h) { /* exact, subnormals included */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        u = sign | ((e + 112) << 23) | (m << 13);
    } else {
        const float f = (float)m * 5.9604644775390625e-8f; /* m * 2^-24: exact */
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One tile's two-level scales (sub and msub NULL when per is 1), and optionally the same
 * scales and mins already multiplied out to fp32 [ng][16] (prefill: formed once per tile, then
 * read by every block of rows). */
typedef struct {
    const uint16_t *d;
    const int8_t *sub;
    const uint16_t *dmin;
    const int8_t *msub;
    int per;
    const float *scale;
    const float *min;
} Scales;

static inline float scale_at(const uint16_t *d, const int8_t *sub, int per, int g, int j) {
    const float top = f16_to_f32(d[(int64_t)(g / per) * TILE + j]);
    return sub ? top * (float)sub[(int64_t)g * TILE + j] : top;
}

static inline float round_bf16(float f) {
    const uint32_t u = (uint32_t)f32_to_bf16(f) << 16;
    float r;
    memcpy(&r, &u, 4);
    return r;
}

static inline float load_x(const void *x, int x_bf16, int64_t i) {
    return x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

#ifdef RQ_VNNI
/* 16 activations (bf16 or fp32) as fp32 */
static inline __m512 load16(const void *x, int x_bf16, int64_t i) {
    if (!x_bf16) return _mm512_loadu_ps((const float *)x + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* round_bf16 on 16 lanes, with the same integer steps (NaN stays NaN) */
static inline __m512 round16_bf16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    const __m512i nan = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
    const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                     _mm512_set1_epi32(0x7f800000));
    const __m512i r = _mm512_mask_blend_epi32(is_nan, rounded, nan);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}
#endif

/* Activations: per row and 32-value block, xs = amax / 127 and xq = round(x / xs); bsum16 holds
 * the sum of xq per 16 values (for the 8-bit offset), xsb = xs * (sum of xq per 32) (for mins).
 * With norm_w, the rows are RMS-normalised first, as the model's RMSNorm does (x * rsqrt(mean
 * (x^2) + eps) in fp32, rounded to the activations' dtype, times the weight, rounded again), so
 * a norm followed by a linear costs no pass of its own; norm_w has the activations' dtype.
 * The AVX-512 row and the plain one perform the same float operations on every value (a verify
 * pass quantizes several rows of up to 9K values per linear: a scalar loop showed in its time). */

/* 1 / RMS of row r (sum of squares in 16 lanes, then a fixed tree: the same order for every row) */
static float inverse_rms(const void *x, int x_bf16, int64_t r, int k, float eps) {
    float lanes[16] = {0};
#ifdef RQ_VNNI
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < k; i += 16) {
        const __m512 a = load16(x, x_bf16, r * k + i);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(a, a));
    }
    _mm512_storeu_ps(lanes, acc);
#else
    for (int i = 0; i < k; i += 16)
        for (int l = 0; l < 16; l++) {
            const float a = load_x(x, x_bf16, r * k + i + l);
            lanes[l] += a * a;
        }
#endif
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
    return 1.0f / sqrtf(lanes[0] / (float)k + eps);
}

static void quantize_row(const void *x, int x_bf16, int64_t r, int k, int8_t *xq, float *xs, int32_t *bsum16,
                         float *xsb, const void *norm_w, float eps) {
    const int nb = k / QBLOCK;
    const float inv = norm_w ? inverse_rms(x, x_bf16, r, k, eps) : 1.0f;
    for (int b = 0; b < nb; b++) {
        const int64_t base = r * k + (int64_t)b * QBLOCK;
        int32_t s[2];
        float amax = 0.0f;
#ifdef RQ_VNNI
        __m512 v[2];
        for (int h = 0; h < 2; h++) {
            v[h] = load16(x, x_bf16, base + 16 * h);
            if (norm_w) {
                const __m512 nh = _mm512_mul_ps(v[h], _mm512_set1_ps(inv));
                const __m512 w = load16(norm_w, x_bf16, (int64_t)b * QBLOCK + 16 * h);
                v[h] = x_bf16 ? round16_bf16(_mm512_mul_ps(w, round16_bf16(nh))) : _mm512_mul_ps(w, nh);
            }
        }
        amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int h = 0; h < 2; h++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(id))); /* nearest, ties even */
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            _mm_storeu_si128((__m128i *)(xq + base + 16 * h), _mm512_cvtepi32_epi8(q));
            s[h] = _mm512_reduce_add_epi32(q);
        }
#else
        float v[QBLOCK];
        for (int i = 0; i < QBLOCK; i++) {
            v[i] = load_x(x, x_bf16, base + i);
            if (norm_w) {
                const float h = v[i] * inv, w = load_x(norm_w, x_bf16, (int64_t)b * QBLOCK + i);
                v[i] = x_bf16 ? round_bf16(w * round_bf16(h)) : w * h;
            }
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        s[0] = s[1] = 0;
        for (int i = 0; i < QBLOCK; i++) {
            int q = (int)nearbyintf(v[i] * id);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            xq[base + i] = (int8_t)q;
            s[i / 16] += q;
        }
#endif
        xs[r * nb + b] = d;
        bsum16[r * nb * 2 + 2 * b] = s[0];
        bsum16[r * nb * 2 + 2 * b + 1] = s[1];
        xsb[r * nb + b] = d * (float)(s[0] + s[1]);
    }
}

int rq_quantize_rows(const void *x, int x_bf16, int rows, int k, int8_t *xq, float *xs, int32_t *bsum16,
                     float *xsb, int n_threads, const void *norm_w, float eps) {
    if (k % QBLOCK) return 1;
    /* a parallel region costs a barrier: worth it only for prefill-sized calls */
#pragma omp parallel for schedule(static) num_threads(n_threads) if (rows >= 16)
    for (int r = 0; r < rows; r++) quantize_row(x, x_bf16, r, k, xq, xs, bsum16, xsb, norm_w, eps);
    return 0;
}

/* Kind 6: the stored u (value + 32) of input i (0..15) of group g, column j, in a tile's bytes. */
static inline int kind6_u(const uint8_t *qt, int g, int j, int i) {
    const uint8_t *qg = qt + (int64_t)(g / 2) * 384;
    const int half = g % 2, h = i / 4, b = i % 4;
    const uint8_t byte = qg[64 * h + 4 * j + b];
    const int nibble = half ? byte >> 4 : byte & 15;
    return nibble | (((qg[256 + 64 * half + 4 * j + b] >> (2 * h)) & 3) << 4);
}

/* Kind 5: the stored u (value + 16) of input i (0..31) of group g, column j, in a tile's bytes. */
static inline int kind5_u(const uint8_t *qt, int g, int j, int i) {
    const uint8_t *qg = qt + (int64_t)g * 320;
    const int half = i / 16, h = (i % 16) / 4, b = i % 4;
    const uint8_t byte = qg[64 * h + 4 * j + b];
    const int nibble = half ? byte >> 4 : byte & 15;
    return nibble | (((qg[256 + 4 * j + b] >> (4 * half + h)) & 1) << 4);
}

/* Bytes of one tile (16 columns) of a weight with k inputs. */
static inline int64_t tile_bytes_of(int kind, int group, int k) {
    switch (kind) {
    case 4: return (int64_t)(k / 32) * 256;
    case 5: return (int64_t)(k / 32) * 320;
    case 6: return (int64_t)(k / 32) * 384;
    default: return (int64_t)k * 16;
    }
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

/* The 16 columns' scale (or min) of group g in super-block sb. */
static inline __m512 group_scale(const uint16_t *d, const int8_t *sub, int sb, int g) {
    const __m512 top = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + (int64_t)sb * TILE)));
    if (!sub) return top;
    const __m512i s8 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sub + (int64_t)g * TILE)));
    return _mm512_mul_ps(top, _mm512_cvtepi32_ps(s8));
}

/* One tile (16 columns) of kind 4 for R rows. */
static inline __attribute__((always_inline)) void tile4(const Block *a, const int R, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    __m512 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int g = 0, sb = 0, in_sb = 0; g < ng; g++) {
        const uint8_t *qg = q + (int64_t)g * 256;
        const int32_t *xg = a->xp + (int64_t)g * 8 * R;
        for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)(qg + PF_AHEAD + l), _MM_HINT_T0);
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
        const __m512 sc = s->scale ? _mm512_loadu_ps(s->scale + (int64_t)g * TILE) : group_scale(s->d, s->sub, sb, g);
        const __m512 mn = s->min ? _mm512_loadu_ps(s->min + (int64_t)g * TILE) : group_scale(s->dmin, s->msub, sb, g);
        if (++in_sb == s->per) in_sb = 0, sb++;
        for (int r = 0; r < R; r++) {
            const __m512 sr = _mm512_mul_ps(sc, _mm512_set1_ps(a->xs[g * R + r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), sr, acc[r]);
            acc[r] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(a->xsb[g * R + r]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * TILE, acc[r]);
}

/* One tile of kind 8 (groups of G = 16 or 32 inputs) for R rows. */
static inline __attribute__((always_inline)) void tile8(const Block *a, const int R, const int G, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    __m512 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const int32_t *off = G == 16 ? a->off16 : a->off32;
    for (int g = 0, sb = 0, in_sb = 0; g < ng; g++) {
        const uint8_t *qg = q + (int64_t)g * 16 * G;
        const int32_t *xg = a->xp + (int64_t)g * (G / 4) * R;
        for (int l = 0; l < 16 * G; l += 64) _mm_prefetch((const char *)(qg + PF_AHEAD + l), _MM_HINT_T0);
        /* the stored u8 is value + 128: start from -128 * sum(xq) over the group (exact) */
        __m512i iacc[MAX_R];
        for (int r = 0; r < R; r++) iacc[r] = _mm512_set1_epi32(-off[g * R + r]);
        for (int p = 0; p < G / 4; p++) {
            const __m512i w = _mm512_loadu_si512(qg + 64 * p);
            for (int r = 0; r < R; r++) iacc[r] = _mm512_dpbusd_epi32(iacc[r], w, _mm512_set1_epi32(xg[p * R + r]));
        }
        const __m512 sc = s->scale ? _mm512_loadu_ps(s->scale + (int64_t)g * TILE) : group_scale(s->d, s->sub, sb, g);
        if (++in_sb == s->per) in_sb = 0, sb++;
        const int b = G == 16 ? g / 2 : g;
        for (int r = 0; r < R; r++) {
            const __m512 sr = _mm512_mul_ps(sc, _mm512_set1_ps(a->xs[b * R + r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), sr, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * TILE, acc[r]);
}

/* The bits at `from` of each byte moved to bit 4 (and those above it along): a 16-bit shift by
 * 4 - from, left or right. The other bits are junk for the caller to mask; shifts of at most 4
 * move nothing into bits 4, 5 from the neighbouring byte. Its callers' loops are unrolled, so
 * `from` is a constant and the switch folds away. Kind 6 takes its high 2 bits of step h from bit 2h, kind 5 its fifth bit
 * from bit h (inputs 4h + b) or 4 + h (inputs 16 + 4h + b). */
static inline __m512i bits_to_4(__m512i c, int from) {
    switch (from) {
    case 0: return _mm512_slli_epi16(c, 4);
    case 1: return _mm512_slli_epi16(c, 3);
    case 2: return _mm512_slli_epi16(c, 2);
    case 3: return _mm512_slli_epi16(c, 1);
    case 4: return c;
    case 5: return _mm512_srli_epi16(c, 1);
    case 6: return _mm512_srli_epi16(c, 2);
    default: return _mm512_srli_epi16(c, 3);
    }
}

/* One tile of kind 6 for R rows: the same integer sums and float steps as kind 8 with G = 16, so
 * the two layouts give the same bits for the same values. */
static inline __attribute__((always_inline)) void tile6(const Block *a, const int R, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    __m512 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi8(0x30);
    for (int gp = 0; gp < ng / 2; gp++) {
        const uint8_t *qg = q + (int64_t)gp * 384;
        const int32_t *xg = a->xp + (int64_t)gp * 8 * R;
        for (int l = 0; l < 384; l += 64) _mm_prefetch((const char *)(qg + PF_AHEAD + l), _MM_HINT_T0);
        const __m512i c0 = _mm512_loadu_si512(qg + 256), c1 = _mm512_loadu_si512(qg + 320);
        /* u = value + 32: start from -32 * sum(xq) over each group (off16 is 128 times it) */
        __m512i i0[MAX_R], i1[MAX_R];
        for (int r = 0; r < R; r++) {
            i0[r] = _mm512_set1_epi32(-(a->off16[(2 * gp) * R + r] / 4));
            i1[r] = _mm512_set1_epi32(-(a->off16[(2 * gp + 1) * R + r] / 4));
        }
#pragma GCC unroll 4 /* h a constant in each copy: bits_to_4's switch folds to one shift */
        for (int h = 0; h < 4; h++) {
            const __m512i packed = _mm512_loadu_si512(qg + 64 * h);
            const __m512i lo = _mm512_or_si512(_mm512_and_si512(packed, low),
                                               _mm512_and_si512(bits_to_4(c0, 2 * h), high));
            const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(packed, 4), low),
                                               _mm512_and_si512(bits_to_4(c1, 2 * h), high));
            for (int r = 0; r < R; r++) {
                i0[r] = _mm512_dpbusd_epi32(i0[r], lo, _mm512_set1_epi32(xg[h * R + r]));
                i1[r] = _mm512_dpbusd_epi32(i1[r], hi, _mm512_set1_epi32(xg[(4 + h) * R + r]));
            }
        }
        const int g = 2 * gp, sb = g / s->per;
        const __m512 sc0 = s->scale ? _mm512_loadu_ps(s->scale + (int64_t)g * TILE) : group_scale(s->d, s->sub, sb, g);
        const __m512 sc1 = s->scale ? _mm512_loadu_ps(s->scale + (int64_t)(g + 1) * TILE)
                                    : group_scale(s->d, s->sub, (g + 1) / s->per, g + 1);
        for (int r = 0; r < R; r++) {
            const __m512 x = _mm512_set1_ps(a->xs[gp * R + r]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0[r]), _mm512_mul_ps(sc0, x), acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1[r]), _mm512_mul_ps(sc1, x), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * TILE, acc[r]);
}

/* One tile of kind 5 for R rows: the same integer sums and float steps as kind 8 with G = 32. */
static inline __attribute__((always_inline)) void tile5(const Block *a, const int R, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    __m512 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f), bit4 = _mm512_set1_epi8(0x10);
    for (int g = 0; g < ng; g++) {
        const uint8_t *qg = q + (int64_t)g * 320;
        const int32_t *xg = a->xp + (int64_t)g * 8 * R;
        for (int l = 0; l < 320; l += 64) _mm_prefetch((const char *)(qg + PF_AHEAD + l), _MM_HINT_T0);
        const __m512i c = _mm512_loadu_si512(qg + 256);
        /* u = value + 16: start from -16 * sum(xq) over the group (off32 is 128 times it) */
        __m512i iacc[MAX_R];
        for (int r = 0; r < R; r++) iacc[r] = _mm512_set1_epi32(-(a->off32[g * R + r] / 8));
#pragma GCC unroll 4
        for (int h = 0; h < 4; h++) {
            const __m512i packed = _mm512_loadu_si512(qg + 64 * h);
            const __m512i lo = _mm512_or_si512(_mm512_and_si512(packed, low), _mm512_and_si512(bits_to_4(c, h), bit4));
            const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(packed, 4), low),
                                               _mm512_and_si512(bits_to_4(c, 4 + h), bit4));
            for (int r = 0; r < R; r++) {
                iacc[r] = _mm512_dpbusd_epi32(iacc[r], lo, _mm512_set1_epi32(xg[h * R + r]));
                iacc[r] = _mm512_dpbusd_epi32(iacc[r], hi, _mm512_set1_epi32(xg[(4 + h) * R + r]));
            }
        }
        const __m512 sc = s->scale ? _mm512_loadu_ps(s->scale + (int64_t)g * TILE) : group_scale(s->d, s->sub, g, g);
        for (int r = 0; r < R; r++) {
            const __m512 sr = _mm512_mul_ps(sc, _mm512_set1_ps(a->xs[g * R + r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), sr, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * TILE, acc[r]);
}

#elif defined(RQ_AVX2)
/* AVX2 + FMA (most laptop and desktop CPUs): the VNNI path's integer sums and float steps on
 * 8 columns at a time (a tile's two halves one after the other). vpdpbusd's u8 x s8 sums of 4
 * become vpmaddubsw (pairs, saturating to int16) then vpmaddwd by ones, as llama.cpp's AVX2 dot
 * products do; the operand ranges below keep every int16 below 2^15, so the sums stay exact:
 *   kind 4: u <= 15, |x| <= 127: 2 * 15 * 127 = 3810 per pair, 8 pairs summed = 30480;
 *   kind 5: u <= 31: 7874 per pair, 4 summed = 31496;  kind 6: u <= 63: 16002, 2 summed = 32004;
 *   kind 8: u <= 255 would saturate, so the signed value v = u - 128 is split as |v| <= 128 and
 *           sign(v) * x (llama.cpp's q8 trick): 2 * 128 * 127 = 32512 per pair, each widened.
 * Integer sums are exact either way, and every float operation is the VNNI path's, lane by lane
 * (same products, same fused multiply-adds, same order), so the two builds give the same bits. */

static inline __m256i widen_pairs(__m256i s16) { return _mm256_madd_epi16(s16, _mm256_set1_epi16(1)); }

/* The 8 columns' (of half `half`) scale (or min) of group g in super-block sb. */
static inline __m256 group_scale8(const uint16_t *d, const int8_t *sub, int sb, int g, int half) {
    const __m256 top = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + (int64_t)sb * TILE + 8 * half)));
    if (!sub) return top;
    const __m256i s8 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sub + (int64_t)g * TILE + 8 * half)));
    return _mm256_mul_ps(top, _mm256_cvtepi32_ps(s8));
}

static inline __m256 scale8(const float *expanded, const uint16_t *d, const int8_t *sub, int sb, int g, int half) {
    return expanded ? _mm256_loadu_ps(expanded + (int64_t)g * TILE + 8 * half) : group_scale8(d, sub, sb, g, half);
}

static inline __m256i bits_to_4_avx2(__m256i c, int from) {
    switch (from) {
    case 0: return _mm256_slli_epi16(c, 4);
    case 1: return _mm256_slli_epi16(c, 3);
    case 2: return _mm256_slli_epi16(c, 2);
    case 3: return _mm256_slli_epi16(c, 1);
    case 4: return c;
    case 5: return _mm256_srli_epi16(c, 1);
    case 6: return _mm256_srli_epi16(c, 2);
    default: return _mm256_srli_epi16(c, 3);
    }
}

static inline __attribute__((always_inline)) void tile4(const Block *a, const int R, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 accs[2][MAX_R];
    for (int r = 0; r < R; r++) accs[0][r] = accs[1][r] = _mm256_setzero_ps();
    for (int g = 0, sb = 0, in_sb = 0; g < ng; g++) {
        const int32_t *xg = a->xp + (int64_t)g * 8 * R;
        for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)(q + (int64_t)g * 256 + PF_AHEAD + l), _MM_HINT_T0);
        for (int half = 0; half < 2; half++) { /* both halves of a group's lines while they are in L1 */
            __m256 *acc = accs[half];
            const uint8_t *qg = q + (int64_t)g * 256 + 32 * half;
            __m256i s16[MAX_R];
            for (int r = 0; r < R; r++) s16[r] = _mm256_setzero_si256();
            for (int h = 0; h < 4; h++) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(qg + 64 * h));
                const __m256i lo = _mm256_and_si256(packed, low);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for (int r = 0; r < R; r++) {
                    s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xg[h * R + r])));
                    s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xg[(4 + h) * R + r])));
                }
            }
            const __m256 sc = scale8(s->scale, s->d, s->sub, sb, g, half);
            const __m256 mn = scale8(s->min, s->dmin, s->msub, sb, g, half);
            for (int r = 0; r < R; r++) {
                const __m256 sr = _mm256_mul_ps(sc, _mm256_set1_ps(a->xs[g * R + r]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(widen_pairs(s16[r])), sr, acc[r]);
                acc[r] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(a->xsb[g * R + r]), acc[r]);
            }
        }
        if (++in_sb == s->per) in_sb = 0, sb++;
    }
    for (int half = 0; half < 2; half++)
        for (int r = 0; r < R; r++) _mm256_storeu_ps(out + (int64_t)r * TILE + 8 * half, accs[half][r]);
}

static inline __attribute__((always_inline)) void tile8(const Block *a, const int R, const int G, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 accs[2][MAX_R];
    for (int r = 0; r < R; r++) accs[0][r] = accs[1][r] = _mm256_setzero_ps();
    for (int g = 0, sb = 0, in_sb = 0; g < ng; g++) {
        const int32_t *xg = a->xp + (int64_t)g * (G / 4) * R;
        for (int l = 0; l < 16 * G; l += 64) _mm_prefetch((const char *)(q + (int64_t)g * 16 * G + PF_AHEAD + l), _MM_HINT_T0);
        const int b = G == 16 ? g / 2 : g;
        for (int half = 0; half < 2; half++) {
            __m256 *acc = accs[half];
            const uint8_t *qg = q + (int64_t)g * 16 * G + 32 * half;
            __m256i iacc[MAX_R];
            for (int r = 0; r < R; r++) iacc[r] = _mm256_setzero_si256();
            for (int p = 0; p < G / 4; p++) {
                const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(qg + 64 * p)), flip);
                const __m256i magnitude = _mm256_abs_epi8(v); /* -128 gives 0x80: 128 as u8 */
                for (int r = 0; r < R; r++) {
                    const __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(xg[p * R + r]), v);
                    iacc[r] = _mm256_add_epi32(iacc[r], widen_pairs(_mm256_maddubs_epi16(magnitude, x)));
                }
            }
            const __m256 sc = scale8(s->scale, s->d, s->sub, sb, g, half);
            for (int r = 0; r < R; r++) {
                const __m256 sr = _mm256_mul_ps(sc, _mm256_set1_ps(a->xs[b * R + r]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), sr, acc[r]);
            }
        }
        if (++in_sb == s->per) in_sb = 0, sb++;
    }
    for (int half = 0; half < 2; half++)
        for (int r = 0; r < R; r++) _mm256_storeu_ps(out + (int64_t)r * TILE + 8 * half, accs[half][r]);
}

static inline __attribute__((always_inline)) void tile6(const Block *a, const int R, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0f), high = _mm256_set1_epi8(0x30);
    __m256 accs[2][MAX_R];
    for (int r = 0; r < R; r++) accs[0][r] = accs[1][r] = _mm256_setzero_ps();
    for (int gp = 0; gp < ng / 2; gp++) {
        for (int half = 0; half < 2; half++) {
            __m256 *acc = accs[half];
            const uint8_t *qg = q + (int64_t)gp * 384 + 32 * half;
            const int32_t *xg = a->xp + (int64_t)gp * 8 * R;
            if (half == 0) /* both halves of a group's lines while they are in L1 */
                for (int l = 0; l < 384; l += 64) _mm_prefetch((const char *)(qg + PF_AHEAD + l), _MM_HINT_T0);
            const __m256i c0 = _mm256_loadu_si256((const __m256i *)(qg + 256));
            const __m256i c1 = _mm256_loadu_si256((const __m256i *)(qg + 320));
            __m256i i0[MAX_R], i1[MAX_R];
            for (int r = 0; r < R; r++) {
                i0[r] = _mm256_set1_epi32(-(a->off16[(2 * gp) * R + r] / 4));
                i1[r] = _mm256_set1_epi32(-(a->off16[(2 * gp + 1) * R + r] / 4));
            }
            __m256i s0[MAX_R], s1[MAX_R]; /* int16 sums of two steps (u <= 63: at most 32004) */
#pragma GCC unroll 4 /* h a constant in each copy: bits_to_4_avx2's switch folds to one shift */
            for (int h = 0; h < 4; h++) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(qg + 64 * h));
                const __m256i lo = _mm256_or_si256(_mm256_and_si256(packed, low),
                                                   _mm256_and_si256(bits_to_4_avx2(c0, 2 * h), high));
                const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                                                   _mm256_and_si256(bits_to_4_avx2(c1, 2 * h), high));
                for (int r = 0; r < R; r++) {
                    const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xg[h * R + r]));
                    const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xg[(4 + h) * R + r]));
                    s0[r] = h % 2 ? _mm256_add_epi16(s0[r], p0) : p0;
                    s1[r] = h % 2 ? _mm256_add_epi16(s1[r], p1) : p1;
                    if (h % 2) {
                        i0[r] = _mm256_add_epi32(i0[r], widen_pairs(s0[r]));
                        i1[r] = _mm256_add_epi32(i1[r], widen_pairs(s1[r]));
                    }
                }
            }
            const int g = 2 * gp;
            const __m256 sc0 = scale8(s->scale, s->d, s->sub, g / s->per, g, half);
            const __m256 sc1 = scale8(s->scale, s->d, s->sub, (g + 1) / s->per, g + 1, half);
            for (int r = 0; r < R; r++) {
                const __m256 x = _mm256_set1_ps(a->xs[gp * R + r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0[r]), _mm256_mul_ps(sc0, x), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1[r]), _mm256_mul_ps(sc1, x), acc[r]);
            }
        }
    }
    for (int half = 0; half < 2; half++)
        for (int r = 0; r < R; r++) _mm256_storeu_ps(out + (int64_t)r * TILE + 8 * half, accs[half][r]);
}

static inline __attribute__((always_inline)) void tile5(const Block *a, const int R, const uint8_t *q,
                                                        const Scales *s, int ng, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    __m256 accs[2][MAX_R];
    for (int r = 0; r < R; r++) accs[0][r] = accs[1][r] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        for (int l = 0; l < 320; l += 64) _mm_prefetch((const char *)(q + (int64_t)g * 320 + PF_AHEAD + l), _MM_HINT_T0);
        for (int half = 0; half < 2; half++) {
            __m256 *acc = accs[half];
            const uint8_t *qg = q + (int64_t)g * 320 + 32 * half;
            const int32_t *xg = a->xp + (int64_t)g * 8 * R;
            const __m256i c = _mm256_loadu_si256((const __m256i *)(qg + 256));
            __m256i iacc[MAX_R], lo_sum[MAX_R], hi_sum[MAX_R];
            for (int r = 0; r < R; r++) {
                iacc[r] = _mm256_set1_epi32(-(a->off32[g * R + r] / 8));
                lo_sum[r] = hi_sum[r] = _mm256_setzero_si256();
            }
#pragma GCC unroll 4
            for (int h = 0; h < 4; h++) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(qg + 64 * h));
                const __m256i lo = _mm256_or_si256(_mm256_and_si256(packed, low),
                                                   _mm256_and_si256(bits_to_4_avx2(c, h), bit4));
                const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                                                   _mm256_and_si256(bits_to_4_avx2(c, 4 + h), bit4));
                for (int r = 0; r < R; r++) {
                    lo_sum[r] = _mm256_add_epi16(lo_sum[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xg[h * R + r])));
                    hi_sum[r] = _mm256_add_epi16(hi_sum[r],
                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xg[(4 + h) * R + r])));
                }
            }
            const __m256 sc = scale8(s->scale, s->d, s->sub, g, g, half);
            for (int r = 0; r < R; r++) {
                iacc[r] = _mm256_add_epi32(iacc[r], _mm256_add_epi32(widen_pairs(lo_sum[r]), widen_pairs(hi_sum[r])));
                const __m256 sr = _mm256_mul_ps(sc, _mm256_set1_ps(a->xs[g * R + r]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), sr, acc[r]);
            }
        }
    }
    for (int half = 0; half < 2; half++)
        for (int r = 0; r < R; r++) _mm256_storeu_ps(out + (int64_t)r * TILE + 8 * half, accs[half][r]);
}
#endif

#if defined(RQ_VNNI) || defined(RQ_AVX2)
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

static void tile_rows(const Block *a, int R, int kind, int G, const uint8_t *q, const Scales *s, int ng,
                      float *out) {
    if (kind == 4) {
#define T4(n) tile4(a, n, q, s, ng, out)
        DISPATCH(T4)
    } else if (kind == 5) {
#define T5(n) tile5(a, n, q, s, ng, out)
        DISPATCH(T5)
    } else if (kind == 6) {
#define T6(n) tile6(a, n, q, s, ng, out)
        DISPATCH(T6)
    } else if (G == 16) {
#define T8A(n) tile8(a, n, 16, q, s, ng, out)
        DISPATCH(T8A)
    } else {
#define T8B(n) tile8(a, n, 32, q, s, ng, out)
        DISPATCH(T8B)
    }
}

#else /* portable: the same integer sums and the same float operations per row, lane by lane */

static inline int8_t quad_byte(const int32_t *xp, int R, int index, int r) {
    return ((const int8_t *)&xp[(index / 4) * R + r])[index % 4];
}

static void tile_rows(const Block *a, int R, int kind, int G, const uint8_t *q, const Scales *s, int ng,
                      float *out) {
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
                    const float sr = scale_at(s->d, s->sub, s->per, g, j) * a->xs[g * R + r];
                    acc = fmaf((float)isum, sr, acc);
                    acc = fmaf(-scale_at(s->dmin, s->msub, s->per, g, j), a->xsb[g * R + r], acc);
                } else if (kind == 5) {
                    for (int i = 0; i < 32; i++) isum += kind5_u(q, g, j, i) * quad_byte(a->xp, R, g * 32 + i, r);
                    isum -= a->off32[g * R + r] / 8;
                    const float sr = scale_at(s->d, s->sub, s->per, g, j) * a->xs[g * R + r];
                    acc = fmaf((float)isum, sr, acc);
                } else if (kind == 6) {
                    for (int i = 0; i < 16; i++) isum += kind6_u(q, g, j, i) * quad_byte(a->xp, R, g * 16 + i, r);
                    isum -= a->off16[g * R + r] / 4;
                    const float sr = scale_at(s->d, s->sub, s->per, g, j) * a->xs[(g / 2) * R + r];
                    acc = fmaf((float)isum, sr, acc);
                } else {
                    const uint8_t *qg = q + (int64_t)g * 16 * G;
                    for (int p = 0; p < G / 4; p++)
                        for (int b = 0; b < 4; b++)
                            isum += qg[64 * p + 4 * j + b] * quad_byte(a->xp, R, g * G + 4 * p + b, r);
                    isum -= (G == 16 ? a->off16 : a->off32)[g * R + r];
                    const float sr = scale_at(s->d, s->sub, s->per, g, j) * a->xs[(G == 16 ? g / 2 : g) * R + r];
                    acc = fmaf((float)isum, sr, acc);
                }
            }
            out[r * TILE + j] = acc;
        }
    }
}

#endif

/* The fp32 scales (and mins) of one tile, [ng][16]: the same exact products the kernel forms. */
static void expand_scales(const Scales *s, int ng, float *scale, float *min) {
    for (int g = 0; g < ng; g++) {
#ifdef RQ_VNNI
        _mm512_storeu_ps(scale + (int64_t)g * TILE, group_scale(s->d, s->sub, g / s->per, g));
        if (min) _mm512_storeu_ps(min + (int64_t)g * TILE, group_scale(s->dmin, s->msub, g / s->per, g));
#else
        for (int j = 0; j < TILE; j++) {
            scale[g * TILE + j] = scale_at(s->d, s->sub, s->per, g, j);
            if (min) min[g * TILE + j] = scale_at(s->dmin, s->msub, s->per, g, j);
        }
#endif
    }
}

/* Nonzero when (kind, group, per, n, k) and the scale pointers do not describe a layout above:
 * every function that walks a weight checks this first, so a bad call is refused, never run past
 * a buffer (e.g. a group of more than 32 values would overrun the 32-value scratch of
 * rq_dequantize). */
static int bad_layout(int kind, int group, int per, int n, int k, const int8_t *sub, const uint16_t *dmin,
                      const int8_t *msub) {
    if (n < 0 || k < 0 || k % QBLOCK || n % TILE || per < 1 || (!sub && per != 1)) return 1;
    switch (kind) {
    case 4: return group != 32 || !dmin || !sub != !msub;
    case 5: return group != 32 || sub || per != 1;
    case 6: return group != 16;
    case 8: return group != 16 && group != 32;
    default: return 1;
    }
}

/* y[r, col] (row stride ldy elements; fp32, or bf16 rounded to nearest even as torch rounds
 * when y_bf16) = sum over k of x[r, k] w[col, k] (+ bias[col]), for the n columns of one weight
 * in the layout above; the activations come from rq_quantize_rows. Returns nonzero for shapes it
 * does not take, and when the activations' width k is not the weight's weight_k (the tile offsets
 * are taken from k). */
int rq_linear(const int8_t *xq, const float *xs, const int32_t *bsum16, const float *xsb, int rows, int k,
              const uint8_t *q, const uint16_t *d, const int8_t *sub, const uint16_t *dmin, const int8_t *msub,
              int per, int kind, int group, int n, int weight_k, const float *bias, void *y, int y_bf16,
              int64_t ldy, int n_threads) {
    if (k != weight_k || bad_layout(kind, group, per, n, k, sub, dmin, msub)) return 1;
    const int ng = k / group, nb = k / QBLOCK, ns = (ng + per - 1) / per;
    const int n_tiles = n / TILE;
    const int n_blocks = (rows + MAX_R - 1) / MAX_R;
    const int64_t tile_bytes = tile_bytes_of(kind, group, k);
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
        /* several row blocks: each tile's scales are multiplied out once, not once per block */
        float *expanded = n_blocks > 1 ? malloc(sizeof(float) * 2 * TILES_PER_ITEM * (size_t)ng * TILE) : 0;
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < n_items; item++) {
            float out[MAX_R * TILE];
            const int t_end = (item + 1) * TILES_PER_ITEM < n_tiles ? (item + 1) * TILES_PER_ITEM : n_tiles;
            Scales tiles[TILES_PER_ITEM];
            for (int t = item * TILES_PER_ITEM; t < t_end; t++) {
                Scales *st = &tiles[t - item * TILES_PER_ITEM];
                *st = (Scales){d + (int64_t)t * ns * TILE, sub ? sub + (int64_t)t * ng * TILE : 0,
                               kind == 4 ? dmin + (int64_t)t * ns * TILE : 0, msub ? msub + (int64_t)t * ng * TILE : 0,
                               per, 0, 0};
                if (expanded) {
                    float *es = expanded + (int64_t)(t - item * TILES_PER_ITEM) * 2 * ng * TILE;
                    expand_scales(st, ng, es, kind == 4 ? es + (int64_t)ng * TILE : 0);
                    st->scale = es;
                    st->min = kind == 4 ? es + (int64_t)ng * TILE : 0;
                }
            }
            for (int blk = 0; blk < n_blocks; blk++) {
                const int r0 = blk * MAX_R, R = rows - r0 < MAX_R ? rows - r0 : MAX_R;
                const int32_t *bx = xp + (int64_t)blk * MAX_R * (quads + 3 * nb);
                const float *bs = fs + (int64_t)blk * MAX_R * 2 * nb;
                const Block a = {bx, bs, bs + nb * R, bx + quads * R, bx + quads * R + 2 * nb * R};
                for (int t = item * TILES_PER_ITEM; t < t_end; t++) {
                    tile_rows(&a, R, kind, group, q + t * tile_bytes, &tiles[t - item * TILES_PER_ITEM], ng, out);
                    for (int r = 0; r < R; r++) {
                        const int64_t at = (int64_t)(r0 + r) * ldy + (int64_t)t * TILE;
                        for (int j = 0; j < TILE; j++) {
                            const float v = bias ? out[r * TILE + j] + bias[t * TILE + j] : out[r * TILE + j];
                            if (y_bf16) ((uint16_t *)y)[at + j] = f32_to_bf16(v);
                            else ((float *)y)[at + j] = v;
                        }
                    }
                }
            }
        }
        free(expanded);
    }
    free(xp);
    free(fs);
    return 0;
}

/* Dequantize columns `cols` (all n when cols is NULL) of a weight into out [count, k], fp32 or
 * bf16. Values equal the GGUF's own dequantization: scale * q - min in fp32, unfused. Returns 1
 * for a layout it does not take, 3 when a column is outside 0..n-1 (nothing written then). */
int rq_dequantize(const uint8_t *q, const uint16_t *d, const int8_t *sub, const uint16_t *dmin, const int8_t *msub,
                  int per, int kind, int group, int n, int k, const int64_t *cols, int count, void *out,
                  int out_bf16, int n_threads) {
    if (bad_layout(kind, group, per, n, k, sub, dmin, msub) || count < 0 || (!cols && count > n)) return 1;
    /* every column is checked before any is written: a bad index leaves nothing half done */
    if (cols)
        for (int i = 0; i < count; i++)
            if (cols[i] < 0 || cols[i] >= n) return 3;
    const int ng = k / group, ns = (ng + per - 1) / per;
    const int64_t tile_bytes = tile_bytes_of(kind, group, k);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int i = 0; i < count; i++) {
        const int64_t col = cols ? cols[i] : i;
        const int64_t t = col / TILE, j = col % TILE;
        const uint8_t *qt = q + t * tile_bytes;
        for (int g = 0; g < ng; g++) {
            const int64_t top = (t * ns + g / per) * TILE + j, own = (t * ng + g) * TILE + j;
            const float s = sub ? f16_to_f32(d[top]) * (float)sub[own] : f16_to_f32(d[top]);
            float v[32];
            if (kind == 4) {
                const float m = msub ? f16_to_f32(dmin[top]) * (float)msub[own] : f16_to_f32(dmin[top]);
                const uint8_t *qg = qt + (int64_t)g * 256;
                for (int h = 0; h < 4; h++)
                    for (int b = 0; b < 4; b++) {
                        const uint8_t byte = qg[64 * h + 4 * j + b];
                        const float p0 = s * (float)(byte & 15), p1 = s * (float)(byte >> 4);
                        v[4 * h + b] = p0 - m;
                        v[16 + 4 * h + b] = p1 - m;
                    }
            } else if (kind == 5) {
                for (int i = 0; i < 32; i++) v[i] = s * (float)(kind5_u(qt, g, (int)j, i) - 16);
            } else if (kind == 6) {
                for (int i = 0; i < 16; i++) v[i] = s * (float)(kind6_u(qt, g, (int)j, i) - 32);
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
