// micronet.ShiftMax for OpenVINO: MicroNet's Dynamic Shift-Max (fusion and max) as one operation.
//
//   inputs   x    f32 (N, C_in, H, W)
//            coef f32 (N, C_out * K * J): per output channel a, coefficients in (k, j) order
//   attrs    index (C_out * J ints): output channel a reads input channels index[a*J + j]; k, j (1 or 2 each)
//   output   y    f32 (N, C_out, H, W),  y[n, a] = max_k sum_j coef[n, a, k, j] * x[n, index[a*J + j]]
//
// The same operator as ort_shift_max.c, for OpenVINO's extension API: one read of each input map and one
// write of the output instead of the ~12 elementwise nodes of the standard-operator graph. The library also
// maps the ONNX node micronet.ShiftMax onto it, so `openvino.convert_model(onnx_file, extension=library)`
// reads a graph exported with --fused-ops. OpenVINO's CPU plugin runs it as a reference node on plain NCHW
// tensors (it inserts layout reorders around it).
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

#include <cstdint>
#include <memory>
#include <vector>

#include "shift_max_row.h"

namespace micronet {

class ShiftMax : public ov::op::Op {
public:
    OPENVINO_OP("ShiftMax", "micronet");

    ShiftMax() = default;

    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 2, "micronet.ShiftMax takes x and coef");
        NODE_VALIDATION_CHECK(this, (k_ == 1 || k_ == 2) && (j_ == 1 || j_ == 2), "k and j must be 1 or 2");
        NODE_VALIDATION_CHECK(this, !index_.empty() && index_.size() % j_ == 0, "index must hold C_out * j ints");
        for (int64_t i : index_) NODE_VALIDATION_CHECK(this, i >= 0, "index must not be negative");
        NODE_VALIDATION_CHECK(this, get_input_element_type(0) == ov::element::f32, "x must be f32");
        NODE_VALIDATION_CHECK(this, get_input_element_type(1) == ov::element::f32, "coef must be f32");
        ov::PartialShape out = get_input_partial_shape(0);
        if (out.rank().is_static()) {
            NODE_VALIDATION_CHECK(this, out.rank().get_length() == 4, "x must be (N, C, H, W)");
            if (out[1].is_static())
                for (int64_t i : index_)
                    NODE_VALIDATION_CHECK(this, i < out[1].get_length(), "index reads past the channels of x");
            out[1] = static_cast<int64_t>(index_.size() / j_);
        }
        set_output_type(0, ov::element::f32, out);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        auto op = std::make_shared<ShiftMax>();
        op->set_arguments(args);
        op->index_ = index_;
        op->k_ = k_;
        op->j_ = j_;
        op->constructor_validate_and_infer_types();
        return op;
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("index", index_);
        visitor.on_attribute("k", k_);
        visitor.on_attribute("j", j_);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const ov::Shape& shape = inputs[0].get_shape();
        if (shape.size() != 4) return false;
        const int64_t n = shape[0], c_in = shape[1], hw = shape[2] * shape[3];
        const int64_t c_out = static_cast<int64_t>(index_.size()) / j_, kj = k_ * j_;
        if (static_cast<int64_t>(inputs[1].get_size()) != n * c_out * kj) return false;  // never read past coef
        for (int64_t i : index_)
            if (i >= c_in) return false;  // never read past x
        outputs[0].set_shape({shape[0], static_cast<size_t>(c_out), shape[2], shape[3]});
        const float* x = inputs[0].data<const float>();
        const float* coef = inputs[1].data<const float>();
        float* y = outputs[0].data<float>();
        for (int64_t r = 0; r < n * c_out; ++r) rows(x, coef, y, r / c_out, r % c_out, c_in, hw);
        return true;
    }

private:
    // output row (b, a): one pass over its one or two input rows (the loop ONNX Runtime's operator runs too)
    void rows(const float* x, const float* coef, float* y, int64_t b, int64_t a, int64_t c_in, int64_t hw) const {
        const int64_t c_out = static_cast<int64_t>(index_.size()) / j_, r = b * c_out + a;
        const float* x0 = x + (b * c_in + index_[a * j_]) * hw;
        const float* x1 = x + (b * c_in + index_[a * j_ + j_ - 1]) * hw;  // read only when j == 2
        shift_max_row(coef + r * k_ * j_, x0, x1, y + r * hw, hw, k_, j_);
    }

    std::vector<int64_t> index_;
    int64_t k_ = 1;
    int64_t j_ = 1;
};

}  // namespace micronet

// the operation (to read IR files) and its ONNX mapping (to convert files exported with --fused-ops)
OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<micronet::ShiftMax>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<micronet::ShiftMax>>("ShiftMax", "micronet")}));
