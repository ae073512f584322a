// Feature-mask op (fmn::spatial_mask_mul): CPU kernels, and the input planning that the CPU
// and CUDA torch glue share.
//
//   u = min(logits, max_logit)           (clamp only when max_logit is given)
//   m = act(u),  act in {exp_relu: exp(max(u, 0)), sigmoid: 1 / (1 + exp(-u)), identity: u}
//   o = f * m[b, hw]                     (f_other absent; m broadcast over channels)
//   o = f * (1 - m[b, hw]) + f_other * m[b, hw]   (f_other present: spatial_mix)
//
// f, f_other, o: (B, C, H, W); logits: (B, H*W).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fmn {

namespace spatial_mask {

enum class Activation : int { kExpRelu = 0, kSigmoid = 1, kIdentity = 2 };

// A (B, C, H, W) tensor seen as (B, C, H*W): element (b, c, hw) lies at
// b * batch + c * channel + hw * spatial (in elements). Strides of size-1 dimensions are 0.
struct Strides3 {
  int64_t batch;
  int64_t channel;
  int64_t spatial;
};

// The two memory layouts the kernels run on.
//   kPlane:   spatial stride 1 (contiguous NCHW, and batch or channel slices of it);
//             every (b, c) plane of H*W elements is contiguous.
//   kChannel: channel stride 1 (channels_last and its batch/channel slices);
//             the C channels of every (b, hw) position are contiguous.
enum class Layout : int { kPlane = 0, kChannel = 1 };

// Validated inputs of one call, brought into one layout.
struct Problem {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t spatial = 0;  // H * W
  Layout layout = Layout::kPlane;
  Activation activation = Activation::kExpRelu;
  bool clamp = false;      // max_logit given
  double max_logit = 0.0;
  at::Tensor f;            // in `layout`
  at::Tensor f_other;      // in `layout`; undefined when absent
  at::Tensor grad_out;     // in `layout`, f's dtype; undefined in the forward
  at::Tensor logits;       // (B, H*W), contiguous, in the requested compute dtype
};

// Checks the arguments of `op_name` (shapes, dtypes, devices, activation name) and returns them
// in one layout. Tensors already in a supported layout are used as they are; others are copied
// (contiguous in f's suggested memory format). `device_type` is where every tensor must live;
// `allow_double` says whether float64 f is accepted; `logits_dtype` is the dtype the kernels read
// the logits in.
Problem plan(const char* op_name,
             c10::DeviceType device_type,
             bool allow_double,
             at::ScalarType logits_dtype,
             const at::Tensor* grad_out,
             const at::Tensor& f,
             const at::Tensor& logits,
             const std::optional<at::Tensor>& f_other,
             c10::string_view activation,
             std::optional<double> max_logit);

// Strides of a tensor that is in `layout` (the unit stride of the layout is reported as 1).
Strides3 strides_in(const at::Tensor& t, Layout layout);

// A (B, C, H, W) output shaped, typed and laid out like at::empty_like(like). `target` is the
// tensor the kernel writes: `result` itself when that is in `layout`, else a scratch tensor in
// `layout` that finish() copies into `result`.
struct Output {
  at::Tensor result;
  at::Tensor target;
  void finish();
};
Output allocate_output(const at::Tensor& like, Layout layout);

// dlogits shaped, typed and laid out like at::empty_like(logits), from the contiguous (B, H*W)
// buffer the kernels wrote (returned as it is when it already is that).
at::Tensor dlogits_like(const at::Tensor& logits, const at::Tensor& dlogits_buffer);

// The backward's results (df, dlogits, df_other) once the kernels have run: each output that was
// asked for, finished into its result; an empty (numel 0) tensor for each that was not.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_results(Output& df, bool need_df, Output& df_other,
                                                                bool need_dother, const at::Tensor& f,
                                                                const at::Tensor& logits,
                                                                const at::Tensor& dlogits_buffer);

}  // namespace spatial_mask

namespace cpu {

at::Tensor spatial_mask_mul(const at::Tensor& f,
                            const at::Tensor& logits,
                            const std::optional<at::Tensor>& f_other,
                            c10::string_view activation,
                            std::optional<double> max_logit);

// Returns (df, dlogits, df_other). df is empty (numel 0) unless need_df; df_other is empty
// unless f_other is given and need_dother.
std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_mask_mul_backward(
    const at::Tensor& grad_out,
    const at::Tensor& f,
    const at::Tensor& logits,
    const std::optional<at::Tensor>& f_other,
    c10::string_view activation,
    std::optional<double> max_logit,
    bool need_df,
    bool need_dother);

}  // namespace cpu
}  // namespace fmn
