// CUDA kernels of the feature-mask op on raw pointers (no torch headers).
//
//   u = min(logits, max_logit)           (clamp only when max_logit is given)
//   m = act(u),  act in {exp_relu: exp(max(u, 0)), sigmoid: 1 / (1 + exp(-u)), identity: u}
//   o = f * m[b, hw]                     (f_other absent; m broadcast over channels)
//   o = f * (1 - m[b, hw]) + f_other * m[b, hw]   (f_other present: spatial_mix)
//
// Features are (B, C, HW) views with per-tensor strides, in one of two layouts shared by all
// feature tensors of a call:
//   kPlane:   spatial stride 1 (NCHW; each (b, c) plane of HW elements is contiguous)
//   kChannel: channel stride 1 (channels_last; the C channels of each (b, hw) are contiguous)
// Logits and dlogits are contiguous (B, HW) float32. Element types: float32, float16, bfloat16;
// all arithmetic is float32. Indices are 64-bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fmn {
namespace cuda {

enum class MaskActivation : int32_t { kExpRelu = 0, kSigmoid = 1, kIdentity = 2 };
enum class MaskLayout : int32_t { kPlane = 0, kChannel = 1 };
enum class ElementType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Element (b, c, hw) of a feature tensor lies at b * batch + c * channel + hw * spatial
// (in elements). The layout's unit stride must be 1; strides of size-1 dimensions may be 0.
struct FeatureStrides {
  int64_t batch;
  int64_t channel;
  int64_t spatial;
};

struct MaskFunction {
  MaskActivation activation;
  bool clamp;       // max_logit given
  float max_logit;
};

struct SpatialMaskForwardArgs {
  int64_t batch;
  int64_t channels;
  int64_t spatial;  // H * W
  MaskLayout layout;
  MaskFunction mask;
  const float* logits;       // (B, HW) contiguous
  const void* f;
  FeatureStrides f_strides;
  const void* f_other;       // nullptr: o = f * m
  FeatureStrides f_other_strides;
  void* out;
  FeatureStrides out_strides;
};

struct SpatialMaskBackwardArgs {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  MaskLayout layout;
  MaskFunction mask;
  const float* logits;       // (B, HW) contiguous
  const void* grad_out;
  FeatureStrides grad_out_strides;
  const void* f;
  FeatureStrides f_strides;
  const void* f_other;       // nullptr: no mix
  FeatureStrides f_other_strides;
  void* df;                  // nullptr: not needed
  FeatureStrides df_strides;
  void* df_other;            // nullptr: not needed (always nullptr without f_other)
  FeatureStrides df_other_strides;
  float* dlogits;            // (B, HW) contiguous, written in full
};

// Both launchers enqueue on `stream` and return cudaGetLastError() after the launch
// (cudaErrorInvalidValue for arguments they cannot run).
cudaError_t launch_spatial_mask_mul_forward(ElementType type, const SpatialMaskForwardArgs& args,
                                            cudaStream_t stream);
cudaError_t launch_spatial_mask_mul_backward(ElementType type, const SpatialMaskBackwardArgs& args,
                                             cudaStream_t stream);

}  // namespace cuda
}  // namespace fmn
