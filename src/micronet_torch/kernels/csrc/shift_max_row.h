/* One output row of micronet.ShiftMax (Dynamic Shift-Max's fusion and max), shared by the ONNX Runtime operator
 * (ort_shift_max.c), the OpenVINO extension (ov_shift_max.cpp) and the ExecuTorch kernel (et_shift_max.cpp), so every
 * runtime computes the same loop.
 *
 *   out[p] = max_k sum_j c[k*J + j] * x_j[p]   for p < hw, with J inputs x0 (and x1 when J = 2), K = 1 or 2
 */
#ifndef MICRONET_SHIFT_MAX_ROW_H
#define MICRONET_SHIFT_MAX_ROW_H

#include <stdint.h>

#ifdef __cplusplus
#define MICRONET_RESTRICT __restrict
#else
#define MICRONET_RESTRICT restrict
#endif

static inline void shift_max_row(const float *c, const float *MICRONET_RESTRICT x0, const float *MICRONET_RESTRICT x1,
                                 float *MICRONET_RESTRICT out, int64_t hw, int64_t k, int64_t j) {
    if (j == 2) {
        if (k == 2) {
            const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
            for (int64_t p = 0; p < hw; ++p) {
                const float u = c0 * x0[p] + c1 * x1[p], v = c2 * x0[p] + c3 * x1[p];
                out[p] = u > v ? u : v;
            }
        } else {
            const float c0 = c[0], c1 = c[1];
            for (int64_t p = 0; p < hw; ++p) out[p] = c0 * x0[p] + c1 * x1[p];
        }
    } else if (k == 2) {
        const float c0 = c[0], c1 = c[1];
        for (int64_t p = 0; p < hw; ++p) {
            const float u = c0 * x0[p], v = c1 * x0[p];
            out[p] = u > v ? u : v;
        }
    } else {
        const float c0 = c[0];
        for (int64_t p = 0; p < hw; ++p) out[p] = c0 * x0[p];
    }
}

#endif
