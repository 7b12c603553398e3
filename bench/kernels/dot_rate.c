/* How many 512-bit dot-product instructions per second the machine's cores run: vpdpbusd (int8,
 * 64 multiply-adds: the 8-bit KV cache's Q.K) and vdpbf16ps (bf16, 32: bf16 K/V and the 8-bit
 * cache's value sum). Each thread runs 24 independent accumulator chains, enough to cover the
 * instructions' latency, so the rate is the cores' throughput: the floor under attention's time.
 * Built only where both instructions exist (AVX512-VNNI and AVX512-BF16). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define CHAINS 24

static int64_t int8_chains(int64_t steps) {
    __m512i acc[CHAINS];
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_epi32(i);
    __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x02020202);
    for (int64_t n = 0; n < steps; ++n) {
        for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
        __asm__ volatile("" : "+v"(a)); /* keeps the loop from being folded */
    }
    int64_t sum = 0;
    for (int i = 0; i < CHAINS; ++i) sum += _mm512_reduce_add_epi32(acc[i]);
    return sum;
}

static float bf16_chains(int64_t steps) {
    __m512 acc[CHAINS];
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_ps((float)i);
    __m512i a = _mm512_set1_epi32(0x3f803f80), b = _mm512_set1_epi32(0x00010001);
    for (int64_t n = 0; n < steps; ++n) {
        for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
        __asm__ volatile("" : "+v"(a));
    }
    float sum = 0.0f;
    for (int i = 0; i < CHAINS; ++i) sum += _mm512_reduce_add_ps(acc[i]);
    return sum;
}

/* Instructions per second over `threads` threads, each running `steps` rounds of the chains;
 * kind 0: vpdpbusd, 1: vdpbf16ps. sink receives a value of the results so none is optimised out. */
double rq_dot_rate(int kind, int64_t steps, int threads, double *sink) {
    double total = 0.0, kept = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total, kept)
    {
        const double start = omp_get_wtime();
        kept += kind == 0 ? (double)int8_chains(steps) : (double)bf16_chains(steps);
        total += (double)steps * CHAINS / (omp_get_wtime() - start);
    }
    *sink = kept;
    return total;
}
