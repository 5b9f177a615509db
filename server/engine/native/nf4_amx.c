/* NF4 weights against bfloat16 activations on AMX (Intel's tile matrix unit): y = x W^T.
 *
 * On a CPU with AMX-BF16, one TDPBF16PS instruction does 16 x 16 x 32 multiply-adds, eight
 * times what AVX-512 FMAs do in the same cycles. The multiply-adds stop being the cost; what is
 * left is decoding the 4-bit weights, which this does once per call for every token row.
 *
 * The weights come "in panels" (fused.nf4_panels builds them once per layer from bitsandbytes'
 * row-major storage): 16 output rows at a time, and for each pair of input columns (k = 2j,
 * 2j + 1) the 16 rows' packed bytes side by side, so one 16-byte load holds a row of a B tile
 * in AMX's pair-interleaved (VNNI) layout. The scales follow the same order: for each panel and
 * each 64-weight block, the 16 rows' absmax side by side.
 *
 * Each weight is decoded as bitsandbytes' dequantize gives it in bf16: code * absmax in float32,
 * rounded once to bf16 (nearest-even). Sums are float32 (the tile unit's accumulators); a row of
 * y is rounded to bf16 once at the end. A row of y depends only on its own row of x (a NaN in
 * one token stays in that token's outputs) and is summed in the same order whatever the batch.
 *
 * Linux hands a process the AMX register state only when asked (arch_prctl); `nf4_amx_ready`
 * asks once. Where the build or the CPU or the kernel lacks AMX, every call answers -2 and the
 * caller keeps bitsandbytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TOKENS 16 /* rows of an A or C tile */
#define PANEL 16  /* output rows of a B or C tile */
#define KSTEP 32  /* input columns of one TDPBF16PS (16 pairs) */

int nf4_amx_ready(void) {
    static int ready = -1; /* asked once per process; the permission is the process's */
    if (ready < 0) ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ready;
}

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3: C (16 tokens x 16 outputs, float32) for two token blocks x two panels; 4 and 7: A
 * (16 tokens x 32 bf16) for the two token blocks (one register each: reloading one A tile would
 * wait for the multiplies still reading it); 5-6: B (16 input pairs x 16 outputs x 2 bf16) for
 * the two panels. */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* One B tile (1 KiB): input columns k0 .. k0 + 31 of one panel, decoded and scaled, as bf16
 * pairs: row i holds, for each of the panel's 16 outputs, (w[2j], w[2j + 1]) with j = k0/2 + i. */
static void decode_b_tile(bf16 *tile, const uint8_t *panel, const float *scales, int64_t k0, __m512 code) {
    const __m512i low = _mm512_set1_epi32(15);
    /* (even k of lane r, odd k of lane r) adjacent: 16-bit elements 0..15 of the cvtne2ps result
     * are the even weights, 16..31 the odd ones */
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 scale = _mm512_loadu_ps(scales);
    for (int i = 0; i < 16; i++) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(panel + (k0 / 2 + i) * PANEL)));
        __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code), scale);
        __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low), code), scale);
        __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
        _mm512_store_si512((__m512i *)(tile + i * 32), _mm512_permutexvar_epi16(pairs, both));
    }
}

/* Token rows [m0, m0 + 16) of x for one A tile, and their row stride: x itself, or for the last
 * block when M % 16 != 0, `pad` (its rows copied once per call, zeros after: computed, never
 * stored). */
static const bf16 *a_rows(const bf16 *x, int64_t x_stride, int64_t m0, int64_t M, int64_t in, const bf16 *pad,
                          int64_t *stride) {
    if (M - m0 >= TOKENS) {
        *stride = x_stride;
        return x + m0 * x_stride;
    }
    *stride = in;
    return pad;
}

/* The C tile of token block t and panel p, as float32 rows 2 * PANEL wide, rounded to bf16
 * into y's rows (only the token rows and panels that exist). */
static void store_rows(const float *c, bf16 *y, int64_t y_stride, int64_t rows, int64_t np) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t p = 0; p < np; p++) {
            __m256bh v = _mm512_cvtneps_pbh(_mm512_load_ps(c + r * 2 * PANEL + p * PANEL));
            memcpy(y + r * y_stride + p * PANEL, &v, sizeof v);
        }
}

/* y (M, out) bf16 with row stride y_stride = x (M, in) bf16 with row stride x_stride, times the
 * paneled NF4 weight (out, in) transposed. out % 16, in % 32, blocksize % 32 and in % blocksize
 * must be 0 (else -2). Returns 0, -1 when scratch memory could not be had, -2 when not covered.
 *
 * A work item is two panels (32 outputs), run against 32 token rows at a time (four C tiles).
 * Up to 32 rows (decode steps), each 32-column slice of the two panels is decoded into L1 just
 * before its multiplies; past 32 (prefill), the item's slices are all decoded once into a
 * per-thread buffer (2 KiB a slice: 36-96 KiB, L2) and every 32 rows read them from there, so
 * each weight is decoded once per call either way. */
int nf4_amx_linear(bf16 *y, int64_t y_stride, const bf16 *x, int64_t x_stride, int64_t M, const uint8_t *panels,
                   const float *scales, const float *code16, int64_t out, int64_t in, int64_t blocksize, int threads) {
    if (out % PANEL || in % KSTEP || blocksize % KSTEP || in % blocksize || M < 1) return -2;
    if (!nf4_amx_ready()) return -2;
    const int64_t n_panels = out / PANEL, pairs = (n_panels + 1) / 2, chunks = (M + 2 * TOKENS - 1) / (2 * TOKENS);
    const int64_t blocks_per_row = in / blocksize, slices = in / KSTEP;
    if (threads < 1 || pairs < 2) threads = 1;
    bf16 *pad = NULL, *decoded = NULL;
    if (M % TOKENS) {
        pad = aligned_alloc(64, (size_t)TOKENS * in * sizeof(bf16));
        if (!pad) return -1;
        int64_t first = M - M % TOKENS;
        memset(pad, 0, (size_t)TOKENS * in * sizeof(bf16));
        for (int64_t r = first; r < M; r++) memcpy(pad + (r - first) * in, x + r * x_stride, in * sizeof(bf16));
    }
    if (chunks > 1) {
        decoded = aligned_alloc(64, (size_t)threads * slices * 2 * 1024);
        if (!decoded) {
            free(pad);
            return -1;
        }
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        bf16 b[2][16 * 32] __attribute__((aligned(64)));
        float c[TOKENS * 2 * PANEL] __attribute__((aligned(64)));
        bf16 *mine = decoded ? decoded + (size_t)omp_get_thread_num() * slices * 1024 : NULL;
        configure_tiles();
        __m512 code = _mm512_loadu_ps(code16);
#pragma omp for schedule(dynamic, 1)
        for (int64_t pair = 0; pair < pairs; pair++) {
            int64_t p0 = 2 * pair, np = n_panels - p0 < 2 ? n_panels - p0 : 2, p1 = p0 + np - 1; /* one panel: twice */
            const uint8_t *w0 = panels + p0 * (in / 2) * PANEL, *w1 = panels + p1 * (in / 2) * PANEL;
            const float *s0 = scales + p0 * blocks_per_row * PANEL, *s1 = scales + p1 * blocks_per_row * PANEL;
            for (int64_t k = 0; mine && k < slices; k++) {
                decode_b_tile(mine + (2 * k) * 512, w0, s0 + (k * KSTEP / blocksize) * PANEL, k * KSTEP, code);
                decode_b_tile(mine + (2 * k + 1) * 512, w1, s1 + (k * KSTEP / blocksize) * PANEL, k * KSTEP, code);
            }
            for (int64_t m0 = 0; m0 < M; m0 += 2 * TOKENS) {
                int64_t rows0 = M - m0 < TOKENS ? M - m0 : TOKENS, rows1 = M - m0 - rows0;
                rows1 = rows1 < TOKENS ? rows1 : TOKENS;
                int64_t st0, st1 = 0;
                const bf16 *a0 = a_rows(x, x_stride, m0, M, in, pad, &st0);
                const bf16 *a1 = rows1 > 0 ? a_rows(x, x_stride, m0 + TOKENS, M, in, pad, &st1) : NULL;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t k = 0; k < slices; k++) {
                    const bf16 *t0 = mine ? mine + (2 * k) * 512 : b[0], *t1 = mine ? t0 + 512 : b[1];
                    if (!mine) {
                        decode_b_tile(b[0], w0, s0 + (k * KSTEP / blocksize) * PANEL, k * KSTEP, code);
                        decode_b_tile(b[1], w1, s1 + (k * KSTEP / blocksize) * PANEL, k * KSTEP, code);
                    }
                    _tile_loadd(5, t0, 64);
                    _tile_loadd(6, t1, 64);
                    _tile_loadd(4, a0 + k * KSTEP, st0 * sizeof(bf16));
                    _tile_dpbf16ps(0, 4, 5);
                    _tile_dpbf16ps(1, 4, 6);
                    if (a1) {
                        _tile_loadd(7, a1 + k * KSTEP, st1 * sizeof(bf16));
                        _tile_dpbf16ps(2, 7, 5);
                        _tile_dpbf16ps(3, 7, 6);
                    }
                }
                _tile_stored(0, c, 2 * PANEL * sizeof(float));
                _tile_stored(1, c + PANEL, 2 * PANEL * sizeof(float));
                store_rows(c, y + m0 * y_stride + p0 * PANEL, y_stride, rows0, np);
                if (a1) {
                    _tile_stored(2, c, 2 * PANEL * sizeof(float));
                    _tile_stored(3, c + PANEL, 2 * PANEL * sizeof(float));
                    store_rows(c, y + (m0 + TOKENS) * y_stride + p0 * PANEL, y_stride, rows1, np);
                }
            }
        }
        _tile_release();
    }
    free(pad);
    free(decoded);
    return 0;
}

#else

int nf4_amx_ready(void) { return 0; }

int nf4_amx_linear(bf16 *y, int64_t y_stride, const bf16 *x, int64_t x_stride, int64_t M, const uint8_t *panels,
                   const float *scales, const float *code16, int64_t out, int64_t in, int64_t blocksize, int threads) {
    (void)y, (void)y_stride, (void)x, (void)x_stride, (void)M, (void)panels, (void)scales, (void)code16;
    (void)out, (void)in, (void)blocksize, (void)threads;
    return -2;
}

#endif
