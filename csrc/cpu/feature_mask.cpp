// CPU kernels of the feature-mask op, and the input planning shared with the CUDA glue.
//
// Forward:   u = min(logits, max_logit) (if given),  m = act(u)
//            o = f * m                      (no mix)
//            o = f * (1 - m) + f_other * m  (mix)
// Backward, given do = grad_out:
//            no mix: df = do * m,            dm = sum_c do * f
//            mix:    df = do * (1 - m),      df_other = do * m,   dm = sum_c do * (f_other - f)
//            dlogits = dm * act'(u) where logits <= max_logit, else 0
//            act'(u) = m where u > 0, else 0 (exp_relu),  m * (1 - m) (sigmoid),  1 (identity)
//            (the gates select, as torch's relu and clamp backward: 0 even where dm is inf/NaN)
//
// m is computed once per (b, hw) and reused for every channel. Sums are accumulated in float32
// for float16/bfloat16/float32 and in float64 for float64.
#include "cpu/feature_mask.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace fmn {
namespace spatial_mask {

namespace {

const char* layout_name(Layout layout) { return layout == Layout::kPlane ? "plane" : "channel"; }

Activation parse_activation(const char* op_name, c10::string_view name) {
  if (name == "exp_relu") return Activation::kExpRelu;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "identity") return Activation::kIdentity;
  TORCH_CHECK(false, op_name, ": unknown activation '", std::string(name),
              "'; expected one of exp_relu, sigmoid, identity");
}

// (B, C, H, W) strides seen as (B, C, H*W); false when H and W do not merge into one dimension.
bool merge_spatial(const at::Tensor& t, Strides3& s) {
  const int64_t h = t.size(2), w = t.size(3);
  s.batch = t.size(0) == 1 ? 0 : t.stride(0);
  s.channel = t.size(1) == 1 ? 0 : t.stride(1);
  if (h * w <= 1) {
    s.spatial = 0;
  } else if (h == 1) {
    s.spatial = t.stride(3);
  } else if (w == 1) {
    s.spatial = t.stride(2);
  } else if (t.stride(2) == w * t.stride(3)) {
    s.spatial = t.stride(3);
  } else {
    return false;
  }
  return true;
}

bool in_layout(const at::Tensor& t, Layout layout) {
  Strides3 s{};
  if (!merge_spatial(t, s)) return false;
  const int64_t channels = t.size(1), spatial = t.size(2) * t.size(3);
  if (layout == Layout::kPlane) return spatial <= 1 || s.spatial == 1;
  return channels <= 1 || s.channel == 1;
}

at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::kPlane ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

at::Tensor into_layout(const at::Tensor& t, Layout layout) {
  return in_layout(t, layout) ? t : t.contiguous(memory_format_of(layout));
}

void check_feature_tensor(const char* op_name, const char* what, const at::Tensor& t,
                          const at::Tensor& f) {
  TORCH_CHECK(t.sizes() == f.sizes(), op_name, ": ", what, " must have the shape of f ", f.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.device() == f.device(), op_name, ": ", what, " must be on f's device ", f.device(),
              ", got ", t.device());
}

}  // namespace

Problem plan(const char* op_name,
             c10::DeviceType device_type,
             bool allow_double,
             at::ScalarType logits_dtype,
             const at::Tensor* grad_out,
             const at::Tensor& f,
             const at::Tensor& logits,
             const std::optional<at::Tensor>& f_other,
             c10::string_view activation,
             std::optional<double> max_logit) {
  Problem p;
  p.activation = parse_activation(op_name, activation);
  p.clamp = max_logit.has_value();
  p.max_logit = max_logit.value_or(0.0);

  TORCH_CHECK(f.defined(), op_name, ": f is undefined");
  TORCH_CHECK(f.dim() == 4, op_name, ": f must be 4-D (B, C, H, W), got shape ", f.sizes());
  TORCH_CHECK(f.device().type() == device_type, op_name, ": this kernel runs on ",
              c10::DeviceTypeName(device_type), " tensors, got f on ", f.device());
  const auto dtype = f.scalar_type();
  const bool dtype_ok = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                        (allow_double && dtype == at::kDouble);
  TORCH_CHECK(dtype_ok, op_name, ": f must be ",
              allow_double ? "float32, float64, float16 or bfloat16" : "float32, float16 or bfloat16",
              " on ", c10::DeviceTypeName(device_type), ", got ", dtype);

  p.batch = f.size(0);
  p.channels = f.size(1);
  p.spatial = f.size(2) * f.size(3);

  TORCH_CHECK(logits.defined(), op_name, ": logits is undefined");
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == p.batch && logits.size(1) == p.spatial, op_name,
              ": logits must have shape (B, H*W) = (", p.batch, ", ", p.spatial, ") for f of shape ",
              f.sizes(), ", got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op_name,
              ": logits must be a floating-point tensor, got ", logits.scalar_type());
  TORCH_CHECK(logits.device() == f.device(), op_name, ": logits must be on f's device ", f.device(),
              ", got ", logits.device());

  at::Tensor other;
  if (f_other.has_value() && f_other->defined()) {
    other = *f_other;
    check_feature_tensor(op_name, "f_other", other, f);
    TORCH_CHECK(other.scalar_type() == dtype, op_name, ": f_other must have f's dtype ", dtype,
                ", got ", other.scalar_type());
  }
  at::Tensor grad;
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->defined(), op_name, ": grad_out is undefined");
    grad = *grad_out;
    check_feature_tensor(op_name, "grad_out", grad, f);
    TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op_name,
                ": grad_out must be a floating-point tensor, got ", grad.scalar_type());
    if (grad.scalar_type() != dtype) grad = grad.to(dtype);
  }

  // The layout is f's when f is in one; where f fits both (C == 1 or H*W == 1), the one that
  // the other tensors fit as well.
  const bool f_plane = in_layout(f, Layout::kPlane);
  const bool f_channel = in_layout(f, Layout::kChannel);
  if (f_plane && f_channel) {
    auto all_fit = [&](Layout layout) {
      return (!other.defined() || in_layout(other, layout)) && (!grad.defined() || in_layout(grad, layout));
    };
    p.layout = (!all_fit(Layout::kPlane) && all_fit(Layout::kChannel)) ? Layout::kChannel : Layout::kPlane;
  } else if (f_plane) {
    p.layout = Layout::kPlane;
  } else if (f_channel) {
    p.layout = Layout::kChannel;
  } else {
    p.layout = f.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? Layout::kChannel
                                                                             : Layout::kPlane;
  }
  p.f = into_layout(f, p.layout);
  if (other.defined()) p.f_other = into_layout(other, p.layout);
  if (grad.defined()) p.grad_out = into_layout(grad, p.layout);
  p.logits = logits.to(logits_dtype).contiguous();
  return p;
}

Strides3 strides_in(const at::Tensor& t, Layout layout) {
  Strides3 s{};
  const bool merged = merge_spatial(t, s);
  TORCH_INTERNAL_ASSERT(merged && in_layout(t, layout), "fmn: tensor of shape ", t.sizes(),
                        " and strides ", t.strides(), " is not in the ", layout_name(layout), " layout");
  if (layout == Layout::kPlane) {
    s.spatial = 1;
  } else {
    s.channel = 1;
  }
  return s;
}

Output allocate_output(const at::Tensor& like, Layout layout) {
  Output out;
  out.result = at::empty_like(like);
  out.target = in_layout(out.result, layout)
                   ? out.result
                   : at::empty(like.sizes(), like.options().memory_format(memory_format_of(layout)));
  return out;
}

void Output::finish() {
  if (!target.is_same(result)) result.copy_(target);
}

at::Tensor dlogits_like(const at::Tensor& logits, const at::Tensor& dlogits_acc) {
  if (logits.scalar_type() == dlogits_acc.scalar_type() && logits.is_contiguous()) return dlogits_acc;
  at::Tensor dlogits = at::empty_like(logits);
  dlogits.copy_(dlogits_acc);
  return dlogits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_results(Output& df, bool need_df, Output& df_other,
                                                                bool need_dother, const at::Tensor& f,
                                                                const at::Tensor& logits,
                                                                const at::Tensor& dlogits_buffer) {
  at::Tensor df_result = at::empty({0}, f.options());
  if (need_df) {
    df.finish();
    df_result = df.result;
  }
  at::Tensor dg_result = at::empty({0}, f.options());
  if (need_dother) {
    df_other.finish();
    dg_result = df_other.result;
  }
  return {df_result, dlogits_like(logits, dlogits_buffer), dg_result};
}

}  // namespace spatial_mask

namespace cpu {
namespace {

using spatial_mask::Activation;
using spatial_mask::Layout;
using spatial_mask::Problem;
using spatial_mask::Strides3;

// Elements a parallel chunk should hold at least, so that small problems stay on one thread.
constexpr int64_t kMinChunkElements = 1 << 15;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinChunkElements / std::max<int64_t>(elements_per_item, 1));
}

// m = act(min(logits, max_logit)) for all (b, hw): a (B, H*W) tensor in the accumulation dtype,
// computed once by ATen's vectorised elementwise ops and then reused for every channel.
at::Tensor mask_values(const Problem& p) {
  const at::Tensor u = p.clamp ? p.logits.clamp_max(p.max_logit) : p.logits;
  switch (p.activation) {
    case Activation::kExpRelu:
      return u.clamp_min(0).exp_();
    case Activation::kSigmoid:
      return u.sigmoid();
    case Activation::kIdentity:
      break;
  }
  return u;
}

// dlogit at one position, given dm = sum_c do * f (or do * (g - f)), the logit and
// m = act(min(logit, max_logit)):
//   exp_relu: dm * m, and 0 where u <= 0   (0 at u == 0 exactly, as torch's relu backward)
//   sigmoid:  dm * m * (1 - m)
//   identity: dm
// and 0 where logit > max_logit when clamping (torch.clamp's backward passes at equality).
// A closed gate gives 0 even where dm is inf or NaN, and a NaN logit is never gated by the ReLU,
// as torch's relu and clamp backward select rather than multiply.
template <typename acc_t>
struct LogitGrad {
  Activation activation;
  bool clamp;
  acc_t max_logit;

  acc_t operator()(acc_t dm, acc_t logit, acc_t m) const {
    if (clamp && !(logit <= max_logit)) return acc_t(0);
    switch (activation) {
      case Activation::kExpRelu:
        return logit <= acc_t(0) ? acc_t(0) : dm * m;
      case Activation::kSigmoid:
        return dm * (m * (acc_t(1) - m));
      case Activation::kIdentity:
        break;
    }
    return dm;
  }
};

template <typename acc_t>
LogitGrad<acc_t> logit_grad(const Problem& p) {
  return LogitGrad<acc_t>{p.activation, p.clamp, static_cast<acc_t>(p.max_logit)};
}

template <typename scalar_t>
struct FeaturePointers {
  const scalar_t* f;
  Strides3 fs;
  const scalar_t* g;  // f_other
  Strides3 gs;
};

// ---------------------------------------------------------------------------------------------
// Forward, plane layout. One work item = one (b, c) plane: the contiguous row f[b, c, 0:HW] is
// multiplied by the row m[b, 0:HW] (which stays in L1 across the channels of b):
//   o[b, c, hw] = f[b, c, hw] * m[b, hw]                                 (no mix)
//   o[b, c, hw] = f[b, c, hw] * (1 - m[b, hw]) + g[b, c, hw] * m[b, hw]   (mix, g = f_other;
//   this form gives f and g exactly where m is 0 or 1, as the reference does)
template <typename scalar_t, typename acc_t, bool MIX>
void forward_plane(const Problem& p, const acc_t* mask, const FeaturePointers<scalar_t>& in, scalar_t* out,
                   Strides3 os) {
  const int64_t C = p.channels, HW = p.spatial;
  at::parallel_for(0, p.batch * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / C;
      const int64_t c = item - b * C;
      const acc_t* __restrict__ m = mask + b * HW;
      const scalar_t* __restrict__ fp = in.f + b * in.fs.batch + c * in.fs.channel;
      scalar_t* __restrict__ op = out + b * os.batch + c * os.channel;
      if constexpr (MIX) {
        const scalar_t* __restrict__ gp = in.g + b * in.gs.batch + c * in.gs.channel;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) {
          op[i] = static_cast<scalar_t>(static_cast<acc_t>(fp[i]) * (acc_t(1) - m[i]) + static_cast<acc_t>(gp[i]) * m[i]);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) op[i] = static_cast<scalar_t>(static_cast<acc_t>(fp[i]) * m[i]);
      }
    }
  });
}

// Forward, channel layout. One work item = one (b, hw) position: its contiguous C channels are
// multiplied by the scalar m[b, hw] (same formulas as forward_plane).
template <typename scalar_t, typename acc_t, bool MIX>
void forward_channel(const Problem& p, const acc_t* mask, const FeaturePointers<scalar_t>& in, scalar_t* out,
                     Strides3 os) {
  const int64_t C = p.channels, HW = p.spatial;
  at::parallel_for(0, p.batch * HW, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / HW;
      const int64_t hw = row - b * HW;
      const acc_t m = mask[row];
      const scalar_t* __restrict__ fp = in.f + b * in.fs.batch + hw * in.fs.spatial;
      scalar_t* __restrict__ op = out + b * os.batch + hw * os.spatial;
      if constexpr (MIX) {
        const scalar_t* __restrict__ gp = in.g + b * in.gs.batch + hw * in.gs.spatial;
        const acc_t keep = acc_t(1) - m;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          op[c] = static_cast<scalar_t>(static_cast<acc_t>(fp[c]) * keep + static_cast<acc_t>(gp[c]) * m);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) op[c] = static_cast<scalar_t>(static_cast<acc_t>(fp[c]) * m);
      }
    }
  });
}

template <typename scalar_t>
struct GradPointers {
  const scalar_t* grad;
  Strides3 grad_s;
  scalar_t* df;  // nullptr: not needed
  Strides3 df_s;
  scalar_t* dg;  // df_other; nullptr: not needed
  Strides3 dg_s;
};

// Spatial tile of the plane-layout backward: the whole H*W row when the batch alone gives every
// thread work, else split so that B * tiles >= 2 * threads (tiles of at least 256 positions).
int64_t backward_plane_tile(int64_t batch, int64_t spatial) {
  const int64_t threads = at::get_num_threads();
  const int64_t max_split = std::max<int64_t>(1, spatial / 256);
  const int64_t split = std::min(max_split, std::max<int64_t>(1, (2 * threads + batch - 1) / std::max<int64_t>(batch, 1)));
  const int64_t tile = (spatial + split - 1) / split;
  return std::max<int64_t>(1, (tile + 15) / 16 * 16);
}

// Backward, plane layout. One work item = (b, spatial tile [hw0, hw0 + n)). Channel by channel,
// the contiguous rows of do, f (and g = f_other) are read once; in the same pass
//   dm[hw] += do * f                      df = do * m                    (no mix)
//   dm[hw] += do * (g - f)                df = do * (1 - m), dg = do * m (mix)
// and at the end dlogits[b, hw] = dlogit(dm[hw]) (LogitGrad).
template <typename scalar_t, typename acc_t, bool MIX, bool NEED_DF, bool NEED_DG>
void backward_plane(const Problem& p, const acc_t* mask, const FeaturePointers<scalar_t>& in,
                    const GradPointers<scalar_t>& gr, acc_t* dlogits) {
  const int64_t B = p.batch, C = p.channels, HW = p.spatial;
  const int64_t tile = backward_plane_tile(B, HW);
  const int64_t tiles = (HW + tile - 1) / tile;
  const acc_t* logits = p.logits.const_data_ptr<acc_t>();
  const auto dlogit = logit_grad<acc_t>(p);

  at::parallel_for(0, B * tiles, grain_for(C * tile), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dm_buffer(static_cast<size_t>(tile));
    acc_t* __restrict__ dm = dm_buffer.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles;
      const int64_t hw0 = (item - b * tiles) * tile;
      const int64_t n = std::min(tile, HW - hw0);
      const acc_t* __restrict__ m = mask + b * HW + hw0;
      std::fill(dm, dm + n, acc_t(0));
      int64_t c = 0;
      if constexpr (!MIX && !NEED_DF) {
        // Pure reduction (no full-size output): four channels per pass over dm,
        //   dm[hw] += sum_{j < 4} do[b, c + j, hw] * f[b, c + j, hw],
        // so that dm is loaded and stored once per four channels.
        for (; c + 4 <= C; c += 4) {
          const scalar_t* dq = gr.grad + b * gr.grad_s.batch + c * gr.grad_s.channel + hw0;
          const scalar_t* fq = in.f + b * in.fs.batch + c * in.fs.channel + hw0;
          const int64_t ds = gr.grad_s.channel, fs = in.fs.channel;
          const scalar_t* __restrict__ d0 = dq;
          const scalar_t* __restrict__ d1 = dq + ds;
          const scalar_t* __restrict__ d2 = dq + 2 * ds;
          const scalar_t* __restrict__ d3 = dq + 3 * ds;
          const scalar_t* __restrict__ f0 = fq;
          const scalar_t* __restrict__ f1 = fq + fs;
          const scalar_t* __restrict__ f2 = fq + 2 * fs;
          const scalar_t* __restrict__ f3 = fq + 3 * fs;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            dm[i] += (static_cast<acc_t>(d0[i]) * static_cast<acc_t>(f0[i]) +
                      static_cast<acc_t>(d1[i]) * static_cast<acc_t>(f1[i])) +
                     (static_cast<acc_t>(d2[i]) * static_cast<acc_t>(f2[i]) +
                      static_cast<acc_t>(d3[i]) * static_cast<acc_t>(f3[i]));
          }
        }
      }
      for (; c < C; ++c) {
        const scalar_t* __restrict__ dp = gr.grad + b * gr.grad_s.batch + c * gr.grad_s.channel + hw0;
        const scalar_t* __restrict__ fp = in.f + b * in.fs.batch + c * in.fs.channel + hw0;
        scalar_t* __restrict__ dfp = NEED_DF ? gr.df + b * gr.df_s.batch + c * gr.df_s.channel + hw0 : nullptr;
        if constexpr (MIX) {
          const scalar_t* __restrict__ gp = in.g + b * in.gs.batch + c * in.gs.channel + hw0;
          scalar_t* __restrict__ dgp = NEED_DG ? gr.dg + b * gr.dg_s.batch + c * gr.dg_s.channel + hw0 : nullptr;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const acc_t d = static_cast<acc_t>(dp[i]);
            dm[i] += d * (static_cast<acc_t>(gp[i]) - static_cast<acc_t>(fp[i]));
            if constexpr (NEED_DF) dfp[i] = static_cast<scalar_t>(d * (acc_t(1) - m[i]));
            if constexpr (NEED_DG) dgp[i] = static_cast<scalar_t>(d * m[i]);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const acc_t d = static_cast<acc_t>(dp[i]);
            dm[i] += d * static_cast<acc_t>(fp[i]);
            if constexpr (NEED_DF) dfp[i] = static_cast<scalar_t>(d * m[i]);
          }
        }
      }
      const acc_t* lp = logits + b * HW + hw0;
      acc_t* dl = dlogits + b * HW + hw0;
      for (int64_t i = 0; i < n; ++i) dl[i] = dlogit(dm[i], lp[i], m[i]);
    }
  });
}

// Backward, channel layout. One work item = one (b, hw) position: dm is a dot product over its
// contiguous C channels of do and f (or g - f), with df / dg written in the same pass (same
// formulas as backward_plane).
template <typename scalar_t, typename acc_t, bool MIX, bool NEED_DF, bool NEED_DG>
void backward_channel(const Problem& p, const acc_t* mask, const FeaturePointers<scalar_t>& in,
                      const GradPointers<scalar_t>& gr, acc_t* dlogits) {
  const int64_t C = p.channels, HW = p.spatial;
  const acc_t* logits = p.logits.const_data_ptr<acc_t>();
  const auto dlogit = logit_grad<acc_t>(p);

  at::parallel_for(0, p.batch * HW, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / HW;
      const int64_t hw = row - b * HW;
      const acc_t m = mask[row];
      const scalar_t* __restrict__ dp = gr.grad + b * gr.grad_s.batch + hw * gr.grad_s.spatial;
      const scalar_t* __restrict__ fp = in.f + b * in.fs.batch + hw * in.fs.spatial;
      scalar_t* __restrict__ dfp = NEED_DF ? gr.df + b * gr.df_s.batch + hw * gr.df_s.spatial : nullptr;
      acc_t dot = 0;
      if constexpr (MIX) {
        const scalar_t* __restrict__ gp = in.g + b * in.gs.batch + hw * in.gs.spatial;
        scalar_t* __restrict__ dgp = NEED_DG ? gr.dg + b * gr.dg_s.batch + hw * gr.dg_s.spatial : nullptr;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(dp[c]);
          dot += d * (static_cast<acc_t>(gp[c]) - static_cast<acc_t>(fp[c]));
          if constexpr (NEED_DF) dfp[c] = static_cast<scalar_t>(d * (acc_t(1) - m));
          if constexpr (NEED_DG) dgp[c] = static_cast<scalar_t>(d * m);
        }
      } else {
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(dp[c]);
          dot += d * static_cast<acc_t>(fp[c]);
          if constexpr (NEED_DF) dfp[c] = static_cast<scalar_t>(d * m);
        }
      }
      dlogits[row] = dlogit(dot, logits[row], m);
    }
  });
}

// float64 accumulates in float64; every other dtype in float32.
at::ScalarType accumulate_dtype(const at::Tensor& f) {
  return f.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t>
FeaturePointers<scalar_t> feature_pointers(const Problem& p) {
  FeaturePointers<scalar_t> in{};
  in.f = p.f.const_data_ptr<scalar_t>();
  in.fs = spatial_mask::strides_in(p.f, p.layout);
  if (p.f_other.defined()) {
    in.g = p.f_other.const_data_ptr<scalar_t>();
    in.gs = spatial_mask::strides_in(p.f_other, p.layout);
  }
  return in;
}

template <bool B0, bool B1, bool B2, typename Fn>
void with_flags(Fn&& fn) {
  fn(std::integral_constant<bool, B0>{}, std::integral_constant<bool, B1>{}, std::integral_constant<bool, B2>{});
}

// Calls fn(mix, need_df, need_dg) with the three flags as compile-time constants.
template <typename Fn>
void dispatch_flags(bool mix, bool need_df, bool need_dg, Fn&& fn) {
  if (mix) {
    if (need_df) {
      need_dg ? with_flags<true, true, true>(fn) : with_flags<true, true, false>(fn);
    } else {
      need_dg ? with_flags<true, false, true>(fn) : with_flags<true, false, false>(fn);
    }
  } else {
    need_df ? with_flags<false, true, false>(fn) : with_flags<false, false, false>(fn);
  }
}

}  // namespace

at::Tensor spatial_mask_mul(const at::Tensor& f,
                            const at::Tensor& logits,
                            const std::optional<at::Tensor>& f_other,
                            c10::string_view activation,
                            std::optional<double> max_logit) {
  constexpr const char* op = "fmn::spatial_mask_mul";
  const Problem p = spatial_mask::plan(op, c10::DeviceType::CPU, /*allow_double=*/true, accumulate_dtype(f),
                                       nullptr, f, logits, f_other, activation, max_logit);
  spatial_mask::Output out = spatial_mask::allocate_output(f, p.layout);
  if (out.result.numel() == 0) return out.result;
  const Strides3 os = spatial_mask::strides_in(out.target, p.layout);
  const bool mix = p.f_other.defined();
  const at::Tensor mask = mask_values(p);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.f.scalar_type(), "fmn_spatial_mask_mul_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto in = feature_pointers<scalar_t>(p);
    const acc_t* m = mask.const_data_ptr<acc_t>();
    scalar_t* o = out.target.mutable_data_ptr<scalar_t>();
    if (p.layout == Layout::kPlane) {
      mix ? forward_plane<scalar_t, acc_t, true>(p, m, in, o, os)
          : forward_plane<scalar_t, acc_t, false>(p, m, in, o, os);
    } else {
      mix ? forward_channel<scalar_t, acc_t, true>(p, m, in, o, os)
          : forward_channel<scalar_t, acc_t, false>(p, m, in, o, os);
    }
  });
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
  const Problem p = spatial_mask::plan(op, c10::DeviceType::CPU, /*allow_double=*/true, accumulate_dtype(f),
                                       &grad_out, f, logits, f_other, activation, max_logit);
  const bool mix = p.f_other.defined();
  const bool need_dg = mix && need_dother;
  const auto acc_dtype = p.logits.scalar_type();

  spatial_mask::Output df, dg;
  if (need_df) df = spatial_mask::allocate_output(f, p.layout);
  if (need_dg) dg = spatial_mask::allocate_output(f, p.layout);
  // dlogits in the accumulation dtype; converted to the logits' dtype at the end if that differs.
  at::Tensor dlogits_acc = at::empty({p.batch, p.spatial}, logits.options().dtype(acc_dtype));

  if (p.batch * p.spatial > 0) {
    const at::Tensor mask = mask_values(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.f.scalar_type(), "fmn_spatial_mask_mul_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const auto in = feature_pointers<scalar_t>(p);
      GradPointers<scalar_t> gr{};
      gr.grad = p.grad_out.const_data_ptr<scalar_t>();
      gr.grad_s = spatial_mask::strides_in(p.grad_out, p.layout);
      if (need_df) {
        gr.df = df.target.mutable_data_ptr<scalar_t>();
        gr.df_s = spatial_mask::strides_in(df.target, p.layout);
      }
      if (need_dg) {
        gr.dg = dg.target.mutable_data_ptr<scalar_t>();
        gr.dg_s = spatial_mask::strides_in(dg.target, p.layout);
      }
      const acc_t* m = mask.const_data_ptr<acc_t>();
      acc_t* dl = dlogits_acc.mutable_data_ptr<acc_t>();
      dispatch_flags(mix, need_df, need_dg, [&](auto mix_c, auto df_c, auto dg_c) {
        constexpr bool kMix = decltype(mix_c)::value;
        constexpr bool kDf = decltype(df_c)::value;
        constexpr bool kDg = decltype(dg_c)::value;
        if (p.layout == Layout::kPlane) {
          backward_plane<scalar_t, acc_t, kMix, kDf, kDg>(p, m, in, gr, dl);
        } else {
          backward_channel<scalar_t, acc_t, kMix, kDf, kDg>(p, m, in, gr, dl);
        }
      });
    });
  }

  return spatial_mask::backward_results(df, need_df, dg, need_dg, f, logits, dlogits_acc);
}

}  // namespace cpu
}  // namespace fmn
