// Torch entry points of the CUDA feature-mask kernels (fmn::spatial_mask_mul and its backward):
// argument checks, layout planning and allocation on at::Tensor, then the raw-pointer
// launchers of feature_mask.h on the current CUDA stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fmn {
namespace cuda {

// o = f * act(min(logits, max_logit))  or  f * (1 - act(...)) + f_other * act(...); o like empty_like(f).
at::Tensor spatial_mask_mul(const at::Tensor& f,
                            const at::Tensor& logits,
                            const std::optional<at::Tensor>& f_other,
                            c10::string_view activation,
                            std::optional<double> max_logit);

// (df, dlogits, df_other); df empty (numel 0) unless need_df, df_other empty unless f_other is
// given and need_dother.
std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_mask_mul_backward(
    const at::Tensor& grad_out,
    const at::Tensor& f,
    const at::Tensor& logits,
    const std::optional<at::Tensor>& f_other,
    c10::string_view activation,
    std::optional<double> max_logit,
    bool need_df,
    bool need_dother);

}  // namespace cuda
}  // namespace fmn
