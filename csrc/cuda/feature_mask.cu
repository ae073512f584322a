// CUDA kernels of the feature-mask op (see feature_mask.h for the math and the layouts).
//
// The op is memory-bound: the forward reads f (and f_other) once and writes o once; the
// backward reads do, f (and f_other) once and writes df / df_other once plus the small dlogits.
// m = act(u) is evaluated per (b, hw) in registers and reused for every channel a thread
// handles. Feature tensors are accessed in packets of 16 bytes (4 x float32, 8 x float16 or
// bfloat16) when every pointer and stride allows it, else element by element. All loops are
// grid-stride; indices are 64-bit.
#include "cuda/feature_mask.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fmn {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kMaxGridYZ = 65535;
constexpr int64_t kMaxGridX = 2147483647;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Packets: VEC consecutive elements moved as one access. 16-byte packets (4 x float32,
// 8 x float16 / bfloat16) are loaded and stored as float4 / uint4 through the __ldg / __stwb
// intrinsics, which are single 128-bit instructions (a plain aggregate store may be split into
// 32-bit stores by the compiler); VEC == 1 is the element-wise fallback. The inputs are never
// written by the kernel that reads them, so the read-only path is safe.
__device__ __forceinline__ void load_packet(const float* __restrict__ p, float (&x)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  x[0] = v.x;
  x[1] = v.y;
  x[2] = v.z;
  x[3] = v.w;
}

__device__ __forceinline__ void store_packet(float* __restrict__ p, const float (&x)[4]) {
  __stwb(reinterpret_cast<float4*>(p), make_float4(x[0], x[1], x[2], x[3]));
}

// Two 16-bit elements per 32-bit word, element 2k in the low half (little endian).
__device__ __forceinline__ float low_half(__half*, unsigned int w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float high_half(__half*, unsigned int w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ float low_half(__nv_bfloat16*, unsigned int w) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float high_half(__nv_bfloat16*, unsigned int w) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ unsigned int pack_pair(__half*, float lo, float hi) {
  return static_cast<unsigned int>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<unsigned int>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
__device__ __forceinline__ unsigned int pack_pair(__nv_bfloat16*, float lo, float hi) {
  return static_cast<unsigned int>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<unsigned int>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

template <typename T>
__device__ __forceinline__ void load_half_packet(const T* __restrict__ p, float (&x)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  T* tag = nullptr;
  x[0] = low_half(tag, v.x);
  x[1] = high_half(tag, v.x);
  x[2] = low_half(tag, v.y);
  x[3] = high_half(tag, v.y);
  x[4] = low_half(tag, v.z);
  x[5] = high_half(tag, v.z);
  x[6] = low_half(tag, v.w);
  x[7] = high_half(tag, v.w);
}

template <typename T>
__device__ __forceinline__ void store_half_packet(T* __restrict__ p, const float (&x)[8]) {
  T* tag = nullptr;
  uint4 v;
  v.x = pack_pair(tag, x[0], x[1]);
  v.y = pack_pair(tag, x[2], x[3]);
  v.z = pack_pair(tag, x[4], x[5]);
  v.w = pack_pair(tag, x[6], x[7]);
  __stwb(reinterpret_cast<uint4*>(p), v);
}

__device__ __forceinline__ void load_packet(const __half* __restrict__ p, float (&x)[8]) { load_half_packet(p, x); }
__device__ __forceinline__ void load_packet(const __nv_bfloat16* __restrict__ p, float (&x)[8]) {
  load_half_packet(p, x);
}
__device__ __forceinline__ void store_packet(__half* __restrict__ p, const float (&x)[8]) { store_half_packet(p, x); }
__device__ __forceinline__ void store_packet(__nv_bfloat16* __restrict__ p, const float (&x)[8]) {
  store_half_packet(p, x);
}

template <typename T>
__device__ __forceinline__ void load_packet(const T* __restrict__ p, float (&x)[1]) {
  x[0] = to_float(*p);
}

template <typename T>
__device__ __forceinline__ void store_packet(T* __restrict__ p, const float (&x)[1]) {
  *p = from_float<T>(x[0]);
}

// u = min(logit, max_logit) when clamping (NaN stays NaN).
__device__ __forceinline__ float clamped_logit(const MaskFunction& mf, float logit) {
  return (mf.clamp && logit > mf.max_logit) ? mf.max_logit : logit;
}

// m = act(u): exp(max(u, 0)), 1 / (1 + exp(-u)) or u.
__device__ __forceinline__ float mask_value(const MaskFunction& mf, float logit) {
  const float u = clamped_logit(mf, logit);
  switch (mf.activation) {
    case MaskActivation::kExpRelu:
      return expf(u < 0.f ? 0.f : u);
    case MaskActivation::kSigmoid:
      return 1.f / (1.f + expf(-u));
    default:
      return u;
  }
}

// dlogit = dm * dm/dlogit, given m: dm * m (exp_relu), dm * m * (1 - m) (sigmoid), dm (identity).
// The gates select rather than multiply, as torch's relu and clamp backward do, so an inf or NaN
// dm behind a closed gate gives 0: exp_relu's ReLU gate is closed where u <= 0 (0 at u == 0
// exactly; a NaN logit passes NaN), the clamp's where logit > max_logit (open at equality).
// The same function as LogitGrad in csrc/cpu/feature_mask.cpp.
__device__ __forceinline__ float logit_grad(const MaskFunction& mf, float dm, float logit, float m) {
  if (mf.clamp && !(logit <= mf.max_logit)) return 0.f;
  switch (mf.activation) {
    case MaskActivation::kExpRelu:
      return logit <= 0.f ? 0.f : dm * m;
    case MaskActivation::kSigmoid:
      return dm * (m * (1.f - m));
    default:
      return dm;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, plane layout.
//   o[b, c, hw] = f[b, c, hw] * m[b, hw]                                (no mix)
//   o[b, c, hw] = f[b, c, hw] * (1 - m[b, hw]) + g[b, c, hw] * m[b, hw]  (mix, g = f_other;
//   exact f and g where m is 0 or 1, as the reference)
// A thread owns VEC consecutive hw positions of one b and a block of `channels_per_block`
// channels: it evaluates m for its positions once, keeps it in registers and walks its channels.
// A warp touches 32 * VEC consecutive elements of one plane per step (coalesced).
// Grid: x over hw packets, y over channel blocks, z over the batch; each grid-stride.
template <typename T, int VEC, bool MIX>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_plane_kernel(const SpatialMaskForwardArgs a, const int64_t channels_per_block) {
  const T* __restrict__ f = static_cast<const T*>(a.f);
  const T* __restrict__ g = static_cast<const T*>(a.f_other);
  T* __restrict__ o = static_cast<T*>(a.out);
  const int64_t HW = a.spatial;
  const int64_t packets = HW / VEC;  // HW % VEC == 0 whenever VEC > 1
  const int64_t channel_blocks = (a.channels + channels_per_block - 1) / channels_per_block;

  for (int64_t b = blockIdx.z; b < a.batch; b += gridDim.z) {
    for (int64_t cb = blockIdx.y; cb < channel_blocks; cb += gridDim.y) {
      const int64_t c0 = cb * channels_per_block;
      const int64_t c1 = min(a.channels, c0 + channels_per_block);
      for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packets;
           p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t hw = p * VEC;
        float m[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) m[i] = mask_value(a.mask, __ldg(a.logits + b * HW + hw + i));
        const T* fp = f + b * a.f_strides.batch + hw;
        const T* gp = MIX ? g + b * a.f_other_strides.batch + hw : nullptr;
        T* op = o + b * a.out_strides.batch + hw;
#pragma unroll 4
        for (int64_t c = c0; c < c1; ++c) {
          float x[VEC];
          load_packet(fp + c * a.f_strides.channel, x);
          if constexpr (MIX) {
            float y[VEC];
            load_packet(gp + c * a.f_other_strides.channel, y);
#pragma unroll
            for (int i = 0; i < VEC; ++i) x[i] = x[i] * (1.f - m[i]) + y[i] * m[i];
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) x[i] *= m[i];
          }
          store_packet(op + c * a.out_strides.channel, x);
        }
      }
    }
  }
}

// Forward, channel layout (same formulas). Block = (blockDim.x lanes along the channels) x
// (blockDim.y rows); a row is one (b, hw) position with one scalar m, whose contiguous C channels
// its lanes walk in VEC-element packets (a warp reads consecutive packets: coalesced).
// Grid: x over hw rows, y over the batch; each grid-stride.
template <typename T, int VEC, bool MIX>
__global__ void __launch_bounds__(kThreadsPerBlock) forward_channel_kernel(const SpatialMaskForwardArgs a) {
  const T* __restrict__ f = static_cast<const T*>(a.f);
  const T* __restrict__ g = static_cast<const T*>(a.f_other);
  T* __restrict__ o = static_cast<T*>(a.out);
  const int64_t HW = a.spatial;
  const int64_t packets = a.channels / VEC;  // C % VEC == 0 whenever VEC > 1

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    for (int64_t hw = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; hw < HW;
         hw += static_cast<int64_t>(gridDim.x) * blockDim.y) {
      const float m = mask_value(a.mask, __ldg(a.logits + b * HW + hw));
      const T* fp = f + b * a.f_strides.batch + hw * a.f_strides.spatial;
      const T* gp = MIX ? g + b * a.f_other_strides.batch + hw * a.f_other_strides.spatial : nullptr;
      T* op = o + b * a.out_strides.batch + hw * a.out_strides.spatial;
      for (int64_t p = threadIdx.x; p < packets; p += blockDim.x) {
        float x[VEC];
        load_packet(fp + p * VEC, x);
        if constexpr (MIX) {
          float y[VEC];
          load_packet(gp + p * VEC, y);
#pragma unroll
          for (int i = 0; i < VEC; ++i) x[i] = x[i] * (1.f - m) + y[i] * m;
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) x[i] *= m;
        }
        store_packet(op + p * VEC, x);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, plane layout.
//   no mix: dm[b, hw] = sum_c do * f,         df = do * m
//   mix:    dm[b, hw] = sum_c do * (g - f),   df = do * (1 - m),  dg = do * m
//   dlogits[b, hw] = dm[b, hw] * dm/dlogit
// Block = (32 lanes along hw) x (blockDim.y channel rows). Thread (x, y) owns the VEC positions
// [hw, hw + VEC) of one b and the channels y, y + blockDim.y, ...: it reads do, f (and g) once,
// writes df / dg in the same pass and keeps VEC partial sums of dm in registers. Each warp
// reads 32 * VEC consecutive elements of one plane per step (coalesced). The blockDim.y partial
// sums of every position are then added in shared memory (layout [y][i][x], conflict-free) by
// 32 * VEC threads, which write dlogits.
// Grid: x over tiles of 32 * VEC positions, y over the batch; each grid-stride.
template <typename T, int VEC, bool MIX>
__global__ void __launch_bounds__(1024) backward_plane_kernel(const SpatialMaskBackwardArgs a) {
  extern __shared__ float partial[];  // [blockDim.y][VEC][32]
  const T* __restrict__ d = static_cast<const T*>(a.grad_out);
  const T* __restrict__ f = static_cast<const T*>(a.f);
  const T* __restrict__ g = static_cast<const T*>(a.f_other);
  T* __restrict__ df = static_cast<T*>(a.df);
  T* __restrict__ dg = static_cast<T*>(a.df_other);
  const int64_t HW = a.spatial;
  const int64_t packets = HW / VEC;
  const int64_t tiles = (packets + 31) / 32;
  const int lane = threadIdx.x;
  const int row = threadIdx.y;
  const int rows = blockDim.y;
  const int tid = row * 32 + lane;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t p = tile * 32 + lane;
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
      if (p < packets) {
        const int64_t hw = p * VEC;
        float m[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) m[i] = mask_value(a.mask, __ldg(a.logits + b * HW + hw + i));
        const T* dp = d + b * a.grad_out_strides.batch + hw;
        const T* fp = f + b * a.f_strides.batch + hw;
        const T* gp = MIX ? g + b * a.f_other_strides.batch + hw : nullptr;
        T* dfp = df != nullptr ? df + b * a.df_strides.batch + hw : nullptr;
        T* dgp = dg != nullptr ? dg + b * a.df_other_strides.batch + hw : nullptr;
        // Two channels in flight per thread, except for the mix of 8-element packets (three
        // loaded packets per channel), where the second one would spill registers.
#pragma unroll(MIX && VEC > 4 ? 1 : 2)
        for (int64_t c = row; c < a.channels; c += rows) {
          float dv[VEC], x[VEC];
          load_packet(dp + c * a.grad_out_strides.channel, dv);
          load_packet(fp + c * a.f_strides.channel, x);
          if constexpr (MIX) {
            float y[VEC];
            load_packet(gp + c * a.f_other_strides.channel, y);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] += dv[i] * (y[i] - x[i]);
            if (dfp != nullptr) {
              float r[VEC];
#pragma unroll
              for (int i = 0; i < VEC; ++i) r[i] = dv[i] * (1.f - m[i]);
              store_packet(dfp + c * a.df_strides.channel, r);
            }
            if (dgp != nullptr) {
              float r[VEC];
#pragma unroll
              for (int i = 0; i < VEC; ++i) r[i] = dv[i] * m[i];
              store_packet(dgp + c * a.df_other_strides.channel, r);
            }
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] += dv[i] * x[i];
            if (dfp != nullptr) {
              float r[VEC];
#pragma unroll
              for (int i = 0; i < VEC; ++i) r[i] = dv[i] * m[i];
              store_packet(dfp + c * a.df_strides.channel, r);
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) partial[(row * VEC + i) * 32 + lane] = acc[i];
      __syncthreads();
      if (tid < 32 * VEC) {
        const int i = tid / 32;
        const int col = tid % 32;
        float dm = 0.f;
        for (int r = 0; r < rows; ++r) dm += partial[(r * VEC + i) * 32 + col];
        const int64_t pc = tile * 32 + col;
        if (pc < packets) {
          const int64_t pos = b * HW + pc * VEC + i;
          const float logit = __ldg(a.logits + pos);
          a.dlogits[pos] = logit_grad(a.mask, dm, logit, mask_value(a.mask, logit));
        }
      }
      __syncthreads();
    }
  }
}

// Backward, channel layout (same formulas). Block = (G lanes along the channels) x (256 / G
// rows), G a power of two <= 32; a row is one (b, hw) position with scalar m. Its G lanes walk
// the contiguous channels in VEC-element packets (coalesced), write df / dg, and reduce their
// partial dm with xor shuffles inside their aligned G-lane segment of the warp. Every thread
// of a block runs the same number of loop iterations, so all 32 lanes reach each shuffle.
// Grid: x over hw rows, y over the batch; each grid-stride.
template <typename T, int VEC, bool MIX>
__global__ void __launch_bounds__(kThreadsPerBlock) backward_channel_kernel(const SpatialMaskBackwardArgs a) {
  const T* __restrict__ d = static_cast<const T*>(a.grad_out);
  const T* __restrict__ f = static_cast<const T*>(a.f);
  const T* __restrict__ g = static_cast<const T*>(a.f_other);
  T* __restrict__ df = static_cast<T*>(a.df);
  T* __restrict__ dg = static_cast<T*>(a.df_other);
  const int64_t HW = a.spatial;
  const int64_t packets = a.channels / VEC;
  const int lanes = blockDim.x;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    for (int64_t hw0 = blockIdx.x * static_cast<int64_t>(blockDim.y); hw0 < HW;
         hw0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
      const int64_t hw = hw0 + threadIdx.y;
      float acc = 0.f;
      float logit = 0.f;
      float m = 0.f;
      if (hw < HW) {
        logit = __ldg(a.logits + b * HW + hw);
        m = mask_value(a.mask, logit);
        const T* dp = d + b * a.grad_out_strides.batch + hw * a.grad_out_strides.spatial;
        const T* fp = f + b * a.f_strides.batch + hw * a.f_strides.spatial;
        const T* gp = MIX ? g + b * a.f_other_strides.batch + hw * a.f_other_strides.spatial : nullptr;
        T* dfp = df != nullptr ? df + b * a.df_strides.batch + hw * a.df_strides.spatial : nullptr;
        T* dgp = dg != nullptr ? dg + b * a.df_other_strides.batch + hw * a.df_other_strides.spatial : nullptr;
        for (int64_t p = threadIdx.x; p < packets; p += lanes) {
          float dv[VEC], x[VEC];
          load_packet(dp + p * VEC, dv);
          load_packet(fp + p * VEC, x);
          if constexpr (MIX) {
            float y[VEC];
            load_packet(gp + p * VEC, y);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc += dv[i] * (y[i] - x[i]);
            if (dfp != nullptr) {
              float r[VEC];
#pragma unroll
              for (int i = 0; i < VEC; ++i) r[i] = dv[i] * (1.f - m);
              store_packet(dfp + p * VEC, r);
            }
            if (dgp != nullptr) {
              float r[VEC];
#pragma unroll
              for (int i = 0; i < VEC; ++i) r[i] = dv[i] * m;
              store_packet(dgp + p * VEC, r);
            }
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc += dv[i] * x[i];
            if (dfp != nullptr) {
              float r[VEC];
#pragma unroll
              for (int i = 0; i < VEC; ++i) r[i] = dv[i] * m;
              store_packet(dfp + p * VEC, r);
            }
          }
        }
      }
      for (int offset = lanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      if (hw < HW && threadIdx.x == 0) a.dlogits[b * HW + hw] = logit_grad(a.mask, acc, logit, m);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration.

int multiprocessor_count() {
  int device = 0;
  int count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    cudaGetLastError();
    return 108;
  }
  return count;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads the whole device keeps resident (2048 per SM on sm_80 / sm_90).
int64_t resident_threads() { return static_cast<int64_t>(multiprocessor_count()) * 2048; }

unsigned int grid_yz(int64_t n) { return static_cast<unsigned int>(n < 1 ? 1 : (n > kMaxGridYZ ? kMaxGridYZ : n)); }

// A grid.x of `needed` blocks, at most enough for `per_row_cap` blocks given grid.y (the loops
// are grid-stride, so fewer blocks stay correct).
unsigned int grid_x(int64_t needed, int64_t cap) {
  int64_t x = needed < 1 ? 1 : needed;
  if (x > cap) x = cap < 1 ? 1 : cap;
  if (x > kMaxGridX) x = kMaxGridX;
  return static_cast<unsigned int>(x);
}

// Smallest power of two >= n, capped at 32.
int lanes_for(int64_t packets) {
  int lanes = 1;
  while (lanes < 32 && lanes < packets) lanes *= 2;
  return lanes;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// A feature tensor can be read in VEC-element packets: 16-byte aligned base, and every stride
// that moves between packets a multiple of VEC.
bool packet_ok(const void* p, const FeatureStrides& s, MaskLayout layout, int vec) {
  if (p == nullptr) return true;
  if (!aligned16(p) || s.batch % vec != 0) return false;
  return layout == MaskLayout::kPlane ? s.channel % vec == 0 : s.spatial % vec == 0;
}

bool unit_stride_ok(const FeatureStrides& s, MaskLayout layout, int64_t channels, int64_t spatial) {
  return layout == MaskLayout::kPlane ? (spatial <= 1 || s.spatial == 1) : (channels <= 1 || s.channel == 1);
}

template <typename T, int VEC, bool MIX>
void forward_launch(const SpatialMaskForwardArgs& a, cudaStream_t stream) {
  const int64_t resident = resident_threads();
  if (a.layout == MaskLayout::kPlane) {
    const int64_t packets = a.spatial / VEC;
    const int threads = static_cast<int>(packets >= kThreadsPerBlock ? kThreadsPerBlock : ceil_div(packets, 32) * 32);
    const unsigned int gx = grid_x(ceil_div(packets, threads), kMaxGridX);
    const unsigned int gz = grid_yz(a.batch);
    // Split the channels until the grid holds about two device-fulls of threads.
    const int64_t per_block_row = static_cast<int64_t>(gx) * threads * gz;
    int64_t channel_blocks = ceil_div(2 * resident, per_block_row);
    if (channel_blocks > a.channels) channel_blocks = a.channels;
    if (channel_blocks < 1) channel_blocks = 1;
    const int64_t channels_per_block = ceil_div(a.channels, channel_blocks);
    const dim3 grid(gx, grid_yz(ceil_div(a.channels, channels_per_block)), gz);
    forward_plane_kernel<T, VEC, MIX><<<grid, threads, 0, stream>>>(a, channels_per_block);
  } else {
    const int lanes = lanes_for(a.channels / VEC);
    const int rows = kThreadsPerBlock / lanes;
    const unsigned int gy = grid_yz(a.batch);
    const unsigned int gx = grid_x(ceil_div(a.spatial, rows), ceil_div(4 * resident, static_cast<int64_t>(kThreadsPerBlock) * gy));
    forward_channel_kernel<T, VEC, MIX><<<dim3(gx, gy), dim3(lanes, rows), 0, stream>>>(a);
  }
}

template <typename T, int VEC, bool MIX>
void backward_launch(const SpatialMaskBackwardArgs& a, cudaStream_t stream) {
  const int64_t resident = resident_threads();
  if (a.layout == MaskLayout::kPlane) {
    const int64_t tiles = ceil_div(a.spatial / VEC, 32);
    const unsigned int gy = grid_yz(a.batch);
    const unsigned int gx = grid_x(tiles, kMaxGridX);
    // 8 channel rows per block; 16 or 32 when the (b, tile) grid alone would leave the device
    // short of threads and there are channels to share.
    int rows = 8;
    while (rows < 32 && static_cast<int64_t>(gx) * gy * 32 * rows < resident && a.channels >= 8 * rows) rows *= 2;
    const size_t shared = static_cast<size_t>(rows) * VEC * 32 * sizeof(float);
    backward_plane_kernel<T, VEC, MIX><<<dim3(gx, gy), dim3(32, rows), shared, stream>>>(a);
  } else {
    const int lanes = lanes_for(a.channels / VEC);
    const int rows = kThreadsPerBlock / lanes;
    const unsigned int gy = grid_yz(a.batch);
    const unsigned int gx = grid_x(ceil_div(a.spatial, rows), ceil_div(4 * resident, static_cast<int64_t>(kThreadsPerBlock) * gy));
    backward_channel_kernel<T, VEC, MIX><<<dim3(gx, gy), dim3(lanes, rows), 0, stream>>>(a);
  }
}

// Chooses the packet width (16 bytes when every pointer and stride allows it, else 1 element).
template <typename T>
cudaError_t forward_typed(const SpatialMaskForwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t packed_extent = a.layout == MaskLayout::kPlane ? a.spatial : a.channels;
  const bool vec = packed_extent % kVec == 0 && packet_ok(a.f, a.f_strides, a.layout, kVec) &&
                   packet_ok(a.f_other, a.f_other_strides, a.layout, kVec) &&
                   packet_ok(a.out, a.out_strides, a.layout, kVec);
  const bool mix = a.f_other != nullptr;
  if (vec) {
    mix ? forward_launch<T, kVec, true>(a, stream) : forward_launch<T, kVec, false>(a, stream);
  } else {
    mix ? forward_launch<T, 1, true>(a, stream) : forward_launch<T, 1, false>(a, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const SpatialMaskBackwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t packed_extent = a.layout == MaskLayout::kPlane ? a.spatial : a.channels;
  const bool vec = packed_extent % kVec == 0 && packet_ok(a.grad_out, a.grad_out_strides, a.layout, kVec) &&
                   packet_ok(a.f, a.f_strides, a.layout, kVec) &&
                   packet_ok(a.f_other, a.f_other_strides, a.layout, kVec) &&
                   packet_ok(a.df, a.df_strides, a.layout, kVec) &&
                   packet_ok(a.df_other, a.df_other_strides, a.layout, kVec);
  const bool mix = a.f_other != nullptr;
  if (vec) {
    mix ? backward_launch<T, kVec, true>(a, stream) : backward_launch<T, kVec, false>(a, stream);
  } else {
    mix ? backward_launch<T, 1, true>(a, stream) : backward_launch<T, 1, false>(a, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_spatial_mask_mul_forward(ElementType type, const SpatialMaskForwardArgs& args,
                                            cudaStream_t stream) {
  if (args.batch < 0 || args.channels < 0 || args.spatial < 0) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.channels == 0 || args.spatial == 0) return cudaSuccess;
  if (args.f == nullptr || args.out == nullptr || args.logits == nullptr) return cudaErrorInvalidValue;
  if (!unit_stride_ok(args.f_strides, args.layout, args.channels, args.spatial) ||
      !unit_stride_ok(args.out_strides, args.layout, args.channels, args.spatial) ||
      (args.f_other != nullptr && !unit_stride_ok(args.f_other_strides, args.layout, args.channels, args.spatial))) {
    return cudaErrorInvalidValue;
  }
  switch (type) {
    case ElementType::kFloat32:
      return forward_typed<float>(args, stream);
    case ElementType::kFloat16:
      return forward_typed<__half>(args, stream);
    case ElementType::kBFloat16:
      return forward_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_spatial_mask_mul_backward(ElementType type, const SpatialMaskBackwardArgs& args,
                                             cudaStream_t stream) {
  if (args.batch < 0 || args.channels < 0 || args.spatial < 0) return cudaErrorInvalidValue;
  // With C == 0 the kernels still run: dm = 0 and dlogits is written as zeros.
  if (args.batch == 0 || args.spatial == 0) return cudaSuccess;
  if (args.grad_out == nullptr && args.channels > 0) return cudaErrorInvalidValue;
  if (args.f == nullptr && args.channels > 0) return cudaErrorInvalidValue;
  if (args.logits == nullptr || args.dlogits == nullptr) return cudaErrorInvalidValue;
  if (args.f_other == nullptr && args.df_other != nullptr) return cudaErrorInvalidValue;
  const int64_t C = args.channels, HW = args.spatial;
  const bool strides_ok =
      unit_stride_ok(args.grad_out_strides, args.layout, C, HW) && unit_stride_ok(args.f_strides, args.layout, C, HW) &&
      (args.f_other == nullptr || unit_stride_ok(args.f_other_strides, args.layout, C, HW)) &&
      (args.df == nullptr || unit_stride_ok(args.df_strides, args.layout, C, HW)) &&
      (args.df_other == nullptr || unit_stride_ok(args.df_other_strides, args.layout, C, HW));
  if (!strides_ok) return cudaErrorInvalidValue;
  switch (type) {
    case ElementType::kFloat32:
      return backward_typed<float>(args, stream);
    case ElementType::kFloat16:
      return backward_typed<__half>(args, stream);
    case ElementType::kBFloat16:
      return backward_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fmn
