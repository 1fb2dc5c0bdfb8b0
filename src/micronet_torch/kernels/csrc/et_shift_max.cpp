// micronet::shift_max.out, the ExecuTorch kernel of Dynamic Shift-Max's fusion and max (micronet-torch).
//
//   inputs   x    f32 (N, C, H, W);  coef f32 (N, C_out * K * J), (c, k, j) order
//   args     index (C_out * J ints): output channel a reads input channels index[a*J + j]; k, j (1 or 2 each)
//   output   out  f32 (N, C_out, H, W),  out[n, a] = max_k sum_j coef[n, a, k, j] * x[n, index[a*J + j]]
//
// The program calls it between XNNPACK partitions (the kernel reads and writes contiguous NCHW tensors). It is
// registered in ExecuTorch's kernel registry when the library is loaded (runtime/executorch_ops.py); every
// shape, dtype and index is checked before a byte is read, so a crafted program gets an error, not a crash.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "shift_max_row.h"

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace micronet {

Tensor& shift_max_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& coef, ArrayRef<int64_t> index,
                      int64_t k, int64_t j, Tensor& out) {
    const bool types = x.scalar_type() == ScalarType::Float && coef.scalar_type() == ScalarType::Float &&
                       out.scalar_type() == ScalarType::Float && x.dim() == 4 && out.dim() == 4;
    ET_KERNEL_CHECK(ctx, types && (k == 1 || k == 2) && (j == 1 || j == 2), InvalidArgument, out);
    ET_KERNEL_CHECK(ctx, !index.empty() && index.size() % j == 0, InvalidArgument, out);
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
    const int64_t c_out = static_cast<int64_t>(index.size()) / j, kj = k * j;
    const bool shapes = out.size(0) == n && out.size(1) == c_out && out.size(2) == h && out.size(3) == w &&
                        coef.numel() == n * c_out * kj;
    ET_KERNEL_CHECK(ctx, shapes, InvalidArgument, out);
    for (size_t i = 0; i < index.size(); ++i) ET_KERNEL_CHECK(ctx, index[i] >= 0 && index[i] < c, InvalidArgument, out);
    const float* xd = x.const_data_ptr<float>();
    const float* cd = coef.const_data_ptr<float>();
    float* od = out.mutable_data_ptr<float>();
    for (int64_t b = 0; b < n; ++b)
        for (int64_t a = 0; a < c_out; ++a) {
            const float* x0 = xd + (b * c + index[a * j]) * hw;
            const float* x1 = j == 2 ? xd + (b * c + index[a * j + 1]) * hw : x0;
            shift_max_row(cd + (b * c_out + a) * kj, x0, x1, od + (b * c_out + a) * hw, hw, k, j);
        }
    return out;
}

}  // namespace micronet

EXECUTORCH_LIBRARY(micronet, "shift_max.out", micronet::shift_max_out);
