// at::Tensor glue of the CUDA feature-mask kernels: the same checks and layout planning as the
// CPU kernels (fmn::spatial_mask::plan), allocation of the outputs, and the launch on the
// current stream of f's device. Logits are read, and dlogits accumulated, in float32.
#include "cuda/feature_mask_launch.h"

#include "cpu/feature_mask.h"
#include "cuda/feature_mask.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

namespace fmn {
namespace cuda {
namespace {

using spatial_mask::Layout;
using spatial_mask::Problem;

ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kHalf:
      return ElementType::kFloat16;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "fmn::spatial_mask_mul: no CUDA kernel for dtype ", dtype);
}

MaskFunction mask_function(const Problem& p) {
  MaskFunction mf{};
  switch (p.activation) {
    case spatial_mask::Activation::kExpRelu:
      mf.activation = MaskActivation::kExpRelu;
      break;
    case spatial_mask::Activation::kSigmoid:
      mf.activation = MaskActivation::kSigmoid;
      break;
    case spatial_mask::Activation::kIdentity:
      mf.activation = MaskActivation::kIdentity;
      break;
  }
  mf.clamp = p.clamp;
  mf.max_logit = static_cast<float>(p.max_logit);
  return mf;
}

MaskLayout mask_layout(Layout layout) {
  return layout == Layout::kPlane ? MaskLayout::kPlane : MaskLayout::kChannel;
}

FeatureStrides feature_strides(const at::Tensor& t, Layout layout) {
  const spatial_mask::Strides3 s = spatial_mask::strides_in(t, layout);
  return FeatureStrides{s.batch, s.channel, s.spatial};
}

void check_on_cuda(const char* op_name, const at::Tensor& f) {
  TORCH_CHECK(f.defined() && f.is_cuda(), op_name, ": this kernel runs on CUDA tensors, got f on ",
              f.defined() ? f.device() : c10::Device(c10::DeviceType::CPU));
}

// The arguments both kernels take alike: sizes, layout, mask function, logits, f and f_other.
template <typename Args>
void set_inputs(Args& args, const Problem& p) {
  args.batch = p.batch;
  args.channels = p.channels;
  args.spatial = p.spatial;
  args.layout = mask_layout(p.layout);
  args.mask = mask_function(p);
  args.logits = p.logits.const_data_ptr<float>();
  args.f = p.f.const_data_ptr();
  args.f_strides = feature_strides(p.f, p.layout);
  if (p.f_other.defined()) {
    args.f_other = p.f_other.const_data_ptr();
    args.f_other_strides = feature_strides(p.f_other, p.layout);
  }
}

}  // namespace

at::Tensor spatial_mask_mul(const at::Tensor& f,
                            const at::Tensor& logits,
                            const std::optional<at::Tensor>& f_other,
                            c10::string_view activation,
                            std::optional<double> max_logit) {
  constexpr const char* op = "fmn::spatial_mask_mul";
  check_on_cuda(op, f);
  const c10::cuda::CUDAGuard device_guard(f.device());
  const Problem p = spatial_mask::plan(op, c10::DeviceType::CUDA, /*allow_double=*/false, at::kFloat, nullptr, f,
                                       logits, f_other, activation, max_logit);
  spatial_mask::Output out = spatial_mask::allocate_output(f, p.layout);
  if (out.result.numel() == 0) return out.result;

  SpatialMaskForwardArgs args{};
  set_inputs(args, p);
  args.out = out.target.mutable_data_ptr();
  args.out_strides = feature_strides(out.target, p.layout);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(f.device().index()).stream();
  C10_CUDA_CHECK(launch_spatial_mask_mul_forward(element_type(p.f.scalar_type()), args, stream));
  out.finish();
  return out.result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_mask_mul_backward(
    const at::Tensor& grad_out,
    const at::Tensor& f,
    const at::Tensor& logits,
    const std::optional<at::Tensor>& f_other,
    c10::string_view activation,
    std::optional<double> max_logit,
    bool need_df,
    bool need_dother) {
  constexpr const char* op = "fmn::spatial_mask_mul_backward";
  check_on_cuda(op, f);
  const c10::cuda::CUDAGuard device_guard(f.device());
  const Problem p = spatial_mask::plan(op, c10::DeviceType::CUDA, /*allow_double=*/false, at::kFloat, &grad_out,
                                       f, logits, f_other, activation, max_logit);
  const bool mix = p.f_other.defined();
  const bool need_dg = mix && need_dother;

  spatial_mask::Output df, dg;
  if (need_df) df = spatial_mask::allocate_output(f, p.layout);
  if (need_dg) dg = spatial_mask::allocate_output(f, p.layout);
  const at::Tensor dlogits32 = at::empty({p.batch, p.spatial}, logits.options().dtype(at::kFloat));

  SpatialMaskBackwardArgs args{};
  set_inputs(args, p);
  args.grad_out = p.grad_out.const_data_ptr();
  args.grad_out_strides = feature_strides(p.grad_out, p.layout);
  if (need_df && df.target.numel() > 0) {
    args.df = df.target.mutable_data_ptr();
    args.df_strides = feature_strides(df.target, p.layout);
  }
  if (need_dg && dg.target.numel() > 0) {
    args.df_other = dg.target.mutable_data_ptr();
    args.df_other_strides = feature_strides(dg.target, p.layout);
  }
  args.dlogits = dlogits32.mutable_data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(f.device().index()).stream();
  C10_CUDA_CHECK(launch_spatial_mask_mul_backward(element_type(p.f.scalar_type()), args, stream));

  return spatial_mask::backward_results(df, need_df, dg, need_dg, f, logits, dlogits32);
}

}  // namespace cuda
}  // namespace fmn
