/* Fused CPU kernels for the decode step's small ops (see server/engine/fused.py).
 *
 * Each replaces a chain of 3-8 eager PyTorch ops whose per-op dispatch, not arithmetic, is
 * what they cost at decode sizes. The arithmetic follows the eager ops it replaces, roundings
 * included: a bf16 value is rounded to nearest-even wherever the eager chain stores a bf16
 * tensor, and sums are float32. Built with -ffp-contract=off, as PyTorch's vectorized kernels
 * multiply and add without fusing. Every function is single-threaded and reentrant.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf2f(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* round to nearest, ties to even */
    return (bf16)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded); /* NaN as c10 gives it; a select, so loops vectorize */
}

#define LANES 16

/* Sum of acc[0..n) for n a power of two, as a tree (log2 n dependent steps, the wide ones
 * vectorized) rather than a chain of n dependent adds. Overwrites acc. */
static inline float tree_sum(float *acc, int n) {
    for (int w = n / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

/* Sum of squares of n floats with LANES independent partial sums (vectorizes). */
static float sum_squares_f32(const float *x, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += x[i + j] * x[i + j];
    float s = tree_sum(acc, LANES);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

static float sum_squares_bf16(const bf16 *x, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            float v = bf2f(x[i + j]);
            acc[j] += v * v;
        }
    float s = tree_sum(acc, LANES);
    for (; i < n; i++) {
        float v = bf2f(x[i]);
        s += v * v;
    }
    return s;
}

/* For each of `rows` rows of n: if delta, x += delta (in place: the residual stream); then
 * out = rms_norm(x) * weight. Rows are contiguous, row strides given in elements.
 * As F.rms_norm: normalized and weighted in float32, then rounded to the input dtype once. */
void add_rms_norm_f32(float *x, int64_t x_stride, const float *delta, int64_t delta_stride, const float *weight,
                      float *out, int64_t out_stride, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        if (delta) {
            const float *d = delta + r * delta_stride;
            for (int64_t i = 0; i < n; i++) xr[i] = xr[i] + d[i];
        }
        float scale = 1.0f / sqrtf(sum_squares_f32(xr, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) o[i] = (xr[i] * scale) * weight[i];
    }
}

void add_rms_norm_bf16(bf16 *x, int64_t x_stride, const bf16 *delta, int64_t delta_stride, const bf16 *weight,
                       bf16 *out, int64_t out_stride, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        bf16 *xr = x + r * x_stride;
        bf16 *o = out + r * out_stride;
        if (delta) {
            const bf16 *d = delta + r * delta_stride;
            for (int64_t i = 0; i < n; i++) xr[i] = f2bf(bf2f(xr[i]) + bf2f(d[i]));
        }
        float scale = 1.0f / sqrtf(sum_squares_bf16(xr, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) o[i] = f2bf((bf2f(xr[i]) * scale) * bf2f(weight[i]));
    }
}

/* Rotary embedding in place on x (tokens, heads, dim) with the last dim contiguous:
 * x = x * cos + roll(x, dim/2) * sin_signed, cos/sin (tokens, dim) contiguous. */
void rope_f32(float *x, int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride, int64_t head_stride,
              const float *cos, const float *sin) {
    float tmp[1024];
    int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * token_stride + h * head_stride;
            memcpy(tmp, v, (size_t)dim * sizeof(float));
            for (int64_t i = 0; i < half; i++) v[i] = tmp[i] * c[i] + tmp[i + half] * s[i];
            for (int64_t i = half; i < dim; i++) v[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
    }
}

void rope_bf16(bf16 *x, int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride, int64_t head_stride,
               const bf16 *cos, const bf16 *sin) {
    float tmp[1024];
    int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const bf16 *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            bf16 *v = x + t * token_stride + h * head_stride;
            for (int64_t i = 0; i < dim; i++) tmp[i] = bf2f(v[i]);
            /* x * cos is a bf16 tensor, then addcmul rounds once */
            for (int64_t i = 0; i < half; i++)
                v[i] = f2bf(bf2f(f2bf(tmp[i] * bf2f(c[i]))) + tmp[i + half] * bf2f(s[i]));
            for (int64_t i = half; i < dim; i++)
                v[i] = f2bf(bf2f(f2bf(tmp[i] * bf2f(c[i]))) + tmp[i - half] * bf2f(s[i]));
        }
    }
}

/* For each row of a float32 (rows, n) matrix: the index of its first maximum, and whether
 * every value is finite (one pass for the max and the check, one for the index). */
void argmax_finite_f32(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *index, uint8_t *finite) {
    for (int64_t r = 0; r < rows; r++) {
        const float *v = x + r * stride;
        float m[LANES], z[LANES];
        for (int j = 0; j < LANES; j++) {
            m[j] = -INFINITY;
            z[j] = 0.0f;
        }
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float a = v[i + j];
                m[j] = a > m[j] ? a : m[j];
                z[j] += a * 0.0f; /* NaN for an inf or a NaN */
            }
        float best = -INFINITY, bad = 0.0f;
        for (int j = 0; j < LANES; j++) {
            best = m[j] > best ? m[j] : best;
            bad += z[j];
        }
        for (; i < n; i++) {
            best = v[i] > best ? v[i] : best;
            bad += v[i] * 0.0f;
        }
        finite[r] = bad == 0.0f;
        int64_t at = 0;
        for (int64_t k = 0; k < n; k++)
            if (v[k] == best) {
                at = k;
                break;
            }
        index[r] = at;
    }
}

/* ---- multi-LoRA: y[t] += B_s (A_s x[t]) for each token t of each slot s (a segmented GEMV,
 * the job of punica's / S-LoRA's SGMV kernels). Tokens arrive grouped by slot as segments of
 * `rows`; each (segment, part, chunk of LORA_CHUNK tokens) is one work item that reads its
 * slot's A and B once for all its tokens and writes only its own rows and part columns.
 * A (slots, parts, R, in) and Bt (slots, parts, R, out_part) are float32 or bf16 (w_bf16), ranks past
 * slot_rank[s] are skipped. The update is summed in float32 and added to y with one rounding
 * (y's dtype), as `y.add_(delta)` with a float32 delta does. */
#include <stdlib.h>

#define LORA_CHUNK 8 /* tokens per work item: two items per part already at batch 16 */

/* The LoRA update may use fused multiply-adds: the eager path it replaces is BLAS, which does. */
#pragma GCC optimize("fp-contract=fast")

/* GCC vector extensions: 16 floats, one AVX-512 register (two AVX2 ones, four SSE ones). Locals of
 * this type stay in registers, which the hot loops below need. */
typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum16(v16 v) {
    float a[16];
    memcpy(a, &v, sizeof a);
    return tree_sum(a, 16);
}

typedef int32_t v16i __attribute__((vector_size(64)));

/* Sixteen horizontal sums at once: lane j of the result is the sum of the lanes of p[rev4(j)]
 * (rev4 reverses 4 bits), so a caller that stores key k's partial products in p[rev4(k)] gets
 * key k's dot product in lane k. Four halving steps of two shuffles and an add each, instead of
 * sixteen separate horizontal sums. Overwrites p. */
static const int REV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline v16 sum16x16(v16 *p) {
    const v16i u8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const v16i v8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const v16i u4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const v16i v4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    const v16i u2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const v16i v2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const v16i u1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const v16i v1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    for (int i = 0; i < 8; i++) p[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], u8) + __builtin_shuffle(p[2 * i], p[2 * i + 1], v8);
    for (int i = 0; i < 4; i++) p[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], u4) + __builtin_shuffle(p[2 * i], p[2 * i + 1], v4);
    for (int i = 0; i < 2; i++) p[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], u2) + __builtin_shuffle(p[2 * i], p[2 * i + 1], v2);
    return __builtin_shuffle(p[0], p[1], u1) + __builtin_shuffle(p[0], p[1], v1);
}

/* Four independent accumulators: the adds of one wait on each other (no FMA, see above). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 += load16(a + i) * load16(b + i);
        s1 += load16(a + i + 16) * load16(b + i + 16);
        s2 += load16(a + i + 32) * load16(b + i + 32);
        s3 += load16(a + i + 48) * load16(b + i + 48);
    }
    v16 t = (s0 + s1) + (s2 + s3);
    for (; i + 16 <= n; i += 16) t += load16(a + i) * load16(b + i);
    float s = hsum16(t);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[0..64) = sum over r < rank of h[r] * b[r * stride + 0..64): summed in registers over
 * every rank, stored once. */
static inline void expand64(float *out, const float *h, const float *b, int64_t stride, int64_t rank) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t r = 0; r < rank; r++) {
        const float *br = b + r * stride;
        float hr = h[r];
        a0 += hr * load16(br);
        a1 += hr * load16(br + 16);
        a2 += hr * load16(br + 32);
        a3 += hr * load16(br + 48);
    }
    memcpy(out, &a0, 64);
    memcpy(out + 16, &a1, 64);
    memcpy(out + 32, &a2, 64);
    memcpy(out + 48, &a3, 64);
}

/* expand64 for two tokens at once: eight independent accumulators keep both FMA ports busy
 * (four chains wait on the FMA latency), and each B load serves two tokens. */
static inline void expand64x2(float *out0, float *out1, const float *h0, const float *h1, const float *b,
                              int64_t stride, int64_t rank) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
    for (int64_t r = 0; r < rank; r++) {
        const float *br = b + r * stride;
        v16 b0 = load16(br), b1 = load16(br + 16), b2 = load16(br + 32), b3 = load16(br + 48);
        float p = h0[r], q = h1[r];
        a0 += p * b0;
        a1 += p * b1;
        a2 += p * b2;
        a3 += p * b3;
        c0 += q * b0;
        c1 += q * b1;
        c2 += q * b2;
        c3 += q * b3;
    }
    memcpy(out0, &a0, 64);
    memcpy(out0 + 16, &a1, 64);
    memcpy(out0 + 32, &a2, 64);
    memcpy(out0 + 48, &a3, 64);
    memcpy(out1, &c0, 64);
    memcpy(out1 + 16, &c1, 64);
    memcpy(out1 + 32, &c2, 64);
    memcpy(out1 + 48, &c3, 64);
}

/* One float32 weight row a against x0 and, when x1 is not NULL, x1: 16-lane partial products
 * (*p, *q; their lane sums are the dot products, the tail past whole vectors added to lane 0),
 * each load of a serving both. The caller sums 16 rows' partials at once (sum16x16). */
static inline void dotv_f32(const float *a, const float *x0, const float *x1, int64_t n, v16 *p, v16 *q) {
    v16 p0 = {0}, p1 = {0}, q0 = {0}, q1 = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        v16 a0 = load16(a + i), a1 = load16(a + i + 16);
        p0 += a0 * load16(x0 + i);
        p1 += a1 * load16(x0 + i + 16);
        if (x1) {
            q0 += a0 * load16(x1 + i);
            q1 += a1 * load16(x1 + i + 16);
        }
    }
    for (; i + 16 <= n; i += 16) {
        v16 ai = load16(a + i);
        p0 += ai * load16(x0 + i);
        if (x1) q0 += ai * load16(x1 + i);
    }
    for (; i < n; i++) {
        p0[0] += a[i] * x0[i];
        if (x1) q0[0] += a[i] * x1[i];
    }
    *p = p0 + p1;
    if (x1) *q = q0 + q1;
}

/* bf16 weights (the slots of a bf16 model) stream half the bytes of float32 ones. They are
 * widened in registers, exactly (a bf16 is the top half of a float32), 32 at a time: one
 * 64-byte load read as 16 uint32 lanes holds weights (2j, 2j+1) in lane j, so `lane << 16` is the
 * even weights and `lane & 0xffff0000` the odd ones, as floats: two operations for 32 weights.
 * The math then runs on even / odd halves: the shrink reads x split the same way
 * (`split_row`), the expand re-interleaves its sums once per 64 columns. */
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

static inline void widen32(const bf16 *p, v16 *even, v16 *odd) {
    u32x16 u;
    memcpy(&u, p, sizeof u);
    u32x16 e = u << 16, o = u & 0xffff0000u;
    memcpy(even, &e, sizeof e);
    memcpy(odd, &o, sizeof o);
}

/* dst = src (floats) with each whole block of 32 stored as its 16 even then its 16 odd values;
 * the tail past the last whole block stays in order. */
static void split_row(float *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 16; j++) {
            dst[i + j] = src[i + 2 * j];
            dst[i + 16 + j] = src[i + 2 * j + 1];
        }
    for (; i < n; i++) dst[i] = src[i];
}

/* dotv_f32 for a bf16 weight row, against x0 / x1 laid out by split_row. */
static inline void dotv_bf16(const bf16 *a, const float *x0, const float *x1, int64_t n, v16 *p, v16 *q) {
    v16 p0 = {0}, p1 = {0}, q0 = {0}, q1 = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        v16 e, o;
        widen32(a + i, &e, &o);
        p0 += e * load16(x0 + i);
        p1 += o * load16(x0 + i + 16);
        if (x1) {
            q0 += e * load16(x1 + i);
            q1 += o * load16(x1 + i + 16);
        }
    }
    for (; i < n; i++) {
        float ai = bf2f(a[i]);
        p0[0] += ai * x0[i];
        if (x1) q0[0] += ai * x1[i];
    }
    *p = p0 + p1;
    if (x1) *q = q0 + q1;
}

/* expand64 / expand64x2 for bf16 weights (h1, out1 NULL for one token): sums kept as even / odd
 * columns, interleaved back once at the end. */
static inline void expand64_bf16(float *out0, float *out1, const float *h0, const float *h1, const bf16 *b,
                                 int64_t stride, int64_t rank) {
    v16 e0 = {0}, o0 = {0}, e1 = {0}, o1 = {0}, f0 = {0}, p0 = {0}, f1 = {0}, p1 = {0};
    for (int64_t r = 0; r < rank; r++) {
        v16 be0, bo0, be1, bo1;
        widen32(b + r * stride, &be0, &bo0);
        widen32(b + r * stride + 32, &be1, &bo1);
        float p = h0[r];
        e0 += p * be0;
        o0 += p * bo0;
        e1 += p * be1;
        o1 += p * bo1;
        if (h1) {
            float q = h1[r];
            f0 += q * be0;
            p0 += q * bo0;
            f1 += q * be1;
            p1 += q * bo1;
        }
    }
    const i32x16 lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const i32x16 hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    v16 out[4] = {__builtin_shuffle(e0, o0, lo), __builtin_shuffle(e0, o0, hi), __builtin_shuffle(e1, o1, lo),
                  __builtin_shuffle(e1, o1, hi)};
    memcpy(out0, out, sizeof out);
    if (h1) {
        v16 out_1[4] = {__builtin_shuffle(f0, p0, lo), __builtin_shuffle(f0, p0, hi), __builtin_shuffle(f1, p1, lo),
                        __builtin_shuffle(f1, p1, hi)};
        memcpy(out1, out_1, sizeof out_1);
    }
}

/* Row helpers for a y / x of either dtype (is_bf16 picks; the branch is per row, not per value). */
static void load_row(float *dst, const void *src, int64_t n, int is_bf16) {
    if (is_bf16) {
        const bf16 *s = src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf2f(s[i]);
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    }
}

static void add_to_row(void *dst, const float *delta, int64_t n, int is_bf16) {
    if (is_bf16) {
        bf16 *d = dst;
        for (int64_t i = 0; i < n; i++) d[i] = f2bf(bf2f(d[i]) + delta[i]);
    } else {
        float *d = dst;
        for (int64_t i = 0; i < n; i++) d[i] = d[i] + delta[i];
    }
}

typedef struct {
    int64_t slot, part, first, count; /* tokens rows[first : first + count] of one slot, one part */
    float *h;                         /* their shrunk rows: count x R */
} lora_item;

/* Phase 1 of a work item: h = A x for its tokens (x rows read once, converted to float).
 * Sixteen rank rows at a time, two tokens at a time: each row of A is read once per token pair
 * and the 16 x 2 dot products are summed by two sum16x16 calls. `xf` is scratch for
 * LORA_CHUNK + 1 rows of x; `part` for 32 vectors. */
static void lora_shrink(const lora_item *it, const char *x, int64_t x_stride, size_t elem, int is_bf16,
                        const void *A, int w_bf16, int64_t rank, const int64_t *rows, int64_t parts, int64_t R,
                        int64_t in, float *xf, v16 *part) {
    int64_t first_row = (it->slot * parts + it->part) * R;
    for (int64_t m = 0; m < it->count; m++) {
        float *row = xf + m * in;
        load_row(row, x + (size_t)(rows[it->first + m] * x_stride) * elem, in, is_bf16);
        if (w_bf16) {
            split_row(xf + LORA_CHUNK * in, row, in);
            memcpy(row, xf + LORA_CHUNK * in, sizeof(float) * (size_t)in);
        }
    }
    v16 *p = part, *q = part + 16;
    for (int64_t r0 = 0; r0 < rank; r0 += 16) {
        int64_t rows_here = rank - r0 < 16 ? rank - r0 : 16;
        for (int64_t m = 0; m < it->count; m += 2) {
            const float *x1 = m + 1 < it->count ? xf + (m + 1) * in : NULL;
            for (int64_t k = 0; k < 16; k++) {
                int at = REV4[k];
                if (k >= rows_here) {
                    p[at] = q[at] = (v16){0};
                } else if (w_bf16) {
                    dotv_bf16((const bf16 *)A + (first_row + r0 + k) * in, xf + m * in, x1, in, &p[at], &q[at]);
                } else {
                    dotv_f32((const float *)A + (first_row + r0 + k) * in, xf + m * in, x1, in, &p[at], &q[at]);
                }
                if (!x1) q[at] = (v16){0};
            }
            v16 hp = sum16x16(p);
            memcpy(it->h + m * R + r0, &hp, sizeof(float) * (size_t)rows_here);
            if (x1) {
                v16 hq = sum16x16(q);
                memcpy(it->h + (m + 1) * R + r0, &hq, sizeof(float) * (size_t)rows_here);
            }
        }
    }
}

/* Phase 2, for output columns [c0, c1) of the item's part: y += B h, one rounding per value.
 * Column blocks outer, tokens inner: a block of B (rank x 64 weights) stays in L1 for every token
 * instead of all of B streaming from L2 once per token. */
static void lora_expand(const lora_item *it, char *y, int64_t y_stride, size_t elem, int is_bf16, const void *Bt,
                        int w_bf16, int64_t rank, const int64_t *rows, int64_t parts, int64_t R, int64_t out_part,
                        int64_t c0, int64_t c1) {
    int64_t first = (it->slot * parts + it->part) * R * out_part;
    const float *bf = (const float *)Bt + first;
    const bf16 *bh = (const bf16 *)Bt + first;
    float acc[64], acc1[64];
    for (int64_t o = c0; o < c1; o += 64) {
        int64_t width = c1 - o < 64 ? c1 - o : 64;
        int64_t m = 0;
        if (width == 64)
            for (; m + 2 <= it->count; m += 2) { /* two tokens at a time, then the odd one below */
                const float *h0 = it->h + m * R, *h1 = h0 + R;
                if (w_bf16)
                    expand64_bf16(acc, acc1, h0, h1, bh + o, out_part, rank);
                else
                    expand64x2(acc, acc1, h0, h1, bf + o, out_part, rank);
                size_t at0 = (size_t)(rows[it->first + m] * y_stride + it->part * out_part + o);
                size_t at1 = (size_t)(rows[it->first + m + 1] * y_stride + it->part * out_part + o);
                add_to_row(y + at0 * elem, acc, 64, is_bf16);
                add_to_row(y + at1 * elem, acc1, 64, is_bf16);
            }
        for (; m < it->count; m++) {
            const float *hm = it->h + m * R;
            if (width == 64 && w_bf16) {
                expand64_bf16(acc, NULL, hm, NULL, bh + o, out_part, rank);
            } else if (width == 64) {
                expand64(acc, hm, bf + o, out_part, rank);
            } else {
                for (int64_t j = 0; j < width; j++) {
                    float sum = 0.0f;
                    for (int64_t r = 0; r < rank; r++)
                        sum += hm[r] * (w_bf16 ? bf2f(bh[r * out_part + o + j]) : bf[r * out_part + o + j]);
                    acc[j] = sum;
                }
            }
            size_t at = (size_t)(rows[it->first + m] * y_stride + it->part * out_part + o);
            add_to_row(y + at * elem, acc, width, is_bf16);
        }
    }
}

/* Below this many multiply-adds a call runs on one thread: waking a second one costs more. (At
 * batch 16 over 8 adapters every projection is above it: 2^16, 2^18 and 2^20 measured 9.6,
 * 9.7 and 11.2 ms for 150 projections, interleaved in one process.) */
#define LORA_PARALLEL_MACS (1 << 18)

/* One layer's slot tensors (fused.LoraWeights builds it once per allocation). */
typedef struct {
    const void *A, *Bt;          /* (slots, parts, R, in) and (slots, parts, R, out_part) */
    int64_t w_bf16;              /* 1: both bf16; 0: both float32 */
    const int64_t *slot_rank;    /* (slots,): ranks past it are zero */
    int64_t parts, R, in, out_part;
} lora_weights;

/* A step's adapter tokens grouped by slot (fused.LoraSegments builds it once per step): tokens
 * rows[start[g] : start[g] + count[g]] use slot slot[g]. */
typedef struct {
    const int64_t *slot, *start, *count;
    int64_t segments;
    const int64_t *rows;
} lora_segments;

/* y (T, parts * out_part) and x (T, in) share one dtype (float32, or bf16 when is_bf16).
 * Two structs rather than twenty arguments: ctypes converts every argument on every call, and
 * this runs once per projection per step. Returns 0, or -1 when scratch memory could not be had
 * (y is then untouched). */
int lora_sgmv(void *y, int64_t y_stride, const void *x, int64_t x_stride, int is_bf16, const lora_weights *lw,
              const lora_segments *ls, int threads) {
    const void *A = lw->A, *Bt = lw->Bt;
    const int w_bf16 = (int)lw->w_bf16;
    const int64_t *slot_rank = lw->slot_rank, parts = lw->parts, R = lw->R, in = lw->in, out_part = lw->out_part;
    const int64_t *seg_slot = ls->slot, *seg_start = ls->start, *seg_count = ls->count, *rows = ls->rows;
    const int64_t segments = ls->segments;
    int64_t n_items = 0, n_tokens = 0;
    for (int64_t g = 0; g < segments; g++)
        if (slot_rank[seg_slot[g]] > 0) {
            n_items += parts * ((seg_count[g] + LORA_CHUNK - 1) / LORA_CHUNK);
            n_tokens += seg_count[g];
        }
    if (n_items == 0) return 0;
    lora_item *items = malloc(sizeof(lora_item) * (size_t)n_items);
    float *h = malloc(sizeof(float) * (size_t)(n_tokens * parts * R));
    if (!items || !h) {
        free(items);
        free(h);
        return -1;
    }
    int64_t k = 0;
    float *next_h = h;
    for (int64_t g = 0; g < segments; g++) {
        if (slot_rank[seg_slot[g]] <= 0) continue;
        for (int64_t c = 0; c < seg_count[g]; c += LORA_CHUNK)
            for (int64_t p = 0; p < parts; p++) {
                int64_t left = seg_count[g] - c, count = left < LORA_CHUNK ? left : LORA_CHUNK;
                items[k++] = (lora_item){seg_slot[g], p, seg_start[g] + c, count, next_h};
                next_h += count * R;
            }
    }
    size_t elem = is_bf16 ? sizeof(bf16) : sizeof(float);
    int64_t macs = n_tokens * parts * R * (in + out_part);
    if (macs < LORA_PARALLEL_MACS) threads = 1;
    /* expand tasks: each item's columns in about 2 * threads slices of whole 64-column blocks */
    int64_t columns = (out_part + 2 * threads - 1) / (2 * threads);
    columns = (columns + 63) / 64 * 64;
    int64_t blocks = (out_part + columns - 1) / columns;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *xf = malloc(sizeof(float) * (size_t)((LORA_CHUNK + 1) * in));
        v16 *part = aligned_alloc(64, sizeof(v16) * 32);
        if (!xf || !part) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t w = 0; w < n_items; w++)
                lora_shrink(&items[w], x, x_stride, elem, is_bf16, A, w_bf16, slot_rank[items[w].slot], rows, parts, R,
                            in, xf, part);
#pragma omp for schedule(dynamic, 1)
            for (int64_t w = 0; w < n_items * blocks; w++) {
                const lora_item *it = &items[w / blocks];
                int64_t c0 = (w % blocks) * columns, c1 = c0 + columns;
                lora_expand(it, y, y_stride, elem, is_bf16, Bt, w_bf16, slot_rank[it->slot], rows, parts, R, out_part,
                            c0, c1 < out_part ? c1 : out_part);
            }
        }
        free(xf);
        free(part);
    }
    free(items);
    free(h);
    return failed ? -1 : 0;
}

/* ---- decode attention straight from the paged KV cache: each sequence's one query against its
 * keys, read block by block through its block table (no gathered copy of the keys). */

/* exp(x) for x <= 0 (softmax after subtracting the row max; the sigmoid's tail), 16 lanes at a
 * time, as 2^n * 2^f with t = x log2 e = n + f, n = trunc(t - 0.5) (so f is in [-0.5, 0.5]
 * for t <= 0), 2^f by Cephes' exp2f polynomial (relative error ~1e-7), 2^n built in the
 * exponent bits. Written on vectors with masks rather than branches, so it always vectorizes;
 * inputs below about -88 give 0. */

static inline v16 exp_nonpositive16(v16 x) {
    const v16 low = {-127.0f, -127.0f, -127.0f, -127.0f, -127.0f, -127.0f, -127.0f, -127.0f,
                     -127.0f, -127.0f, -127.0f, -127.0f, -127.0f, -127.0f, -127.0f, -127.0f};
    v16 t = x * 1.44269504088896341f;
    v16i under = t < low;                                  /* -1 where t < -127 */
    t = (v16)(((v16i)t & ~under) | ((v16i)low & under));  /* clamp: 2^-127 rounds to 0 below */
    v16i n = __builtin_convertvector(t - 0.5f, v16i);      /* toward zero */
    v16 f = t - __builtin_convertvector(n, v16);
    v16 p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    v16i bits = (n + 127) << 23; /* n >= -127: exponent field 0 .. 127 */
    return (p * f + 1.0f) * (v16)bits;
}

/* exp_nonpositive16 over x[0..n) in place (the tail padded through a scratch vector). */
static void exp_nonpositive_inplace(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16 v = exp_nonpositive16(load16(x + i));
        memcpy(x + i, &v, sizeof v);
    }
    if (i < n) {
        float tail[16] = {0};
        memcpy(tail, x + i, sizeof(float) * (size_t)(n - i));
        v16 v = exp_nonpositive16(load16(tail));
        memcpy(x + i, &v, sizeof(float) * (size_t)(n - i));
    }
}

/* softmax of s[0..n) in place, in float32: max, exp(s - max), sum, scale. The max and the sum
 * run on 16 lanes (a scalar max or sum is a chain of dependent operations, one per key). */
static void softmax_inplace(float *s, int64_t n) {
    v16 m16 = load16(s);
    int64_t i = 16;
    if (n < 16) {
        m16 = (v16){0} - INFINITY;
        i = 0;
    }
    for (; i + 16 <= n; i += 16) {
        v16 x = load16(s + i);
        v16i more = x > m16;
        m16 = (v16)(((v16i)x & more) | ((v16i)m16 & ~more));
    }
    float m16s[16], m = -INFINITY;
    memcpy(m16s, &m16, sizeof m16s);
    for (int j = 0; j < 16; j++) m = m16s[j] > m ? m16s[j] : m;
    for (; i < n; i++) m = s[i] > m ? s[i] : m;
    for (i = 0; i < n; i++) s[i] -= m;
    exp_nonpositive_inplace(s, n);
    v16 t16 = {0};
    for (i = 0; i + 16 <= n; i += 16) t16 += load16(s + i);
    float total = hsum16(t16);
    for (; i < n; i++) total += s[i];
    float inv = 1.0f / total;
    for (i = 0; i < n; i++) s[i] *= inv;
}

/* 16 float32 values from a row of either dtype (a bf16 value is the top half of a float32). */
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline v16 load16_any(const char *row, int64_t i, int is_bf16) {
    if (!is_bf16) return load16((const float *)row + i);
    u16x16 h;
    memcpy(&h, (const bf16 *)row + i, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    v16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One (sequence, kv head) of decode attention when D is a multiple of 16 (all real models):
 * scores for 16 keys at a time (each key row read once for the whole query group, summed by
 * sum16x16), then the V rows weighted 16 columns at a time with the group's sums in registers.
 * qf: the group's queries (group x D floats); scores: group x padded_len; part: group x 16
 * vectors of scratch. */
static void attend_one(const float *qf, const char *k_cache, const char *v_cache, const int64_t *table,
                       int64_t len, int64_t block_size, int64_t KV, int64_t kvh, int64_t D, int64_t group,
                       int is_bf16, size_t elem, float scale, float *scores, int64_t padded_len, v16 *part,
                       float *acc, size_t *row_at) {
    /* each key's row offset in bytes, walked block by block: no division per key (an integer
     * division costs more than the key's arithmetic) */
    for (int64_t l = 0, blk = 0; l < len; blk++)
        for (int64_t i = 0; i < block_size && l < len; i++, l++)
            row_at[l] = (size_t)(((table[blk] * block_size + i) * KV + kvh) * D) * elem;
    for (int64_t l0 = 0; l0 < len; l0 += 16) {
        int64_t n = len - l0 < 16 ? len - l0 : 16;
        for (int64_t k = 0; k < 16; k++) {
            v16 *slot = part + REV4[k];
            if (k >= n) {
                for (int64_t g = 0; g < group; g++) slot[g * 16] = (v16){0};
                continue;
            }
            const char *row = k_cache + row_at[l0 + k];
            /* four query heads at a time, their sums in registers (not a chain through memory) */
            for (int64_t g0 = 0; g0 < group; g0 += 4) {
                int64_t count = group - g0 < 4 ? group - g0 : 4;
                const float *q0 = qf + g0 * D;
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t c = 0; c < D; c += 16) {
                    v16 kc = load16_any(row, c, is_bf16);
                    a0 += load16(q0 + c) * kc;
                    if (count > 1) a1 += load16(q0 + D + c) * kc;
                    if (count > 2) a2 += load16(q0 + 2 * D + c) * kc;
                    if (count > 3) a3 += load16(q0 + 3 * D + c) * kc;
                }
                slot[g0 * 16] = a0;
                if (count > 1) slot[(g0 + 1) * 16] = a1;
                if (count > 2) slot[(g0 + 2) * 16] = a2;
                if (count > 3) slot[(g0 + 3) * 16] = a3;
            }
        }
        for (int64_t g = 0; g < group; g++) {
            v16 sums = sum16x16(part + g * 16) * scale;
            memcpy(scores + g * padded_len + l0, &sums, sizeof sums);
        }
    }
    for (int64_t g = 0; g < group; g++) softmax_inplace(scores + g * padded_len, len);
    for (int64_t c = 0; c < D; c += 16)
        for (int64_t g0 = 0; g0 < group; g0 += 4) { /* four heads' sums in registers */
            int64_t count = group - g0 < 4 ? group - g0 : 4;
            const float *s0 = scores + g0 * padded_len;
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t l = 0; l < len; l++) {
                v16 vc = load16_any(v_cache + row_at[l], c, is_bf16);
                a0 += s0[l] * vc;
                if (count > 1) a1 += s0[padded_len + l] * vc;
                if (count > 2) a2 += s0[2 * padded_len + l] * vc;
                if (count > 3) a3 += s0[3 * padded_len + l] * vc;
            }
            memcpy(acc + g0 * D + c, &a0, sizeof a0);
            if (count > 1) memcpy(acc + (g0 + 1) * D + c, &a1, sizeof a1);
            if (count > 2) memcpy(acc + (g0 + 2) * D + c, &a2, sizeof a2);
            if (count > 3) memcpy(acc + (g0 + 3) * D + c, &a3, sizeof a3);
        }
}

/* q, out (B, H, D); caches (blocks * block_size, KV, D); block_table (B, max_blocks);
 * lengths (B,) keys per sequence (>= 1). Scores and softmax in float32, out rounded once. */
int decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out, int is_bf16,
                     const int64_t *block_table, int64_t max_blocks, const int64_t *lengths, int64_t B, int64_t H,
                     int64_t KV, int64_t D, int64_t block_size, float scale, int threads) {
    int64_t group = H / KV, max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = lengths[b] > max_len ? lengths[b] : max_len;
    size_t elem = is_bf16 ? sizeof(bf16) : sizeof(float);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (B * KV > 1 && threads > 1)
    {
        float *qf = malloc(sizeof(float) * (size_t)(group * D));
        float *row = malloc(sizeof(float) * (size_t)D);
        float *acc = malloc(sizeof(float) * (size_t)(group * D));
        int64_t padded_len = (max_len + 15) / 16 * 16;
        float *scores = malloc(sizeof(float) * (size_t)(group * padded_len));
        v16 *part = aligned_alloc(64, sizeof(v16) * (size_t)(group * 16));
        size_t *row_at = malloc(sizeof(size_t) * (size_t)padded_len);
        if (!qf || !row || !acc || !scores || !part || !row_at) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t w = 0; w < B * KV; w++) {
                int64_t b = w / KV, kvh = w % KV, len = lengths[b];
                const int64_t *table = block_table + b * max_blocks;
                for (int64_t g = 0; g < group; g++)
                    load_row(qf + g * D, (const char *)q + (size_t)((b * H + kvh * group + g) * D) * elem, D, is_bf16);
                if (D % 16 == 0) {
                    attend_one(qf, k_cache, v_cache, table, len, block_size, KV, kvh, D, group, is_bf16, elem, scale,
                               scores, padded_len, part, acc, row_at);
                    goto store;
                }
                for (int64_t l = 0; l < len; l++) {
                    size_t at = (size_t)(((table[l / block_size] * block_size + l % block_size) * KV + kvh) * D);
                    load_row(row, (const char *)k_cache + at * elem, D, is_bf16);
                    for (int64_t g = 0; g < group; g++) scores[g * padded_len + l] = dot_f32(qf + g * D, row, D) * scale;
                }
                for (int64_t g = 0; g < group; g++) softmax_inplace(scores + g * padded_len, len);
                memset(acc, 0, sizeof(float) * (size_t)(group * D));
                for (int64_t l = 0; l < len; l++) {
                    size_t at = (size_t)(((table[l / block_size] * block_size + l % block_size) * KV + kvh) * D);
                    load_row(row, (const char *)v_cache + at * elem, D, is_bf16);
                    for (int64_t g = 0; g < group; g++) {
                        float p = scores[g * padded_len + l];
                        float *a = acc + g * D;
                        for (int64_t i = 0; i < D; i++) a[i] += p * row[i];
                    }
                }
            store:
                for (int64_t g = 0; g < group; g++) {
                    char *o = (char *)out + (size_t)((b * H + kvh * group + g) * D) * elem;
                    if (is_bf16) {
                        bf16 *ob = (bf16 *)o;
                        for (int64_t i = 0; i < D; i++) ob[i] = f2bf(acc[g * D + i]);
                    } else {
                        memcpy(o, acc + g * D, sizeof(float) * (size_t)D);
                    }
                }
            }
        }
        free(qf);
        free(row);
        free(acc);
        free(scores);
        free(part);
        free(row_at);
    }
    return failed ? -1 : 0;
}

/* ---- NF4 projections (bitsandbytes' storage: element 2j of the flattened (out, in) weight in
 * the high nibble of byte j, 2j + 1 in the low one; one float32 absmax per `blocksize` elements;
 * a weight is code[nibble] * absmax). At decode sizes bitsandbytes' CPU kernel (bf16 inputs, a
 * bf16 output) spends most of its time decoding. Here four output rows at a time are decoded
 * once into an L1 buffer, in float32 (exactly code * absmax, as bitsandbytes' dequantize), 32
 * weights per 16 bytes: the high nibbles are the even weights, the low ones the odd, one shift
 * or mask and one 16-entry table permute each. Every token row then runs against the four rows,
 * sixteen dot products summed by one sum16x16; x is read in split_row's even / odd order to
 * match. AVX-512 only (the byte widening and the permute are single instructions there), and
 * blocks must not cross a row (in % blocksize == 0, blocksize % 32 == 0): otherwise -2, and the
 * caller keeps bitsandbytes. */
#ifdef __AVX512F__
#include <immintrin.h>

static void nf4_decode_row(float *dst, const uint8_t *w, const float *absmax, int64_t in, int64_t blocksize,
                           __m512 code) {
    const __m512i low = _mm512_set1_epi32(15);
    for (int64_t b = 0; b < in; b += blocksize) {
        __m512 scale = _mm512_set1_ps(absmax[b / blocksize]);
        for (int64_t c = b; c < b + blocksize; c += 32) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + c / 2)));
            __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code);
            __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(v, low), code);
            _mm512_storeu_ps(dst + c, _mm512_mul_ps(even, scale));
            _mm512_storeu_ps(dst + c + 16, _mm512_mul_ps(odd, scale));
        }
    }
}

/* Ask for the cache line at k of rows[0..n) (weights the next tile reads, while this one computes). */
static inline void prefetch_rows(const float *const *rows, int n, int64_t k) {
    for (int r = 0; r < n; r++) __builtin_prefetch(rows[r] + k, 0, 3);
}

/* Four weight rows w[0..3] against four token rows x[0..3], each `in` floats: s[4m + r] is row r
 * against token m. Every sum runs over k in the same 16 lanes and is reduced by the same tree
 * (sum16x16 here, hsum16 in tile4x1: the same pairing), so a result does not depend on which
 * tile, or which batch, computed it. */
static void tile4x4(const float *const *w, int64_t in, const float *const *x, float *s, v16 *part,
                    const float *const *next, int n_next) {
    const float *b0 = w[0], *b1 = w[1], *b2 = w[2], *b3 = w[3];
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    v16 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
    v16 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
    for (int64_t k = 0; k < in; k += 16) {
        prefetch_rows(next, n_next, k);
        v16 w0 = load16(b0 + k), w1 = load16(b1 + k), w2 = load16(b2 + k), w3 = load16(b3 + k);
        v16 y0 = load16(x0 + k), y1 = load16(x1 + k), y2 = load16(x2 + k), y3 = load16(x3 + k);
        a00 += w0 * y0, a01 += w0 * y1, a02 += w0 * y2, a03 += w0 * y3;
        a10 += w1 * y0, a11 += w1 * y1, a12 += w1 * y2, a13 += w1 * y3;
        a20 += w2 * y0, a21 += w2 * y1, a22 += w2 * y2, a23 += w2 * y3;
        a30 += w3 * y0, a31 += w3 * y1, a32 += w3 * y2, a33 += w3 * y3;
    }
    part[REV4[0]] = a00, part[REV4[1]] = a10, part[REV4[2]] = a20, part[REV4[3]] = a30;
    part[REV4[4]] = a01, part[REV4[5]] = a11, part[REV4[6]] = a21, part[REV4[7]] = a31;
    part[REV4[8]] = a02, part[REV4[9]] = a12, part[REV4[10]] = a22, part[REV4[11]] = a32;
    part[REV4[12]] = a03, part[REV4[13]] = a13, part[REV4[14]] = a23, part[REV4[15]] = a33;
    v16 sums = sum16x16(part);
    memcpy(s, &sums, sizeof sums);
}

/* One token row against four rows decoded on the fly (nothing stored: at batch 1 the buffer's
 * store and reload cost more than the arithmetic): s[r]. */
static void nf4_direct1(const uint8_t *w, const float *absmax, int64_t rows, int64_t in, int64_t blocksize,
                        __m512 code, const float *x0, float *s) {
    const __m512i low = _mm512_set1_epi32(15);
    const uint8_t *wr[4];
    const float *ar[4];
    for (int r = 0; r < 4; r++) { /* rows past the last repeat row 0 (computed, not stored) */
        wr[r] = w + (r < rows ? r : 0) * in / 2;
        ar[r] = absmax + (r < rows ? r : 0) * in / blocksize;
    }
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t b = 0; b < in; b += blocksize) {
        __m512 even[4], odd[4];
        for (int r = 0; r < 4; r++) even[r] = odd[r] = _mm512_setzero_ps();
        for (int64_t c = b; c < b + blocksize; c += 32) {
            __m512 xe = _mm512_loadu_ps(x0 + c), xo = _mm512_loadu_ps(x0 + c + 16);
            for (int r = 0; r < 4; r++) { /* four rows: eight independent sums in flight */
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr[r] + c / 2)));
                even[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code), xe, even[r]);
                odd[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low), code), xo, odd[r]);
            }
        }
        for (int r = 0; r < 4; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(even[r], odd[r]), _mm512_set1_ps(ar[r][b / blocksize]), acc[r]);
    }
    for (int r = 0; r < 4; r++) s[r] = _mm512_reduce_add_ps(acc[r]);
}

/* tile4x4 for one token row: s[r]. */
static void tile4x1(const float *const *w, int64_t in, const float *x0, float *s, const float *const *next,
                    int n_next) {
    const float *b0 = w[0], *b1 = w[1], *b2 = w[2], *b3 = w[3];
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t k = 0; k < in; k += 16) {
        prefetch_rows(next, n_next, k);
        v16 y0 = load16(x0 + k);
        a0 += load16(b0 + k) * y0, a1 += load16(b1 + k) * y0, a2 += load16(b2 + k) * y0, a3 += load16(b3 + k) * y0;
    }
    s[0] = hsum16(a0), s[1] = hsum16(a1), s[2] = hsum16(a2), s[3] = hsum16(a3);
}
#endif

/* Groups of four rows per work item for nf4_linear and dense_linear: about eight items per
 * thread, handed out as threads come free. A static split stalls the whole call whenever the
 * scheduler takes a core from one of its threads (the event loop, a load generator, any other
 * process on a 2-core machine): the other thread finishes its half and waits. */
static inline int64_t tile_chunk(int64_t groups, int threads) {
    int64_t chunk = groups / (8 * (int64_t)threads);
    return chunk > 0 ? chunk : 1;
}

/* 1 when nf4_linear and dense_linear run on this build (AVX-512), 0 when they always answer -2. */
int tile_kernels_available(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* y (M, out) = x (M, in) W^T, both float32 with row strides; y is overwritten (no bias). */
int nf4_linear(float *y, int64_t y_stride, const float *x, int64_t x_stride, int64_t M, const uint8_t *w,
               const float *absmax, const float *code16, int64_t out, int64_t in, int64_t blocksize, int threads) {
#ifndef __AVX512F__
    return -2;
#else
    if (in % 32 || blocksize % 32 || in % blocksize) return -2;
    float *xs = aligned_alloc(64, sizeof(float) * (size_t)(M * in));
    if (!xs) return -1;
    for (int64_t m = 0; m < M; m++) split_row(xs + m * in, x + m * x_stride, in);
    __m512 code = _mm512_loadu_ps(code16);
    int64_t groups = (out + 3) / 4, chunk = tile_chunk(groups, threads);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = aligned_alloc(64, sizeof(float) * (size_t)(4 * in));
        v16 *part = aligned_alloc(64, sizeof(v16) * 16);
        if (!buf || !part) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, chunk)
            for (int64_t g = 0; g < groups; g++) {
                int64_t o0 = 4 * g, rows = out - o0 < 4 ? out - o0 : 4;
                if (M == 1) {
                    float s[4];
                    nf4_direct1(w + o0 * in / 2, absmax + o0 * in / blocksize, rows, in, blocksize, code, xs, s);
                    for (int64_t r = 0; r < rows; r++) y[o0 + r] = s[r];
                    continue;
                }
                for (int64_t r = 0; r < 4; r++) {
                    if (r < rows)
                        nf4_decode_row(buf + r * in, w + (o0 + r) * in / 2, absmax + (o0 + r) * in / blocksize, in,
                                       blocksize, code);
                    else
                        memset(buf + r * in, 0, sizeof(float) * (size_t)in);
                }
                for (int64_t m0 = 0; m0 < M; m0 += 4) {
                    int64_t ms = M - m0 < 4 ? M - m0 : 4;
                    float s[16];
                    const float *br[4] = {buf, buf + in, buf + 2 * in, buf + 3 * in};
                    if (ms == 1) {
                        tile4x1(br, in, xs + m0 * in, s, NULL, 0);
                    } else {
                        const float *xr[4];
                        for (int64_t m = 0; m < 4; m++) xr[m] = xs + (m0 + (m < ms ? m : 0)) * in;
                        tile4x4(br, in, xr, s, part, NULL, 0);
                    }
                    for (int64_t m = 0; m < ms; m++)
                        for (int64_t r = 0; r < rows; r++) y[(m0 + m) * y_stride + o0 + r] = s[4 * m + r];
                }
            }
        }
        free(buf);
        free(part);
    }
    free(xs);
    return failed ? -1 : 0;
#endif
}

/* Multiply-adds under which dense_linear runs on one thread: the fork costs more than it saves. */
#define DENSE_PARALLEL_MACS (1 << 16)

/* y (M, out) = x (M, in) W^T (+ bias) for a dense float32 W (out, in) with row stride in, x and y
 * with row strides. Four weight rows at a time (read from memory once, then from L1 for every
 * four token rows), tile4x4: a row's result is the same bits whatever M is and wherever the row
 * sits in the batch, which BLAS, picking other kernels for other M, does not give. AVX-512 and
 * in % 16 == 0 only: otherwise -2, and the caller keeps F.linear. */
int dense_linear(float *y, int64_t y_stride, const float *x, int64_t x_stride, int64_t M, const float *w,
                 const float *bias, int64_t out, int64_t in, int threads) {
#ifndef __AVX512F__
    return -2;
#else
    if (in % 16) return -2;
    int64_t groups = (out + 3) / 4, chunk = tile_chunk(groups, threads);
#pragma omp parallel num_threads(threads) if (threads > 1 && out * M * in > DENSE_PARALLEL_MACS)
    {
        v16 part[16];
#pragma omp for schedule(dynamic, chunk)
        for (int64_t g = 0; g < groups; g++) {
            int64_t o0 = 4 * g, rows = out - o0 < 4 ? out - o0 : 4;
            const float *wr[4], *next[4];
            for (int64_t r = 0; r < 4; r++) {
                wr[r] = w + (o0 + (r < rows ? r : 0)) * in; /* extra rows: computed, not stored */
                next[r] = w + (o0 + 4 + r < out ? o0 + 4 + r : 0) * in;
            }
            /* The next group's four rows are fetched while this group computes, spread over its tiles. */
            int64_t tiles = (M + 3) / 4, per = (4 + tiles - 1) / tiles;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                int64_t ms = M - m0 < 4 ? M - m0 : 4, first = (m0 / 4) * per;
                const float *const *pf = next + (first < 4 ? first : 0);
                int n_pf = first >= 4 ? 0 : (int)(4 - first < per ? 4 - first : per);
                float s[16];
                if (ms == 1) {
                    tile4x1(wr, in, x + m0 * x_stride, s, pf, n_pf);
                } else {
                    const float *xr[4];
                    for (int64_t m = 0; m < 4; m++) xr[m] = x + (m0 + (m < ms ? m : 0)) * x_stride;
                    tile4x4(wr, in, xr, s, part, pf, n_pf);
                }
                for (int64_t m = 0; m < ms; m++)
                    for (int64_t r = 0; r < rows; r++)
                        y[(m0 + m) * y_stride + o0 + r] = bias ? s[4 * m + r] + bias[o0 + r] : s[4 * m + r];
            }
        }
    }
    return 0;
#endif
}
