/* Dynamic Shift-Max for training: the fusion-and-max forward and its backward, each one pass over the map.
 *
 *   x     (N, C, H, W) as NCHW or NHWC memory, float or double
 *   coef  (N, K*J*C) in the published order: coef[n, (k*J + j)*C + c] = a^k_{c,j}
 *   index (C) int64: the shifted copy of channel c is channel index[c]; inverse is its inverse permutation
 *   y[n, c] = max_k sum_j a^k_{c,j} * x[n, shift_j(c)],  shift_0(c) = c, shift_1(c) = index[c]
 *
 * The backward recomputes which branch won the max (nothing but x and coef is kept from the forward) and
 * weights the branches as torch.maximum's backward does: 1 to the larger, 0.5 each on an exact tie. The
 * gradient of x[n, d] gathers the direct term of channel d and the shifted term of channel inverse[d], so
 * every output element is written once by one thread (no scatter, deterministic). Coefficient gradients
 * are per-sample, per-channel sums over H*W: in the element type over chunks of 256 pixels, then in double.
 *
 * This file includes itself once per element type (float, double) to stamp out the kernels.
 */
#ifndef DSM_T
#include <stdint.h>
#include <stdlib.h>

#define EXPORT __attribute__((visibility("default")))
#define INLINE static inline __attribute__((always_inline))
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define CHUNK 256
/* Call row kernel f with K and J as literal constants, so that each (K, J) gets its own branch-free loop. This
 * sits inside the OpenMP loops: constants do not reach the outlined parallel bodies from outside them. */
#define SPECIALIZE(f, ...)                                                                                             \
    switch (k * 4 + j) {                                                                                               \
    case 5: f(__VA_ARGS__, 1, 1); break;                                                                               \
    case 6: f(__VA_ARGS__, 1, 2); break;                                                                               \
    case 9: f(__VA_ARGS__, 2, 1); break;                                                                               \
    default: f(__VA_ARGS__, 2, 2); break;                                                                              \
    }

#define DSM_T float
#define DSM_SFX _f32
#include "dsm_train.c" /* this file: relative to its own folder, however it was named */
#undef DSM_T
#undef DSM_SFX

#define DSM_T double
#define DSM_SFX _f64
#include "dsm_train.c" /* this file: relative to its own folder, however it was named */
#undef DSM_T
#undef DSM_SFX

#else /* one element type: DSM_T, names ending in DSM_SFX */
#define T DSM_T
#define FN(name) CAT(name, DSM_SFX)
/* torch.maximum's backward share of branch b0 against b1 */
#define WIN(b0, b1) ((b0) < (b1) ? (T)0 : ((b0) == (b1) ? (T)0.5 : (T)1))

/* forward of one (n, c) row of an NCHW map: x0 = x[n, c], x1 = x[n, index[c]] */
INLINE void FN(fwd_row)(const T *restrict x0, const T *restrict x1, T *restrict y, int64_t hw, const T *a,
                        int k, int j) {
#pragma omp simd
    for (int64_t p = 0; p < hw; ++p) {
        T b0 = a[0] * x0[p];
        if (j == 2) b0 = b0 + a[1] * x1[p];
        if (k == 2) {
            T b1 = a[j] * x0[p];
            if (j == 2) b1 = b1 + a[3] * x1[p];
            b0 = b1 > b0 ? b1 : b0;
        }
        y[p] = b0;
    }
}

/* backward of one (n, d) row: xc = x[n, d], xs = x[n, index[d]], xi = x[n, inverse[d]]; gc, gi likewise.
 * a: the K*J coefficients of channel d, e: those of channel inverse[d]; s: d's coefficient gradients. */
INLINE void FN(bwd_row)(const T *restrict xc_, const T *restrict xs_, const T *restrict xi_,
                        const T *restrict gc_, const T *restrict gi_, T *restrict gx, int64_t hw, const T *a,
                        const T *e, double *s, int k, int j) {
    double s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    /* sums in T over chunks of CHUNK pixels (vector lanes of CHUNK / width terms each), chunks summed in double */
    for (int64_t p0 = 0; p0 < hw; p0 += CHUNK) {
        int64_t p1 = p0 + CHUNK < hw ? p0 + CHUNK : hw;
        T t00 = 0, t01 = 0, t10 = 0, t11 = 0;
#pragma omp simd reduction(+ : t00, t01, t10, t11)
        for (int64_t p = p0; p < p1; ++p) {
            T xc = xc_[p], gc = gc_[p];
            T xs = j == 2 ? xs_[p] : (T)0;
            T m0 = 1, m1 = 0;
            if (k == 2) {
                T b0 = a[0] * xc, b1 = a[j] * xc;
                if (j == 2) b0 = b0 + a[1] * xs, b1 = b1 + a[3] * xs;
                m0 = WIN(b0, b1), m1 = WIN(b1, b0);
            }
            T g0 = gc * m0, g1 = gc * m1;
            t00 += g0 * xc;
            T gxv = g0 * a[0];
            if (k == 2) t10 += g1 * xc, gxv = gxv + g1 * a[j];
            if (j == 2) {
                t01 += g0 * xs;
                if (k == 2) t11 += g1 * xs;
                T xi = xi_[p], gi = gi_[p];
                T n0 = 1, n1 = 0;
                if (k == 2) {
                    T d0 = e[0] * xi + e[1] * xc, d1 = e[2] * xi + e[3] * xc;
                    n0 = WIN(d0, d1), n1 = WIN(d1, d0);
                }
                gxv = gxv + gi * n0 * e[1];
                if (k == 2) gxv = gxv + gi * n1 * e[3];
            }
            gx[p] = gxv;
        }
        s00 += t00, s01 += t01, s10 += t10, s11 += t11;
    }
    s[0] = s00;
    if (j == 2) s[1] = s01;
    if (k == 2) s[j] = s10;
    if (k == 2 && j == 2) s[3] = s11;
}

/* the K*J coefficients of channel c of sample n, in (k, j) order */
INLINE void FN(gather_coef)(const T *coef_n, int64_t c, int64_t C, int kj, T *out) {
    for (int q = 0; q < kj; ++q) out[q] = coef_n[q * C + c];
}

INLINE void FN(fwd_nchw)(const T *x, const T *coef, const int64_t *index, T *y, int64_t N, int64_t C,
                            int64_t HW, int k, int j, int nt) {
    (void)nt;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N * C; ++r) {
        int64_t n = r / C, c = r % C;
        T a[4];
        FN(gather_coef)(coef + n * k * j * C, c, C, k * j, a);
        SPECIALIZE(FN(fwd_row), x + r * HW, x + (n * C + index[c]) * HW, y + r * HW, HW, a)
    }
}

INLINE void FN(bwd_nchw)(const T *x, const T *coef, const int64_t *index, const int64_t *inverse, const T *g,
                            T *gx, T *gcoef, int64_t N, int64_t C, int64_t HW, int k, int j, int nt) {
    (void)nt;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N * C; ++r) {
        int64_t n = r / C, c = r % C, ci = inverse[c];
        const T *cn = coef + n * k * j * C;
        T a[4], e[4];
        double s[4];
        FN(gather_coef)(cn, c, C, k * j, a);
        FN(gather_coef)(cn, ci, C, k * j, e);
        const T *xn = x + n * C * HW, *gn = g + n * C * HW;
        SPECIALIZE(FN(bwd_row), xn + c * HW, xn + index[c] * HW, xn + ci * HW, gn + c * HW, gn + ci * HW, gx + r * HW,
                   HW, a, e, s)
        for (int q = 0; q < k * j; ++q) gcoef[n * k * j * C + q * C + c] = (T)s[q];
    }
}

/* By pixel: the loops run over the C channels of one pixel, channel c at xr[c * cs]: cs = 1 in an NHWC map
 * (contiguous; gathers only for the shift), cs = H*W in an NCHW map with few pixels, where rows of H*W are
 * too short for vector loops. Callers pass cs = 1 as a literal so that case compiles to contiguous loads. */
INLINE void FN(fwd_pixel)(const T *restrict xr, const T *restrict a, const int64_t *restrict index, T *restrict yr,
                          int64_t C, int64_t cs, int k, int j) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        T x0 = xr[c * cs], x1 = j == 2 ? xr[index[c] * cs] : (T)0;
        T b0 = a[c] * x0;
        if (j == 2) b0 = b0 + a[C + c] * x1;
        if (k == 2) {
            T b1 = a[j * C + c] * x0;
            if (j == 2) b1 = b1 + a[3 * C + c] * x1;
            b0 = b1 > b0 ? b1 : b0;
        }
        yr[c * cs] = b0;
    }
}

/* nchw: 0 for an NHWC map, 1 for an NCHW one walked by pixel */
INLINE void FN(fwd_by_pixel)(const T *x, const T *coef, const int64_t *index, T *y, int64_t N, int64_t C,
                             int64_t HW, int k, int j, int nchw, int nt) {
    (void)nt;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N * HW; ++r) {
        int64_t n = r / HW, p = r % HW;
        const T *a = coef + n * k * j * C;
        if (nchw) {
            int64_t o = n * C * HW + p;
            SPECIALIZE(FN(fwd_pixel), x + o, a, index, y + o, C, HW)
        } else {
            SPECIALIZE(FN(fwd_pixel), x + r * C, a, index, y + r * C, C, (int64_t)1)
        }
    }
}

INLINE void FN(bwd_pixel)(const T *restrict xr, const T *restrict gr, const T *restrict a,
                          const int64_t *restrict index, const int64_t *restrict inverse, T *restrict gxr,
                          double *restrict acc, int64_t C, int64_t cs, int k, int j) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        int64_t sc = index[c], ci = inverse[c];
        T xc = xr[c * cs], gc = gr[c * cs], xs = j == 2 ? xr[sc * cs] : (T)0;
        T m0 = 1, m1 = 0;
        if (k == 2) {
            T b0 = a[c] * xc, b1 = a[j * C + c] * xc;
            if (j == 2) b0 = b0 + a[C + c] * xs, b1 = b1 + a[3 * C + c] * xs;
            m0 = WIN(b0, b1), m1 = WIN(b1, b0);
        }
        T g0 = gc * m0, g1 = gc * m1;
        acc[c] += g0 * xc;
        T gxv = g0 * a[c];
        if (k == 2) acc[j * C + c] += g1 * xc, gxv = gxv + g1 * a[j * C + c];
        if (j == 2) {
            acc[C + c] += g0 * xs;
            if (k == 2) acc[3 * C + c] += g1 * xs;
            T xi = xr[ci * cs], gi = gr[ci * cs];
            T n0 = 1, n1 = 0;
            if (k == 2) {
                T d0 = a[ci] * xi + a[C + ci] * xc, d1 = a[2 * C + ci] * xi + a[3 * C + ci] * xc;
                n0 = WIN(d0, d1), n1 = WIN(d1, d0);
            }
            gxv = gxv + gi * n0 * a[C + ci];
            if (k == 2) gxv = gxv + gi * n1 * a[3 * C + ci];
        }
        gxr[c * cs] = gxv;
    }
}

INLINE void FN(bwd_by_pixel)(const T *x, const T *coef, const int64_t *index, const int64_t *inverse, const T *g,
                             T *gx, T *gcoef, int64_t N, int64_t C, int64_t HW, int k, int j, int nchw, int nt) {
    (void)nt;
    const int64_t KJ = k * j;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const T *a = coef + n * KJ * C;
        double *acc = calloc((size_t)(KJ * C), sizeof(double));
        for (int64_t p = 0; p < HW; ++p) {
            if (nchw) {
                int64_t o = n * C * HW + p;
                SPECIALIZE(FN(bwd_pixel), x + o, g + o, a, index, inverse, gx + o, acc, C, HW)
            } else {
                int64_t o = (n * HW + p) * C;
                SPECIALIZE(FN(bwd_pixel), x + o, g + o, a, index, inverse, gx + o, acc, C, (int64_t)1)
            }
        }
        for (int64_t q = 0; q < KJ * C; ++q) gcoef[n * KJ * C + q] = (T)acc[q];
        free(acc);
    }
}

/* Entry points: layout 0 = NCHW by rows, 1 = NHWC, 2 = NCHW by pixel (maps of few pixels). */
EXPORT void FN(dsm_forward)(const T *x, const T *coef, const int64_t *index, T *y, int64_t N, int64_t C,
                            int64_t HW, int k, int j, int layout, int nt) {
    if (layout == 0)
        FN(fwd_nchw)(x, coef, index, y, N, C, HW, k, j, nt);
    else
        FN(fwd_by_pixel)(x, coef, index, y, N, C, HW, k, j, layout == 2, nt);
}

EXPORT void FN(dsm_backward)(const T *x, const T *coef, const int64_t *index, const int64_t *inverse, const T *g,
                             T *gx, T *gcoef, int64_t N, int64_t C, int64_t HW, int k, int j, int layout, int nt) {
    if (layout == 0)
        FN(bwd_nchw)(x, coef, index, inverse, g, gx, gcoef, N, C, HW, k, j, nt);
    else
        FN(bwd_by_pixel)(x, coef, index, inverse, g, gx, gcoef, N, C, HW, k, j, layout == 2, nt);
}

#undef WIN
#undef FN
#undef T
#endif
