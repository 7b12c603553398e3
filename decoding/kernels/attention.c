/* Attention of a few query rows over a long KV cache (bf16, fp32 or 8-bit), for decode, verify
 * and prefill passes on a CPU.
 *
 * Why not torch: with 6-36 query rows per K/V head, torch's bf16 matmuls read the cache at a
 * fraction of memory bandwidth and the fp32 softmax between them is another full pass; here one
 * pass over each K/V block computes scores, softmax and the weighted sum (flash-decoding).
 *
 * Exactness: keys are split into blocks at absolute multiples of BLOCK, every row reads only its
 * own valid keys, and partial results are combined in block order, so a row's output depends
 * only on its query, its valid keys and values - not on how many rows or keys the call has, or
 * on the thread count. A decode step and a verify pass therefore give bit-identical outputs.
 *
 * Several sessions at once (rq_attend_batch): sessions reading one shared document prefix give
 * their rows to one call. Each block of the prefix is one work item for every session's rows (read
 * from memory once), then each session's own keys are blocks of their own; the combine merges a
 * row's blocks in the order rq_attend would meet them in the joined K/V. The prefix ends on a
 * block boundary, so every block holds the same keys as in the joined K/V and the outputs are
 * bit-identical to each session's alone.
 *
 * GCC vector extensions (16 floats) rather than intrinsics: portable, and the order of every
 * floating-point sum is fixed by the source (no -ffast-math, and -ffp-contract=off so that only
 * the written fused multiply-adds are fused). bf16 K/V take vdpbf16ps on AVX512-BF16; AVX2 and
 * plain C builds compute exactly what it computes, so every build gives the same bits.
 *
 * 8-bit K/V (decoding/kv_quant.py's form: int8 values and a bf16 scale per 32 channels, per token
 * and head) take vpdpbusd for Q.K on int8 queries, and vdpbf16ps for the value sum (see "8-bit
 * K/V" below); the AVX512 build needs AVX512-VNNI beside AVX512-BF16, and the other builds again
 * compute the same bits. A query is quantized once per call, each row alone, so the exactness
 * above holds for 8-bit K/V too.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define RQ_ISA "avx512-bf16"
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RQ_ISA "avx2"
#define RQ_AVX2 1
#else
#define RQ_ISA "portable"
#endif

#define BLOCK 512      /* keys per work item */
#define KEY_STEP 16    /* keys per step: one reduce16 of dot products */
#define MAX_ROWS 64    /* query rows per block computation (more are taken this many at a time) */
#define MAX_VECS 16    /* head_dim / 16 */

/* Read by the Python binding, which sizes the scratch buffer and splits calls with them. */
const int rq_block = BLOCK;
const int rq_max_rows = MAX_ROWS;

/* The instruction set this build's bf16 and 8-bit dot products use (the Python side reports it). */
const char *rq_isa(void) { return RQ_ISA; }

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}


static inline vf load_f32(const float *p) {
    vf f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline vf splat(float x) { return (vf){0} + x; }

/* mask ? a : b, lane by lane (masks are all-ones or all-zeros lanes, as comparisons give) */
static inline vf where(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* exp(x) for x <= 0, Cephes polynomial (~2 ulp); exactly 0 where x < -87. */
static inline vf exp_nonpositive(vf x) {
    vi underflow = x < -87.0f;
    x = where(underflow, splat(-87.0f), x);
    vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi); /* rounds toward zero */
    vf fn = __builtin_convertvector(n, vf);
    vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vf scale = (vf)((n + 127) << 23);
    return where(underflow, splat(0.0f), p * scale);
}

/* a * b + c rounded once, lane by lane, on every build */
static inline vf fma16(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(RQ_AVX2)
    __m256 x[2], y[2], z[2];
    memcpy(x, &a, sizeof x), memcpy(y, &b, sizeof y), memcpy(z, &c, sizeof z);
    for (int h = 0; h < 2; ++h) z[h] = _mm256_fmadd_ps(x[h], y[h], z[h]);
    vf out;
    memcpy(&out, z, sizeof out);
    return out;
#else
    vf out;
    for (int l = 0; l < 16; ++l) out[l] = fmaf(a[l], b[l], c[l]);
    return out;
#endif
}

/* exp_nonpositive with fused multiply-adds: fewer operations for the 8-bit path's softmax, whose
 * bits are its own (the bf16 and fp32 paths keep theirs). */
static inline vf exp_nonpositive_fused(vf x) {
    vi underflow = x < -87.0f;
    x = where(underflow, splat(-87.0f), x);
    vi n = __builtin_convertvector(fma16(x, splat(1.44269504088896341f), splat(-0.5f)), vi); /* toward zero */
    vf fn = __builtin_convertvector(n, vf);
    vf r = fma16(fn, splat(-0.693359375f), x);
    r = fma16(fn, splat(2.12194440e-4f), r);
    vf p = splat(1.9875691500e-4f);
    p = fma16(p, r, splat(1.3981999507e-3f));
    p = fma16(p, r, splat(8.3334519073e-3f));
    p = fma16(p, r, splat(4.1665795894e-2f));
    p = fma16(p, r, splat(1.6666665459e-1f));
    p = fma16(p, r, splat(5.0000001201e-1f));
    p = fma16(p, r * r, r) + 1.0f;
    vf scale = (vf)((n + 127) << 23);
    return where(underflow, splat(0.0f), p * scale);
}

static inline float sum16(vf v) {
    float a[16];
    memcpy(a, &v, sizeof a);
    float s8[8], s4[4];
    for (int l = 0; l < 8; ++l) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* Lane i of the result is the sum of the 16 lanes of a[i]: a transpose-and-add tree, 3 vector
 * operations per sum instead of a horizontal reduction each. */
static inline vf reduce16(const vf a[16]) {
    vf b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                       30, 31);
    for (int i = 0; i < 4; ++i)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                       31);
    for (int i = 0; i < 2; ++i)
        d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                       31);
    return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static inline vf load_key(const void *base, int64_t index, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)base + index) : load_f32((const float *)base + index);
}

/* A decode or verify pass reads each K/V block from memory once, and its few rows' dot products
 * would wait on every cache line in turn. So the scores' loop over a block's keys asks, at each
 * step of KEY_STEP keys, for the keys PREFETCH_STEPS steps on (into L1) and for the step's own
 * values (into L2), which the value sum reads after the softmax. Prefetches change no result; a
 * prefill's blocks are in the cache already and it loses nothing. */
#define PREFETCH_STEPS 4
static inline void prefetch_step(const void *k, const void *v, int64_t begin, int64_t j0, int64_t n,
                                 int64_t row_bytes) {
    const int64_t ahead = j0 + PREFETCH_STEPS * KEY_STEP;
    if (ahead < n) {
        const char *keys = (const char *)k + (begin + ahead) * row_bytes;
        const int64_t bytes = (n - ahead < KEY_STEP ? n - ahead : KEY_STEP) * row_bytes;
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(keys + b, 0, 3);
    }
    const char *values = (const char *)v + (begin + j0) * row_bytes;
    const int64_t bytes = (n - j0 < KEY_STEP ? n - j0 : KEY_STEP) * row_bytes;
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(values + b, 0, 2);
}

/* scores[r][j] = scale * q_r . k_(begin + j) for j < n (rounded up to 16; padding lanes are junk). */
static inline __attribute__((always_inline)) void
scores_generic(const float *q, int rows, const void *k, int64_t begin, int64_t n, float scale,
               float scores[][BLOCK], const int head_dim, const int bf16) {
    const int nv = head_dim / 16;
    vf kf[KEY_STEP][MAX_VECS];
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        for (int t = 0; t < KEY_STEP; ++t)
            for (int c = 0; c < nv; ++c)
                kf[t][c] = t < steps ? load_key(k, (begin + j0 + t) * head_dim + c * 16, bf16) : splat(0.0f);
        for (int r = 0; r < rows; ++r) {
            vf qr[MAX_VECS], acc[KEY_STEP];
            for (int c = 0; c < nv; ++c) qr[c] = load_f32(q + (int64_t)r * head_dim + c * 16);
            for (int t = 0; t < KEY_STEP; ++t) acc[t] = qr[0] * kf[t][0];
            for (int c = 1; c < nv; ++c)
                for (int t = 0; t < KEY_STEP; ++t) acc[t] += qr[c] * kf[t][c];
            vf s = reduce16(acc) * scale;
            memcpy(&scores[r][j0], &s, sizeof s);
        }
    }
}

/* out_r += sum_j p[r][j] v_(begin + j), p already zero for masked keys. */
static inline __attribute__((always_inline)) void
weighted_values_generic(float scores[][BLOCK], int rows, const void *v, int64_t begin, int64_t n, float *partial,
                        const int head_dim, const int bf16) {
    const int nv = head_dim / 16;
    vf kf[KEY_STEP][MAX_VECS];
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        for (int t = 0; t < steps; ++t)
            for (int c = 0; c < nv; ++c) kf[t][c] = load_key(v, (begin + j0 + t) * head_dim + c * 16, bf16);
        for (int r = 0; r < rows; ++r) {
            const float *p = &scores[r][j0];
            float *out = partial + (int64_t)r * (head_dim + 2) + 2;
            vf acc[MAX_VECS];
            for (int c = 0; c < nv; ++c) acc[c] = load_f32(out + c * 16);
            for (int t = 0; t < steps; ++t)
                for (int c = 0; c < nv; ++c) acc[c] += p[t] * kf[t][c];
            for (int c = 0; c < nv; ++c) memcpy(out + c * 16, &acc[c], sizeof acc[c]);
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_BF16_DOT 1

/* In place: r[t] lane p -> r[p] lane t, 32-bit lanes (unpack within 128-bit lanes, then a 4x4
 * transpose of the 128-bit lanes). */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4G + c], 128-bit lane L: element 4L + c of rows 4G..4G+3 */
    for (int g = 0; g < 4; ++g) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
}

#define SCORE_ROWS 8 /* rows sharing each load of a transposed key vector */

/* a[i] lane t = q_i . key t, over the transposed keys kt, for n rows of bf16 pairs qp. */
static inline __attribute__((always_inline)) void score_rows(const uint32_t (*qp)[MAX_VECS * 8], const int n,
                                                             const __m512i kt[][16], const int pairs, __m512 *a) {
    for (int i = 0; i < n; ++i) a[i] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; ++p) {
        const __m512bh kv = (__m512bh)kt[p / 16][p % 16];
        for (int i = 0; i < n; ++i) a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_set1_epi32((int)qp[i][p]), kv);
    }
}

/* bf16 K: dot products with vdpbf16ps straight from the cache (q rounded to bf16 - it came
 * from bf16 activations, so this is exact). Each step's 16 keys are transposed once so that
 * lane t of a vector holds key t's pair of dimensions 2p, 2p + 1: a row's 16 scores then build
 * up in one register, in dimension order, with no reduction across lanes, and the transposed
 * keys serve every row of the call. */
static inline __attribute__((always_inline)) void
scores_bf16(const float *q, int rows, const uint16_t *k, const uint16_t *v, int64_t begin, int64_t n, float scale,
            float scores[][BLOCK], const int head_dim) {
    const int pairs = head_dim / 2;
    uint32_t qp[MAX_ROWS][MAX_VECS * 8]; /* q as bf16 pairs */
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < pairs / 16; ++c) {
            const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + (int64_t)r * head_dim + c * 32 + 16),
                                                   _mm512_loadu_ps(q + (int64_t)r * head_dim + c * 32));
            memcpy(&qp[r][c * 16], &b, 64);
        }
    __m512i kt[MAX_VECS * 8 / 16][16]; /* [pair / 16][16 keys] -> [pair][key] after transposing */
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        prefetch_step(k, v, begin, j0, n, 2 * (int64_t)head_dim);
        for (int c = 0; c < pairs / 16; ++c) {
            for (int t = 0; t < KEY_STEP; ++t)
                kt[c][t] = t < steps ? _mm512_loadu_si512(k + (begin + j0 + t) * head_dim + c * 32)
                                     : _mm512_setzero_si512();
            transpose16(kt[c]);
        }
        for (int r0 = 0; r0 < rows; r0 += SCORE_ROWS) {
            const int rn = rows - r0 < SCORE_ROWS ? rows - r0 : SCORE_ROWS;
            __m512 a[SCORE_ROWS];
            switch (rn) { /* a constant row count per case keeps the accumulators in registers */
#define SCORE_CASE(N)                                                                                        \
    case N: score_rows(qp + r0, N, kt, pairs, a); break;
            SCORE_CASE(1) SCORE_CASE(2) SCORE_CASE(3) SCORE_CASE(4) SCORE_CASE(5) SCORE_CASE(6) SCORE_CASE(7)
            default: score_rows(qp + r0, SCORE_ROWS, kt, pairs, a); break;
#undef SCORE_CASE
            }
            for (int i = 0; i < rn; ++i) _mm512_storeu_ps(&scores[r0 + i][j0], _mm512_mul_ps(a[i], _mm512_set1_ps(scale)));
        }
    }
}

/* bf16 V: probabilities rounded to bf16 (as torch's bf16 attention does), pairs of keys
 * interleaved so that one vdpbf16ps adds two keys' contributions to 16 output lanes. */
static inline __attribute__((always_inline)) void
weighted_values_bf16(float scores[][BLOCK], int rows, const uint16_t *v, int64_t begin, int64_t n, float *partial,
                     const int head_dim) {
    const int nv = head_dim / 16;
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    uint32_t pairs[MAX_ROWS][KEY_STEP / 2];
    __m512i w[KEY_STEP / 2][MAX_VECS];
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        const int n_pairs = (steps + 1) / 2;
        for (int u = 0; u < n_pairs; ++u) {
            const uint16_t *first = v + (begin + j0 + 2 * u) * head_dim;
            for (int c = 0; c < nv; ++c) {
                __m256i a = _mm256_loadu_si256((const __m256i *)(first + c * 16));
                __m256i b = 2 * u + 1 < steps ? _mm256_loadu_si256((const __m256i *)(first + head_dim + c * 16))
                                              : _mm256_setzero_si256();
                w[u][c] = _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
            }
        }
        for (int r = 0; r < rows; ++r) {
            __m256bh p = _mm512_cvtneps_pbh(_mm512_loadu_ps(&scores[r][j0]));
            memcpy(pairs[r], &p, sizeof pairs[r]);
        }
        for (int r = 0; r < rows; ++r) {
            float *out = partial + (int64_t)r * (head_dim + 2) + 2;
            __m512 acc[MAX_VECS]; /* one accumulator per 16 output lanes, interleaved */
            for (int c = 0; c < nv; ++c) acc[c] = _mm512_loadu_ps(out + c * 16);
            for (int u = 0; u < n_pairs; ++u) {
                const __m512bh p = (__m512bh)_mm512_set1_epi32((int)pairs[r][u]);
                for (int c = 0; c < nv; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], p, (__m512bh)w[u][c]);
            }
            for (int c = 0; c < nv; ++c) _mm512_storeu_ps(out + c * 16, acc[c]);
        }
    }
}
#else
#define HAVE_BF16_DOT 0

/* Without AVX512-BF16 the bf16 paths compute what vdpbf16ps computes, bit for bit, so every build
 * gives the same outputs. Per fp32 lane it performs (Intel's pseudocode; checked on this
 * instruction): acc = fma(a_odd, b_odd, acc), then acc = fma(a_even, b_even, acc), each a fused
 * multiply-add rounded to nearest even, with denormal inputs read as zero (DAZ) and denormal
 * results flushed to zero (FTZ); the bf16 it reads are fp32 with the low 16 bits zero. Its
 * conversions to bf16 (vcvtneps2bf16) round to nearest even and flush denormals to zero. */

/* fp32 -> bf16 as vcvtneps2bf16 / vcvtne2ps2bf16 do it */
static inline uint16_t bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u); /* zero or denormal: signed zero */
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f32_of(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#ifdef RQ_AVX2
/* The hardware does DAZ and FTZ itself while MXCSR has them set: the dot products below run
 * between dot_mode_on and dot_mode_off, in functions of their own (noinline), so no other float
 * operation of the caller runs in that mode. MXCSR is per thread. */
static inline unsigned int dot_mode_on(void) {
    const unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u); /* FTZ (bit 15) and DAZ (bit 6) */
    return saved;
}
static inline void dot_mode_off(unsigned int saved) { _mm_setcsr(saved); }

/* The bf16 pairs of 8 consecutive 32-bit words of 8 keys, transposed: r[p] lane t = pair p of key t. */
static inline void transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {
        u[4 * g] = _mm256_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm256_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm256_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm256_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        r[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        r[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
}

#define AVX2_ROWS 6 /* rows whose dot products run side by side: 12 independent chains of fmas */

/* acc[i] = q_(r0+i) . the step's keys (8-key halves), n a constant per call site */
static inline __attribute__((always_inline)) void dot_rows_avx2(const float (*qo)[MAX_VECS * 8],
                                                                const float (*qe)[MAX_VECS * 8], const int n,
                                                                const __m256 ko[2][MAX_VECS * 8],
                                                                const __m256 ke[2][MAX_VECS * 8], const int pairs,
                                                                float raw[][KEY_STEP]) {
    __m256 acc[AVX2_ROWS][2];
    for (int i = 0; i < n; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int p = 0; p < pairs; ++p)
        for (int i = 0; i < n; ++i) {
            const __m256 o = _mm256_set1_ps(qo[i][p]), e = _mm256_set1_ps(qe[i][p]);
            acc[i][0] = _mm256_fmadd_ps(e, ke[0][p], _mm256_fmadd_ps(o, ko[0][p], acc[i][0]));
            acc[i][1] = _mm256_fmadd_ps(e, ke[1][p], _mm256_fmadd_ps(o, ko[1][p], acc[i][1]));
        }
    for (int i = 0; i < n; ++i) {
        _mm256_storeu_ps(&raw[i][0], acc[i][0]);
        _mm256_storeu_ps(&raw[i][8], acc[i][1]);
    }
}

/* raw[r][t] = q_r . key t (before the scale) for the `steps` keys from `first`, as vdpbf16ps sums
 * them: lane t of a vector is key t, pairs in order, odd element first. Runs in dot mode. */
__attribute__((noinline)) static void dot_keys_avx2(const float (*qo)[MAX_VECS * 8], const float (*qe)[MAX_VECS * 8],
                                                    int rows, const uint16_t *first, int steps, int head_dim,
                                                    float raw[][KEY_STEP]) {
    const int pairs = head_dim / 2;
    __m256 ko[2][MAX_VECS * 8], ke[2][MAX_VECS * 8]; /* [8-key half][pair]: odd and even elements as fp32 */
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int half = 0; half < 2; ++half)
        for (int c = 0; c < pairs / 8; ++c) {
            __m256i r[8];
            for (int t = 0; t < 8; ++t)
                r[t] = 8 * half + t < steps
                           ? _mm256_loadu_si256((const __m256i *)(first + (int64_t)(8 * half + t) * head_dim + c * 16))
                           : _mm256_setzero_si256();
            transpose8(r);
            for (int p = 0; p < 8; ++p) {
                ko[half][8 * c + p] = _mm256_castsi256_ps(_mm256_and_si256(r[p], high));
                ke[half][8 * c + p] = _mm256_castsi256_ps(_mm256_slli_epi32(r[p], 16));
            }
        }
    for (int r0 = 0; r0 < rows; r0 += AVX2_ROWS) {
        const int rn = rows - r0 < AVX2_ROWS ? rows - r0 : AVX2_ROWS;
        switch (rn) { /* a constant row count per case keeps the accumulators in registers */
#define DOT_CASE(N)                                                                                          \
    case N: dot_rows_avx2(qo + r0, qe + r0, N, (const __m256(*)[MAX_VECS * 8])ko,                            \
                          (const __m256(*)[MAX_VECS * 8])ke, pairs, raw + r0); break;
            DOT_CASE(1) DOT_CASE(2) DOT_CASE(3) DOT_CASE(4) DOT_CASE(5)
            default: dot_rows_avx2(qo + r0, qe + r0, AVX2_ROWS, (const __m256(*)[MAX_VECS * 8])ko,
                                   (const __m256(*)[MAX_VECS * 8])ke, pairs, raw + r0); break;
#undef DOT_CASE
        }
    }
}

/* out_r += p_r . values over the `steps` keys from `first`, as vdpbf16ps sums pairs of keys:
 * per output lane, key 2u + 1 then key 2u. pb: the rows' probabilities as bf16 [row][KEY_STEP]
 * (zero past steps). Runs in dot mode. */
__attribute__((noinline)) static void dot_values_avx2(const uint16_t (*pb)[KEY_STEP], int rows, const uint16_t *first,
                                                      int steps, int head_dim, float *partial) {
    const int nv = head_dim / 8;
    __m256 vf[KEY_STEP][MAX_VECS * 2];
    for (int t = 0; t < KEY_STEP; ++t)
        for (int c = 0; c < nv; ++c)
            vf[t][c] = t < steps ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                                       (const __m128i *)(first + (int64_t)t * head_dim + c * 8))), 16))
                                 : _mm256_setzero_ps();
    for (int r = 0; r < rows; ++r) {
        float *out = partial + (int64_t)r * (head_dim + 2) + 2;
        for (int c0 = 0; c0 < nv; c0 += 8) {
            __m256 acc[8];
            for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(out + (c0 + c) * 8);
            for (int u = 0; u < KEY_STEP / 2; ++u) {
                if (2 * u >= steps) break;
                const __m256 po = _mm256_set1_ps(f32_of(pb[r][2 * u + 1])), pe = _mm256_set1_ps(f32_of(pb[r][2 * u]));
                for (int c = 0; c < 8; ++c)
                    acc[c] = _mm256_fmadd_ps(pe, vf[2 * u][c0 + c], _mm256_fmadd_ps(po, vf[2 * u + 1][c0 + c], acc[c]));
            }
            for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + (c0 + c) * 8, acc[c]);
        }
    }
}
#else
/* One vdpbf16ps lane step in plain C: DAZ on the inputs, one rounding, FTZ on the result. */
static inline float flush(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }
static inline float dot_step(float acc, float a, float b) { return flush(fmaf(flush(a), flush(b), flush(acc))); }

static void dot_keys_plain(const float (*qo)[MAX_VECS * 8], const float (*qe)[MAX_VECS * 8], int rows,
                           const uint16_t *first, int steps, int head_dim, float raw[][KEY_STEP]) {
    for (int r = 0; r < rows; ++r)
        for (int t = 0; t < KEY_STEP; ++t) {
            float acc = 0.0f;
            if (t < steps)
                for (int p = 0; p < head_dim / 2; ++p) {
                    acc = dot_step(acc, qo[r][p], f32_of(first[(int64_t)t * head_dim + 2 * p + 1]));
                    acc = dot_step(acc, qe[r][p], f32_of(first[(int64_t)t * head_dim + 2 * p]));
                }
            raw[r][t] = acc;
        }
}

static void dot_values_plain(const uint16_t (*pb)[KEY_STEP], int rows, const uint16_t *first, int steps, int head_dim,
                             float *partial) {
    for (int r = 0; r < rows; ++r) {
        float *out = partial + (int64_t)r * (head_dim + 2) + 2;
        for (int d = 0; d < head_dim; ++d) {
            float acc = out[d];
            for (int u = 0; 2 * u < steps; ++u) {
                const float odd = 2 * u + 1 < steps ? f32_of(first[(int64_t)(2 * u + 1) * head_dim + d]) : 0.0f;
                acc = dot_step(acc, f32_of(pb[r][2 * u + 1]), odd);
                acc = dot_step(acc, f32_of(pb[r][2 * u]), f32_of(first[(int64_t)(2 * u) * head_dim + d]));
            }
            out[d] = acc;
        }
    }
}
#endif

/* scores_bf16 of the AVX512-BF16 build, emulated (see above) */
static void scores_bf16(const float *q, int rows, const uint16_t *k, const uint16_t *v, int64_t begin, int64_t n,
                        float scale, float scores[][BLOCK], const int head_dim) {
    float qo[MAX_ROWS][MAX_VECS * 8], qe[MAX_ROWS][MAX_VECS * 8]; /* q rounded to bf16, odd and even elements */
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < head_dim / 2; ++p) {
            qo[r][p] = f32_of(bf16_of(q[(int64_t)r * head_dim + 2 * p + 1]));
            qe[r][p] = f32_of(bf16_of(q[(int64_t)r * head_dim + 2 * p]));
        }
    float raw[MAX_ROWS][KEY_STEP];
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        prefetch_step(k, v, begin, j0, n, 2 * (int64_t)head_dim);
#ifdef RQ_AVX2
        const unsigned int saved = dot_mode_on();
        dot_keys_avx2((const float(*)[MAX_VECS * 8])qo, (const float(*)[MAX_VECS * 8])qe, rows,
                      k + (begin + j0) * head_dim, steps, head_dim, raw);
        dot_mode_off(saved);
#else
        dot_keys_plain((const float(*)[MAX_VECS * 8])qo, (const float(*)[MAX_VECS * 8])qe, rows,
                       k + (begin + j0) * head_dim, steps, head_dim, raw);
#endif
        for (int r = 0; r < rows; ++r)
            for (int t = 0; t < KEY_STEP; ++t) scores[r][j0 + t] = t < steps ? raw[r][t] * scale : 0.0f;
    }
}

/* weighted_values_bf16 of the AVX512-BF16 build, emulated (see above) */
static void weighted_values_bf16(float scores[][BLOCK], int rows, const uint16_t *v, int64_t begin, int64_t n,
                                 float *partial, const int head_dim) {
    uint16_t pb[MAX_ROWS][KEY_STEP];
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        for (int r = 0; r < rows; ++r)
            for (int t = 0; t < KEY_STEP; ++t) pb[r][t] = bf16_of(scores[r][j0 + t]);
#ifdef RQ_AVX2
        const unsigned int saved = dot_mode_on();
        dot_values_avx2((const uint16_t(*)[KEY_STEP])pb, rows, v + (begin + j0) * head_dim, steps, head_dim, partial);
        dot_mode_off(saved);
#else
        dot_values_plain((const uint16_t(*)[KEY_STEP])pb, rows, v + (begin + j0) * head_dim, steps, head_dim, partial);
#endif
    }
}
#endif

/* ---- 8-bit K/V (decoding/kv_quant.py) ----
 * A key or value is row_bytes = head_dim + head_dim / 16 bytes: head_dim int8 values, then a bf16
 * scale per group of 32 channels. Queries are quantized the same way per (row, head, group), to
 * int8 with an fp32 scale, once per call and per row alone (quantize_query), so a row's bits do not
 * depend on the rows beside it. A score is the sum over groups, in group order, of
 * fma(int32 dot, key scale * query factor, sum); the int32 dot is exact on every build.
 *
 * Value sum: each key's probability times its value scale, rounded to bf16 (w = bf16(p * s), one
 * per key and group), against the values converted exactly to bf16, summed by vdpbf16ps as the
 * bf16 path does. Why not integer dot products here too: the scale varies per key, so 8-bit
 * weights need a scale per row, group and run of keys. That was built (runs of 64 keys, weights
 * round(255 p s / (P S)), vpdpbusd on values transposed 4 keys to a lane) and measured no faster
 * on AVX512-VNNI cores: it halves the value sum's dot products, but finding each row's largest
 * weight, converting and packing its weights per run and summing the int32 results back cost as
 * much as it saves (docs/measurements.md, sixth session). Dequantizing to fp32 does half the
 * multiply-adds per instruction of vdpbf16ps. */
#define KV_F32 0 /* the K/V forms rq_attend takes (kv_form) */
#define KV_BF16 1
#define KV_Q8 2
#define Q8_GROUP 32
#define Q8_MAX_GROUPS (MAX_VECS * 16 / Q8_GROUP)

static inline int q8_row_bytes(int head_dim) { return head_dim + head_dim / 16; }

/* A query row of an 8-bit call, written over the row's head_dim floats (it takes head_dim * 5 / 4
 * bytes): head_dim int8 values, then per group the fp32 factor (query scale times the softmax
 * scale), then per group the int32 offset -128 * (sum of its int8 values), which undoes the +128
 * that makes the keys unsigned for vpdpbusd. The scale is max |q| / 127 over the group; a group
 * holding a NaN or an infinity gets a NaN factor, so its scores are NaN as torch's would be. */
static void quantize_query(float *row, int head_dim, float scale) {
    const int groups = head_dim / Q8_GROUP;
    int8_t values[MAX_VECS * 16];
    float factors[Q8_MAX_GROUPS];
    int32_t offsets[Q8_MAX_GROUPS];
    for (int g = 0; g < groups; ++g) {
        const float *x = row + g * Q8_GROUP;
        float amax = 0.0f;
        int finite = 1;
        for (int i = 0; i < Q8_GROUP; ++i) {
            const float a = fabsf(x[i]);
            finite &= a <= FLT_MAX;
            amax = a > amax ? a : amax;
        }
        int32_t sum = 0;
        const float inv = amax > 0.0f && finite ? 127.0f / amax : 0.0f;
        for (int i = 0; i < Q8_GROUP; ++i) {
            float r = rintf(x[i] * inv); /* nearest even, as every build's default rounding */
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            values[g * Q8_GROUP + i] = finite ? (int8_t)r : 0;
            sum += values[g * Q8_GROUP + i];
        }
        factors[g] = finite ? amax / 127.0f * scale : NAN;
        offsets[g] = -128 * sum;
    }
    memcpy(row, values, (size_t)head_dim);
    memcpy((char *)row + head_dim, factors, sizeof(float) * (size_t)groups);
    memcpy((char *)row + head_dim + 4 * groups, offsets, sizeof(int32_t) * (size_t)groups);
}

/* The rows' quantized queries (quantize_query's layout) as 4-byte words, factors and offsets. */
static inline void unpack_queries_q8(const float *q, int rows, int head_dim, uint32_t (*words)[MAX_VECS * 4],
                                     float (*factors)[Q8_MAX_GROUPS], int32_t (*offsets)[Q8_MAX_GROUPS]) {
    const int groups = head_dim / Q8_GROUP;
    for (int r = 0; r < rows; ++r) {
        const char *row = (const char *)(q + (int64_t)r * head_dim);
        memcpy(words[r], row, (size_t)head_dim);
        memcpy(factors[r], row + head_dim, sizeof(float) * (size_t)groups);
        memcpy(offsets[r], row + head_dim + 4 * groups, sizeof(int32_t) * (size_t)groups);
    }
}

#if HAVE_BF16_DOT
/* s[g] lane t = the scale of group g of key t (of the step's keys from first); keys past steps
 * repeat the last key's scales, so the padding lanes stay finite. */
static inline __attribute__((always_inline)) void scales_q8(const uint8_t *first, int steps, const int head_dim,
                                                            __m512 *s) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i key = _mm512_min_epi32(lane, _mm512_set1_epi32(steps - 1));
    const __m512i at = _mm512_add_epi32(_mm512_mullo_epi32(key, _mm512_set1_epi32(q8_row_bytes(head_dim))),
                                        _mm512_set1_epi32(head_dim));
    for (int j = 0; j < head_dim / 64; ++j) { /* one 4-byte word: the scales of groups 2j, 2j + 1 */
        const __m512i w = _mm512_i32gather_epi32(_mm512_add_epi32(at, _mm512_set1_epi32(4 * j)), first, 1);
        s[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        s[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
    }
}

/* f[i] lane t = the score of row i and key t: per group an int32 dot product of 8 vpdpbusd
 * (keys + 128 unsigned, the query signed, started at the query's offset), then one fma. */
static inline __attribute__((always_inline)) void
score_rows_q8(const uint32_t (*words)[MAX_VECS * 4], const float (*factors)[Q8_MAX_GROUPS],
              const int32_t (*offsets)[Q8_MAX_GROUPS], const int n, const __m512i *kt, const __m512 *ks,
              const int groups, __m512 *f) {
    for (int i = 0; i < n; ++i) f[i] = _mm512_setzero_ps();
    for (int g = 0; g < groups; ++g) {
        __m512i acc[SCORE_ROWS];
        for (int i = 0; i < n; ++i) acc[i] = _mm512_set1_epi32(offsets[i][g]);
        for (int p = 0; p < Q8_GROUP / 4; ++p) {
            const __m512i kv = kt[g * (Q8_GROUP / 4) + p];
            for (int i = 0; i < n; ++i)
                acc[i] = _mm512_dpbusd_epi32(acc[i], kv, _mm512_set1_epi32((int)words[i][g * (Q8_GROUP / 4) + p]));
        }
        for (int i = 0; i < n; ++i)
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), _mm512_mul_ps(ks[g], _mm512_set1_ps(factors[i][g])),
                                   f[i]);
    }
}

/* scores[r][j] = q_r . k_(begin + j) as above, the softmax scale in the query factors; padding
 * lanes are junk (finite). Each step's 16 keys are transposed once (lane t = key t, 4 channels
 * per lane) for every row of the call. */
static inline __attribute__((always_inline)) void
scores_q8(const float *q, int rows, const uint8_t *k, const uint8_t *v, int64_t begin, int64_t n,
          float scores[][BLOCK], const int head_dim) {
    const int groups = head_dim / Q8_GROUP, row_bytes = q8_row_bytes(head_dim);
    uint32_t words[MAX_ROWS][MAX_VECS * 4];
    float factors[MAX_ROWS][Q8_MAX_GROUPS];
    int32_t offsets[MAX_ROWS][Q8_MAX_GROUPS];
    unpack_queries_q8(q, rows, head_dim, words, factors, offsets);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i kt[MAX_VECS * 4]; /* [64-channel chunk][16] -> [4-channel word][key] after transposing */
    __m512 ks[Q8_MAX_GROUPS];
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        const uint8_t *first = k + (begin + j0) * row_bytes;
        prefetch_step(k, v, begin, j0, n, row_bytes);
        for (int c = 0; c < head_dim / 64; ++c) {
            for (int t = 0; t < KEY_STEP; ++t)
                kt[16 * c + t] = t < steps ? _mm512_xor_si512(_mm512_loadu_si512(first + t * row_bytes + c * 64), flip)
                                           : flip;
            transpose16(kt + 16 * c);
        }
        scales_q8(first, steps, head_dim, ks);
        for (int r0 = 0; r0 < rows; r0 += SCORE_ROWS) {
            const int rn = rows - r0 < SCORE_ROWS ? rows - r0 : SCORE_ROWS;
            __m512 f[SCORE_ROWS];
            switch (rn) { /* a constant row count per case keeps the accumulators in registers */
#define SCORE_CASE(N)                                                                                        \
    case N: score_rows_q8(words + r0, factors + r0, offsets + r0, N, kt, ks, groups, f); break;
            SCORE_CASE(1) SCORE_CASE(2) SCORE_CASE(3) SCORE_CASE(4) SCORE_CASE(5) SCORE_CASE(6) SCORE_CASE(7)
            default: score_rows_q8(words + r0, factors + r0, offsets + r0, SCORE_ROWS, kt, ks, groups, f); break;
#undef SCORE_CASE
            }
            for (int i = 0; i < rn; ++i) _mm512_storeu_ps(&scores[r0 + i][j0], f[i]);
        }
    }
}

#define VALUE_ROWS_Q8 (256 / head_dim) /* rows sharing each load of the step's values: 16 accumulators */
/* Steps whose value sums run with a row's accumulators held in registers: loading and storing them
 * at every step cost about as much as a step's dot products for a few rows. Each accumulator still
 * takes the steps and pairs in order, so the bits are those of one step at a time. */
#define VALUE_STEPS 4

/* The value sum of rows r0 .. r0 + n - 1 (n <= VALUE_ROWS_Q8) over `steps` steps: pairs[s][r][g][u]
 * the bf16 weights of keys 2u, 2u + 1 of step s in group g, w[s][u][c] those keys' values
 * interleaved. The weights are the broadcast operand (vdpbf16ps's products are the same either way
 * round). */
static inline __attribute__((always_inline)) void
value_rows_q8(const uint32_t (*pairs)[MAX_ROWS][Q8_MAX_GROUPS][KEY_STEP / 2], const int r0, const int n,
              const __m512i (*w)[KEY_STEP / 2][MAX_VECS], const int *n_pairs, const int steps, float *partial,
              const int head_dim) {
    const int nv = head_dim / 16, groups = head_dim / Q8_GROUP;
    __m512 acc[4][MAX_VECS];
    for (int i = 0; i < n; ++i)
        for (int c = 0; c < nv; ++c) acc[i][c] = _mm512_loadu_ps(partial + (int64_t)i * (head_dim + 2) + 2 + c * 16);
    for (int s = 0; s < steps; ++s)
        for (int u = 0; u < n_pairs[s]; ++u)
            for (int g = 0; g < groups; ++g) {
                const __m512bh w0 = (__m512bh)w[s][u][2 * g], w1 = (__m512bh)w[s][u][2 * g + 1];
                for (int i = 0; i < n; ++i) {
                    const __m512bh pw = (__m512bh)_mm512_set1_epi32((int)pairs[s][r0 + i][g][u]);
                    acc[i][2 * g] = _mm512_dpbf16_ps(acc[i][2 * g], w0, pw);
                    acc[i][2 * g + 1] = _mm512_dpbf16_ps(acc[i][2 * g + 1], w1, pw);
                }
            }
    for (int i = 0; i < n; ++i)
        for (int c = 0; c < nv; ++c) _mm512_storeu_ps(partial + (int64_t)i * (head_dim + 2) + 2 + c * 16, acc[i][c]);
}

/* out_r += sum_j bf16(p[r][j] * s_j) v_j, per group of channels with its own scale s_j: the
 * values converted to bf16 (exact for int8) and interleaved in pairs of keys, as in
 * weighted_values_bf16. */
static inline __attribute__((always_inline)) void
weighted_values_q8(float scores[][BLOCK], int rows, const uint8_t *v, int64_t begin, int64_t n, float *partial,
                   const int head_dim) {
    const int nv = head_dim / 16, groups = head_dim / Q8_GROUP, row_bytes = q8_row_bytes(head_dim);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    uint32_t pairs[VALUE_STEPS][MAX_ROWS][Q8_MAX_GROUPS][KEY_STEP / 2];
    __m512i w[VALUE_STEPS][KEY_STEP / 2][MAX_VECS];
    __m512 vs[Q8_MAX_GROUPS];
    int n_pairs[VALUE_STEPS];
    for (int64_t s0 = 0; s0 < n; s0 += VALUE_STEPS * KEY_STEP) {
        int steps = 0;
        for (int64_t j0 = s0; j0 < n && j0 < s0 + VALUE_STEPS * KEY_STEP; j0 += KEY_STEP, ++steps) {
            const int keys = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
            n_pairs[steps] = (keys + 1) / 2;
            const uint8_t *first = v + (begin + j0) * row_bytes;
            for (int u = 0; u < n_pairs[steps]; ++u) {
                const uint8_t *even = first + 2 * u * row_bytes;
                for (int c = 0; c < nv; ++c) {
                    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(even + c * 16))));
                    const __m512 b = 2 * u + 1 < keys ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                            _mm_loadu_si128((const __m128i *)(even + row_bytes + c * 16))))
                                                      : _mm512_setzero_ps();
                    w[steps][u][c] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
                }
            }
            scales_q8(first, keys, head_dim, vs);
            for (int r = 0; r < rows; ++r) {
                const __m512 p = _mm512_loadu_ps(&scores[r][j0]); /* zero past the valid keys */
                for (int g = 0; g < groups; ++g) {
                    const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(p, vs[g]));
                    memcpy(pairs[steps][r][g], &h, sizeof pairs[steps][r][g]);
                }
            }
        }
        for (int r0 = 0; r0 < rows; r0 += VALUE_ROWS_Q8) {
            float *out = partial + (int64_t)r0 * (head_dim + 2);
            if (rows - r0 >= VALUE_ROWS_Q8) {
                value_rows_q8((const uint32_t(*)[MAX_ROWS][Q8_MAX_GROUPS][KEY_STEP / 2])pairs, r0, VALUE_ROWS_Q8,
                              (const __m512i(*)[KEY_STEP / 2][MAX_VECS])w, n_pairs, steps, out, head_dim);
            } else {
                for (int r = r0; r < rows; ++r, out += head_dim + 2)
                    value_rows_q8((const uint32_t(*)[MAX_ROWS][Q8_MAX_GROUPS][KEY_STEP / 2])pairs, r, 1,
                                  (const __m512i(*)[KEY_STEP / 2][MAX_VECS])w, n_pairs, steps, out, head_dim);
            }
        }
    }
}
#else
/* Without AVX512-VNNI and -BF16 the 8-bit paths compute what those builds compute, bit for bit:
 * the int32 dot products are exact whatever the order, and the rest is the same fp32 operations
 * (an fma per group for a score; the vdpbf16ps emulation for the value sum). */

static inline float scale_q8(const uint8_t *key, int head_dim, int g) {
    uint16_t h;
    memcpy(&h, key + head_dim + 2 * g, 2);
    return f32_of(h);
}

#ifdef RQ_AVX2
/* The AVX2 build: 8 keys per step, transposed (lane t = key t, 4 channels per lane); a 4-channel
 * product by vpmaddubsw on |q| and k with q's sign (at most 2 * 127 * 127 per pair of products, so
 * no saturation: kv_quant never writes -128), summed to int32 by vpmaddwd - exact, as vpdpbusd. */
static void scores_q8(const float *q, int rows, const uint8_t *k, const uint8_t *v, int64_t begin, int64_t n,
                      float scores[][BLOCK], const int head_dim) {
    const int groups = head_dim / Q8_GROUP, row_bytes = q8_row_bytes(head_dim);
    uint32_t words[MAX_ROWS][MAX_VECS * 4];
    float factors[MAX_ROWS][Q8_MAX_GROUPS];
    int32_t offsets[MAX_ROWS][Q8_MAX_GROUPS];
    unpack_queries_q8(q, rows, head_dim, words, factors, offsets);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i kt[MAX_VECS * 4]; /* [4-channel word][8 keys] */
    __m256 ks[Q8_MAX_GROUPS];
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        const int steps = n - j0 < 8 ? (int)(n - j0) : 8;
        const uint8_t *first = k + (begin + j0) * row_bytes;
        if (j0 % KEY_STEP == 0) prefetch_step(k, v, begin, j0, n, row_bytes);
        for (int c = 0; c < head_dim / 32; ++c) {
            for (int t = 0; t < 8; ++t)
                kt[8 * c + t] = t < steps ? _mm256_loadu_si256((const __m256i *)(first + t * row_bytes + c * 32))
                                          : _mm256_setzero_si256();
            transpose8(kt + 8 * c);
        }
        for (int g = 0; g < groups; ++g) {
            float lanes[8];
            for (int t = 0; t < 8; ++t) lanes[t] = t < steps ? scale_q8(first + (int64_t)t * row_bytes, head_dim, g) : 0.0f;
            ks[g] = _mm256_loadu_ps(lanes);
        }
        for (int r = 0; r < rows; ++r) {
            __m256 f = _mm256_setzero_ps();
            for (int g = 0; g < groups; ++g) {
                __m256i acc = _mm256_setzero_si256();
                for (int p = 0; p < Q8_GROUP / 4; ++p) {
                    const __m256i qw = _mm256_set1_epi32((int)words[r][g * (Q8_GROUP / 4) + p]);
                    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(qw),
                                                               _mm256_sign_epi8(kt[g * (Q8_GROUP / 4) + p], qw));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
                }
                f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(ks[g], _mm256_set1_ps(factors[r][g])), f);
            }
            _mm256_storeu_ps(&scores[r][j0], f); /* lanes past steps: junk (zero scale) */
        }
    }
}
#else
static void scores_q8(const float *q, int rows, const uint8_t *k, const uint8_t *v, int64_t begin, int64_t n,
                      float scores[][BLOCK], const int head_dim) {
    const int groups = head_dim / Q8_GROUP, row_bytes = q8_row_bytes(head_dim);
    uint32_t words[MAX_ROWS][MAX_VECS * 4];
    float factors[MAX_ROWS][Q8_MAX_GROUPS];
    int32_t offsets[MAX_ROWS][Q8_MAX_GROUPS];
    unpack_queries_q8(q, rows, head_dim, words, factors, offsets);
    for (int64_t j = 0; j < n; ++j) {
        const uint8_t *key = k + (begin + j) * row_bytes;
        if (j % KEY_STEP == 0) prefetch_step(k, v, begin, j, n, row_bytes);
        float ks[Q8_MAX_GROUPS];
        for (int g = 0; g < groups; ++g) ks[g] = scale_q8(key, head_dim, g);
        for (int r = 0; r < rows; ++r) {
            const int8_t *qr = (const int8_t *)words[r], *kr = (const int8_t *)key;
            float f = 0.0f;
            for (int g = 0; g < groups; ++g) {
                int32_t dot = 0;
                for (int i = g * Q8_GROUP; i < (g + 1) * Q8_GROUP; ++i) dot += (int32_t)qr[i] * kr[i];
                f = fmaf((float)dot, ks[g] * factors[r][g], f);
            }
            scores[r][j] = f;
        }
    }
}
#endif

#ifdef RQ_AVX2
/* out_r += sum over the step's keys of w * v as vdpbf16ps sums pairs of keys (dot_values_avx2),
 * w per group: wb[row][group][key] (bf16, zero past steps). Runs in dot mode. */
__attribute__((noinline)) static void dot_values_q8(const uint16_t (*wb)[Q8_MAX_GROUPS][KEY_STEP], int rows,
                                                    const uint8_t *first, int steps, int head_dim, float *partial) {
    const int nv = head_dim / 8, row_bytes = q8_row_bytes(head_dim);
    __m256 vf[KEY_STEP][MAX_VECS * 2];
    for (int t = 0; t < KEY_STEP; ++t)
        for (int c = 0; c < nv; ++c)
            vf[t][c] = t < steps ? _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                       _mm_loadl_epi64((const __m128i *)(first + (int64_t)t * row_bytes + c * 8))))
                                 : _mm256_setzero_ps();
    for (int r = 0; r < rows; ++r) {
        float *out = partial + (int64_t)r * (head_dim + 2) + 2;
        for (int c0 = 0; c0 < nv; c0 += Q8_GROUP / 8) {
            const uint16_t *wg = wb[r][c0 / (Q8_GROUP / 8)];
            __m256 acc[Q8_GROUP / 8];
            for (int c = 0; c < Q8_GROUP / 8; ++c) acc[c] = _mm256_loadu_ps(out + (c0 + c) * 8);
            for (int u = 0; 2 * u < steps; ++u) {
                const __m256 po = _mm256_set1_ps(f32_of(wg[2 * u + 1])), pe = _mm256_set1_ps(f32_of(wg[2 * u]));
                for (int c = 0; c < Q8_GROUP / 8; ++c)
                    acc[c] = _mm256_fmadd_ps(pe, vf[2 * u][c0 + c], _mm256_fmadd_ps(po, vf[2 * u + 1][c0 + c], acc[c]));
            }
            for (int c = 0; c < Q8_GROUP / 8; ++c) _mm256_storeu_ps(out + (c0 + c) * 8, acc[c]);
        }
    }
}
#else
static void dot_values_q8(const uint16_t (*wb)[Q8_MAX_GROUPS][KEY_STEP], int rows, const uint8_t *first, int steps,
                          int head_dim, float *partial) {
    const int row_bytes = q8_row_bytes(head_dim);
    for (int r = 0; r < rows; ++r) {
        float *out = partial + (int64_t)r * (head_dim + 2) + 2;
        for (int d = 0; d < head_dim; ++d) {
            const uint16_t *wg = wb[r][d / Q8_GROUP];
            float acc = out[d];
            for (int u = 0; 2 * u < steps; ++u) {
                const float odd = 2 * u + 1 < steps ? (float)(int8_t)first[(int64_t)(2 * u + 1) * row_bytes + d] : 0.0f;
                acc = dot_step(acc, f32_of(wg[2 * u + 1]), odd);
                acc = dot_step(acc, f32_of(wg[2 * u]), (float)(int8_t)first[(int64_t)(2 * u) * row_bytes + d]);
            }
            out[d] = acc;
        }
    }
}
#endif

static void weighted_values_q8(float scores[][BLOCK], int rows, const uint8_t *v, int64_t begin, int64_t n,
                               float *partial, const int head_dim) {
    const int groups = head_dim / Q8_GROUP, row_bytes = q8_row_bytes(head_dim);
    uint16_t wb[MAX_ROWS][Q8_MAX_GROUPS][KEY_STEP];
    for (int64_t j0 = 0; j0 < n; j0 += KEY_STEP) {
        const int steps = n - j0 < KEY_STEP ? (int)(n - j0) : KEY_STEP;
        const uint8_t *first = v + (begin + j0) * row_bytes;
        for (int g = 0; g < groups; ++g)
            for (int t = 0; t < KEY_STEP; ++t) {
                const float s = t < steps ? scale_q8(first + (int64_t)t * row_bytes, head_dim, g) : 0.0f;
                for (int r = 0; r < rows; ++r) wb[r][g][t] = bf16_of(scores[r][j0 + t] * s);
            }
#ifdef RQ_AVX2
        const unsigned int saved = dot_mode_on();
        dot_values_q8((const uint16_t(*)[Q8_MAX_GROUPS][KEY_STEP])wb, rows, first, steps, head_dim, partial);
        dot_mode_off(saved);
#else
        dot_values_q8((const uint16_t(*)[Q8_MAX_GROUPS][KEY_STEP])wb, rows, first, steps, head_dim, partial);
#endif
    }
}
#endif

/* The largest of a row's scores s[0, valid) (-3e38 for none), of padded (a multiple of 16). Four
 * running maxima side by side, as the max of a set does not depend on the order it is taken in. */
static inline float valid_max(const float *s, int64_t padded, int64_t valid) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vf m4[4] = {splat(-3.0e38f), splat(-3.0e38f), splat(-3.0e38f), splat(-3.0e38f)};
    int64_t j0 = 0;
    for (; j0 + 64 <= padded; j0 += 64)
        for (int a = 0; a < 4; ++a) {
            const vi ok = (lane + (int32_t)(j0 + 16 * a)) < (int32_t)valid;
            const vf x = load_f32(s + j0 + 16 * a);
            m4[a] = where(ok & (x > m4[a]), x, m4[a]);
        }
    for (; j0 < padded; j0 += 16) {
        const vi ok = (lane + (int32_t)j0) < (int32_t)valid;
        const vf x = load_f32(s + j0);
        m4[0] = where(ok & (x > m4[0]), x, m4[0]);
    }
    float lanes[4][16], m = -3.0e38f;
    memcpy(lanes, m4, sizeof lanes);
    for (int a = 0; a < 4; ++a)
        for (int l = 0; l < 16; ++l) m = lanes[a][l] > m ? lanes[a][l] : m;
    return m;
}

/* One K/V head, keys [begin, end): per row, the running max, the sum of exp and the unnormalised
 * weighted values, written to partial[row] = {max, sum, out[head_dim]}. */
static inline __attribute__((always_inline)) void
attend_block(const float *q, int rows, const void *k, const void *v, const int32_t *lengths,
             int64_t begin, int64_t end, float scale, float *partial, const int head_dim, const int form) {
    float scores[MAX_ROWS][BLOCK] __attribute__((aligned(64)));
    const int64_t n = end - begin;
    const int64_t padded = (n + 15) & ~(int64_t)15;

    if (form == KV_Q8) scores_q8(q, rows, (const uint8_t *)k, (const uint8_t *)v, begin, n, scores, head_dim);
    else if (form == KV_BF16)
        scores_bf16(q, rows, (const uint16_t *)k, (const uint16_t *)v, begin, n, scale, scores, head_dim);
    else scores_generic(q, rows, k, begin, n, scale, scores, head_dim, 0);

    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int r = 0; r < rows; ++r) {
        float *out = partial + (int64_t)r * (head_dim + 2);
        int64_t valid = lengths[r] - begin;
        valid = valid < 0 ? 0 : (valid > n ? n : valid);
        const float m = valid_max(scores[r], padded, valid);
        vf sums = splat(0.0f);
        if (valid == padded) { /* every lane valid (most blocks of a long context) */
            for (int64_t j0 = 0; j0 < padded; j0 += 16) {
                const vf x = load_f32(&scores[r][j0]) - m;
                const vf p = form == KV_Q8 ? exp_nonpositive_fused(x) : exp_nonpositive(x);
                memcpy(&scores[r][j0], &p, sizeof p);
                sums += p;
            }
        } else {
            for (int64_t j0 = 0; j0 < padded; j0 += 16) {
                vi ok = (lane + (int32_t)j0) < (int32_t)valid;
                const vf x = load_f32(&scores[r][j0]) - m;
                vf p = form == KV_Q8 ? exp_nonpositive_fused(x) : exp_nonpositive(x);
                p = where(ok, p, splat(0.0f)); /* exact zeros: masked keys add nothing to any sum */
                memcpy(&scores[r][j0], &p, sizeof p);
                sums += p;
            }
        }
        out[0] = valid > 0 ? m : -3.0e38f;
        out[1] = sum16(sums);
        memset(out + 2, 0, sizeof(float) * head_dim);
    }

    if (form == KV_Q8) weighted_values_q8(scores, rows, (const uint8_t *)v, begin, n, partial, head_dim);
    else if (form == KV_BF16) weighted_values_bf16(scores, rows, (const uint16_t *)v, begin, n, partial, head_dim);
    else weighted_values_generic(scores, rows, v, begin, n, partial, head_dim, 0);
}

#define BLOCK_VARIANT(D, NAME, FORM)                                                                  \
    static void block_##NAME##_##D(const float *q, int rows, const void *k, const void *v,           \
                                   const int32_t *lengths, int64_t begin, int64_t end, float scale,  \
                                   float *out) {                                                     \
        attend_block(q, rows, k, v, lengths, begin, end, scale, out, D, FORM);                        \
    }
BLOCK_VARIANT(64, bf16, KV_BF16)
BLOCK_VARIANT(128, bf16, KV_BF16)
BLOCK_VARIANT(256, bf16, KV_BF16)
BLOCK_VARIANT(64, f32, KV_F32)
BLOCK_VARIANT(128, f32, KV_F32)
BLOCK_VARIANT(256, f32, KV_F32)
BLOCK_VARIANT(64, q8, KV_Q8)
BLOCK_VARIANT(128, q8, KV_Q8)
BLOCK_VARIANT(256, q8, KV_Q8)

typedef void (*block_fn)(const float *, int, const void *, const void *, const int32_t *, int64_t, int64_t,
                         float, float *);

/* The block computation for a head_dim and K/V form, or 0 for one the kernel does not take. */
static block_fn block_for(int head_dim, int form) {
    static const block_fn blocks[3][3] = {{block_f32_64, block_f32_128, block_f32_256},
                                          {block_bf16_64, block_bf16_128, block_bf16_256},
                                          {block_q8_64, block_q8_128, block_q8_256}};
    const int d = head_dim == 64 ? 0 : head_dim == 128 ? 1 : head_dim == 256 ? 2 : -1;
    return d < 0 || form < KV_F32 || form > KV_Q8 ? 0 : blocks[form][d];
}

/* Bytes per element of a K/V form (an 8-bit key is q8_row_bytes elements, a float one head_dim). */
static int element_bytes(int form) { return form == KV_Q8 ? 1 : form == KV_BF16 ? 2 : 4; }

/* Status codes (0: done). */
#define RQ_BAD_HEADS -1   /* a head_dim, group or K/V head count it does not take */
#define RQ_NO_MEMORY -2
#define RQ_BAD_SHARED -3  /* a shared segment that is not a whole number of blocks, or has no K/V */
#define RQ_BAD_SESSION -4 /* a session with no rows, no keys, too many keys or no pointers */

/* One session of a batched call. Its keys are counted over the shared segment, then its own
 * segment: token i sees first_length + i keys, the last of them first_length + tokens - 1. */
typedef struct {
    const void *q;        /* [tokens][n_kv * group][head_dim], q_stride elements from one token to the next */
    int64_t q_stride;
    int64_t tokens;
    int64_t first_length;
    const void *k, *v;    /* its own K/V: own slot j is key n_shared + j */
    int64_t head_stride;  /* elements from one K/V head to the next in k and v */
    void *out;            /* [tokens][n_kv * group * head_dim], out_stride elements from one token to the next */
    int64_t out_stride;
} rq_session;

/* Where a session's rows and own partial results are. A K/V head's rows are every session's rows
 * one after another, each session's ordered (group member, token). */
typedef struct {
    int64_t rows;         /* group * tokens */
    int64_t first_row;    /* its first row among a K/V head's rows */
    int64_t own_keys;     /* keys of its own segment that it reads */
    int64_t own_blocks;
    float *own_partials;  /* [n_kv][own_blocks][rows][head_dim + 2] */
} session_plan;

/* One work item: n_rows rows (taken MAX_ROWS at a time) over keys [begin, end) of one segment's
 * K/V head. The rows' partial results go to partial, head_dim + 2 floats apart. */
typedef struct {
    const char *k, *v;
    int64_t begin, end;
    const float *q;         /* the rows' fp32 queries, head_dim apart */
    const int32_t *lengths; /* the rows' valid key counts, counted from the segment's first key */
    int64_t n_rows;
    float *partial;
} work_item;

/* A run of one row's partial results {max, sum, out[head_dim]} over consecutive blocks. */
typedef struct {
    const float *first;
    int64_t count, stride;
} partial_run;

static int check_shapes(const void *shared_k, const void *shared_v, int64_t n_shared, const rq_session *sessions,
                        int n_sessions, int group, int n_kv, int head_dim, int form) {
    if (!block_for(head_dim, form) || group < 1 || n_kv < 1) return RQ_BAD_HEADS;
    if (n_shared < 0 || n_shared % BLOCK != 0 || (n_shared > 0 && (!shared_k || !shared_v))) return RQ_BAD_SHARED;
    if (n_sessions < 1 || !sessions) return RQ_BAD_SESSION;
    for (int s = 0; s < n_sessions; ++s) {
        const rq_session *x = &sessions[s];
        if (x->tokens < 1 || x->first_length < 1 || x->first_length + x->tokens - 1 > INT32_MAX) return RQ_BAD_SESSION;
        if (!x->q || !x->out) return RQ_BAD_SESSION;
        if (x->first_length + x->tokens - 1 > n_shared && (!x->k || !x->v)) return RQ_BAD_SESSION;
        if ((int64_t)group * x->tokens > INT32_MAX / n_kv) return RQ_BAD_SESSION;
    }
    return 0;
}

/* Fills plans; returns the scratch floats the call needs for its partial results. */
static int64_t plan_sessions(const rq_session *sessions, int n_sessions, int64_t n_shared, int group, int n_kv,
                             int head_dim, session_plan *plans, int64_t *total_rows) {
    int64_t rows = 0, own_partials = 0;
    for (int s = 0; s < n_sessions; ++s) {
        session_plan *p = &plans[s];
        p->rows = group * sessions[s].tokens;
        p->first_row = rows;
        const int64_t keys = sessions[s].first_length + sessions[s].tokens - 1 - n_shared;
        p->own_keys = keys > 0 ? keys : 0;
        p->own_blocks = (p->own_keys + BLOCK - 1) / BLOCK;
        rows += p->rows;
        own_partials += p->own_blocks * p->rows;
    }
    *total_rows = rows;
    return (int64_t)n_kv * (n_shared / BLOCK * rows + own_partials) * (head_dim + 2);
}

static void run_item(const work_item *w, block_fn block, int head_dim, float scale) {
    for (int64_t r0 = 0; r0 < w->n_rows; r0 += MAX_ROWS) {
        const int n = w->n_rows - r0 < MAX_ROWS ? (int)(w->n_rows - r0) : MAX_ROWS;
        block(w->q + r0 * head_dim, n, w->k, w->v, w->lengths + r0, w->begin, w->end, scale,
              w->partial + r0 * (head_dim + 2));
    }
}

/* Softmax-weighted merge of one row's partial results in block order (the shared segment's blocks,
 * then its own), written to out (fp32, or bf16 rounded to nearest even as torch rounds). */
static void combine_row(const partial_run runs[2], int head_dim, void *out, int out_bf16) {
    float m = -3.0e38f;
    for (int i = 0; i < 2; ++i)
        for (int64_t b = 0; b < runs[i].count; ++b) {
            const float mb = runs[i].first[b * runs[i].stride];
            m = mb > m ? mb : m;
        }
    float total = 0.0f;
    float o[256];
    for (int d = 0; d < head_dim; ++d) o[d] = 0.0f;
    for (int i = 0; i < 2; ++i)
        for (int64_t b = 0; b < runs[i].count; ++b) {
            const float *pb = runs[i].first + b * runs[i].stride;
            if (pb[1] == 0.0f) continue; /* no valid key of this row in the block */
            const float w = exp_nonpositive(splat(pb[0] - m))[0];
            total += pb[1] * w;
            for (int d = 0; d < head_dim; ++d) o[d] += pb[2 + d] * w;
        }
    const float inv = 1.0f / total;
    for (int d = 0; d < head_dim; ++d) {
        const float x = o[d] * inv;
        if (out_bf16) ((uint16_t *)out)[d] = f32_to_bf16(x);
        else ((float *)out)[d] = x;
    }
}

/* The work items over the shared segment: per (K/V head, block), every session's rows in one item,
 * so the block is read from memory once for all of them (the row groups after the first find it in
 * the core's cache). With few blocks, the rows are split over a few items to keep threads busy. */
static int64_t shared_items(work_item *items, const char *k, const char *v, int64_t head_bytes, int64_t n_shared,
                            const float *qf, const int32_t *lengths, int64_t rows, int n_kv, int head_dim,
                            float *partials, int n_threads) {
    const int64_t n_blocks = n_shared / BLOCK, base = n_kv * n_blocks, groups = (rows + MAX_ROWS - 1) / MAX_ROWS;
    if (base == 0) return 0;
    int64_t splits = (2 * (int64_t)n_threads + base - 1) / base;
    splits = splits < 1 ? 1 : (splits > groups ? groups : splits);
    const int64_t per = (groups + splits - 1) / splits * MAX_ROWS; /* rows per item, whole groups */
    int64_t n = 0;
    for (int64_t h = 0; h < n_kv; ++h)
        for (int64_t b = 0; b < n_blocks; ++b)
            for (int64_t r0 = 0; r0 < rows; r0 += per)
                items[n++] = (work_item){k + h * head_bytes, v + h * head_bytes, b * BLOCK, b * BLOCK + BLOCK,
                                         qf + (h * rows + r0) * head_dim, lengths + r0,
                                         rows - r0 < per ? rows - r0 : per,
                                         partials + ((h * n_blocks + b) * rows + r0) * (head_dim + 2)};
    return n;
}

/* The work items over one session's own segment: per (K/V head, block, group of MAX_ROWS rows). */
static int64_t own_items(work_item *items, const rq_session *x, const session_plan *p, int elem, const float *qf,
                         const int32_t *own_lengths, int64_t rows, int n_kv, int head_dim) {
    int64_t n = 0;
    for (int64_t h = 0; h < n_kv; ++h)
        for (int64_t b = 0; b < p->own_blocks; ++b) {
            const int64_t begin = b * BLOCK, end = begin + BLOCK < p->own_keys ? begin + BLOCK : p->own_keys;
            for (int64_t r0 = 0; r0 < p->rows; r0 += MAX_ROWS)
                items[n++] = (work_item){(const char *)x->k + h * x->head_stride * elem,
                                         (const char *)x->v + h * x->head_stride * elem, begin, end,
                                         qf + (h * rows + p->first_row + r0) * head_dim,
                                         own_lengths + p->first_row + r0,
                                         p->rows - r0 < MAX_ROWS ? p->rows - r0 : MAX_ROWS,
                                         p->own_partials + ((h * p->own_blocks + b) * p->rows + r0) * (head_dim + 2)};
        }
    return n;
}

/* Every session's rows over the shared segment and then its own, into scratch (plan_sessions'
 * floats): a row's partial result for a block is what rq_attend computes for that block of the
 * joined K/V, and the combine merges them in the same order, so outputs are bit-identical. */
static int attend_sessions(const void *shared_k, const void *shared_v, int64_t shared_head_stride, int64_t n_shared,
                           const rq_session *sessions, int n_sessions, int q_bf16, int form, int out_bf16, int group,
                           int n_kv, int head_dim, float scale, float *scratch, int n_threads) {
    const block_fn block = block_for(head_dim, form);
    const int elem = element_bytes(form);
    const int64_t n_shared_blocks = n_shared / BLOCK;
    session_plan *plans = malloc(sizeof(session_plan) * (size_t)n_sessions);
    if (!plans) return RQ_NO_MEMORY;
    int64_t rows;
    plan_sessions(sessions, n_sessions, n_shared, group, n_kv, head_dim, plans, &rows);
    float *own = scratch + n_kv * n_shared_blocks * rows * (head_dim + 2);
    int64_t n_items = n_kv * n_shared_blocks * ((rows + MAX_ROWS - 1) / MAX_ROWS);
    for (int s = 0; s < n_sessions; ++s) {
        plans[s].own_partials = own;
        own += n_kv * plans[s].own_blocks * plans[s].rows * (head_dim + 2);
        n_items += n_kv * plans[s].own_blocks * ((plans[s].rows + MAX_ROWS - 1) / MAX_ROWS);
    }
    float *qf = malloc(sizeof(float) * (size_t)(n_kv * rows * head_dim));
    int32_t *lengths = malloc(sizeof(int32_t) * (size_t)rows * 2); /* counted over the joined keys, then own */
    int32_t *session_of = malloc(sizeof(int32_t) * (size_t)rows);
    work_item *items = malloc(sizeof(work_item) * (size_t)(n_items > 0 ? n_items : 1));
    if (!qf || !lengths || !session_of || !items) {
        free(plans), free(qf), free(lengths), free(session_of), free(items);
        return RQ_NO_MEMORY;
    }
    int32_t *own_lengths = lengths + rows;
    for (int s = 0; s < n_sessions; ++s) {
        const rq_session *x = &sessions[s];
        for (int64_t r = 0; r < plans[s].rows; ++r) {
            const int64_t at = plans[s].first_row + r;
            session_of[at] = s;
            lengths[at] = (int32_t)(x->first_length + r % x->tokens);
            own_lengths[at] = (int32_t)(lengths[at] - n_shared); /* may be <= 0: no own key */
            for (int64_t h = 0; h < n_kv; ++h) {
                const int64_t from = (r % x->tokens) * x->q_stride + (h * group + r / x->tokens) * head_dim;
                float *to = qf + (h * rows + at) * head_dim;
                for (int d = 0; d < head_dim; ++d) {
                    if (q_bf16) {
                        const uint32_t u = (uint32_t)((const uint16_t *)x->q)[from + d] << 16;
                        memcpy(&to[d], &u, 4);
                    } else {
                        to[d] = ((const float *)x->q)[from + d];
                    }
                }
            }
        }
    }
    if (form == KV_Q8) /* each row once, alone: its 8-bit form does not depend on the call */
        for (int64_t i = 0; i < n_kv * rows; ++i) quantize_query(qf + i * head_dim, head_dim, scale);
    n_items = shared_items(items, shared_k, shared_v, shared_head_stride * elem, n_shared, qf, lengths, rows, n_kv,
                           head_dim, scratch, n_threads);
    for (int s = 0; s < n_sessions; ++s)
        n_items += own_items(items + n_items, &sessions[s], &plans[s], elem, qf, own_lengths, rows, n_kv, head_dim);
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t i = 0; i < n_items; ++i) run_item(&items[i], block, head_dim, scale);
    const int64_t partial = head_dim + 2;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t hr = 0; hr < n_kv * rows; ++hr) {
        const int64_t h = hr / rows, at = hr % rows;
        const rq_session *x = &sessions[session_of[at]];
        const session_plan *p = &plans[session_of[at]];
        const int64_t r = at - p->first_row;
        const partial_run runs[2] = {
            {scratch + (h * n_shared_blocks * rows + at) * partial, n_shared_blocks, rows * partial},
            {p->own_partials + (h * p->own_blocks * p->rows + r) * partial, p->own_blocks, p->rows * partial},
        };
        /* row r is group member r / tokens of K/V head h, at token r % tokens */
        const int64_t to = (r % x->tokens) * x->out_stride + (h * group + r / x->tokens) * head_dim;
        combine_row(runs, head_dim, out_bf16 ? (void *)((uint16_t *)x->out + to) : (void *)((float *)x->out + to),
                    out_bf16);
    }
    free(plans), free(qf), free(lengths), free(session_of), free(items);
    return 0;
}

/* Several sessions' new rows in one call, each over an optional shared segment (a document prefix
 * that every session reads first) and then its own K/V. shared_k, shared_v: n_shared keys per K/V
 * head (a multiple of BLOCK; 0 for none), shared_head_stride elements from one head to the next,
 * keys head_dim apart, like every session's own K/V. Each shared block is read once for every
 * session's rows. q, k, v, out dtypes and scores as in rq_attend; a session's rows may exceed
 * MAX_ROWS. Every row's output is bit-identical to rq_attend's over the session's shared and own
 * K/V joined. Returns 0 or a status code (RQ_BAD_HEADS, RQ_NO_MEMORY, RQ_BAD_SHARED, RQ_BAD_SESSION). */
int rq_attend_batch(const void *shared_k, const void *shared_v, int64_t shared_head_stride, int64_t n_shared,
                    const rq_session *sessions, int n_sessions, int q_bf16, int kv_form, int out_bf16, int group,
                    int n_kv, int head_dim, float scale, int n_threads) {
    const int status = check_shapes(shared_k, shared_v, n_shared, sessions, n_sessions, group, n_kv, head_dim, kv_form);
    if (status != 0) return status;
    session_plan *plans = malloc(sizeof(session_plan) * (size_t)n_sessions);
    if (!plans) return RQ_NO_MEMORY;
    int64_t rows;
    const int64_t floats = plan_sessions(sessions, n_sessions, n_shared, group, n_kv, head_dim, plans, &rows);
    free(plans);
    float *scratch = malloc(sizeof(float) * (size_t)(floats > 0 ? floats : 1));
    if (!scratch) return RQ_NO_MEMORY;
    const int done = attend_sessions(shared_k, shared_v, shared_head_stride, n_shared, sessions, n_sessions, q_bf16,
                                     kv_form, out_bf16, group, n_kv, head_dim, scale, scratch, n_threads);
    free(scratch);
    return done;
}

/* One session over one K/V segment (rq_attend_batch with no shared segment).
 * q: [tokens][n_kv * group][head_dim], bf16 (q_bf16 = 1) or fp32, q_stride elements from one
 * token to the next; scores are q . k * scale. k, v: fp32, bf16 or 8-bit (kv_form KV_F32, KV_BF16,
 * KV_Q8); one head is head_stride elements (bytes for 8-bit) from the next, keys head_dim elements
 * apart (q8_row_bytes(head_dim) bytes for 8-bit). Token i sees first_length + i keys;
 * n_keys >= first_length + tokens - 1 (later keys are masked for every row).
 * scratch: n_kv * ceil(n_keys / BLOCK) * group * tokens * (head_dim + 2) floats. out: [tokens]
 * [n_kv * group * head_dim], out_stride elements from one token to the next, bf16 (out_bf16) or
 * fp32. Returns 0, -1 for a shape it does not take, -2 when out of memory. */
int rq_attend(const void *q, int q_bf16, int64_t q_stride, const void *k, const void *v, int kv_form,
              int64_t head_stride, int first_length, int tokens, int group, int n_kv, int head_dim, int64_t n_keys,
              float scale, float *scratch, void *out, int out_bf16, int64_t out_stride, int n_threads) {
    const rq_session one = {q, q_stride, tokens, first_length, k, v, head_stride, out, out_stride};
    if (n_keys < (int64_t)first_length + tokens - 1) return RQ_BAD_HEADS;
    const int status = check_shapes(0, 0, 0, &one, 1, group, n_kv, head_dim, kv_form);
    if (status != 0) return RQ_BAD_HEADS;
    return attend_sessions(0, 0, 0, 0, &one, 1, q_bf16, kv_form, out_bf16, group, n_kv, head_dim, scale, scratch,
                           n_threads);
}
