// Autograd of fmn::spatial_mask_mul in C++, for the CPU and CUDA kernels alike (registered at the
// Autograd key in csrc/bindings.cpp). A Python autograd (torch.library.register_autograd) costs
// tens of microseconds of host time per call and per backward, which is the whole budget of a
// launch-bound step on a GPU; here the forward and the backward each cost one dispatcher call.
//
//   forward:  o = f * act(min(u, max_logit))              (f_other absent)
//             o = f * (1 - m) + f_other * m, m = act(...)  (f_other present)
//   backward: (df, du, df_other) = fmn::spatial_mask_mul_backward(do, f, u, f_other, ...)
//             computing df only when f needs a gradient and df_other only when f_other does.
//
// With create_graph=True (gradients of gradients) the fused backward, which is not itself
// differentiable, is replaced by autograd through the reference below (the same math in ATen
// ops, half inputs computed in float32), so double backward is exact on every backend.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <string>
#include <tuple>

namespace fmn {

inline at::Tensor spatial_mask_mul_reference(const at::Tensor& f, const at::Tensor& logits,
                                             const std::optional<at::Tensor>& f_other,
                                             const std::string& activation, std::optional<double> max_logit) {
  const bool half = f.scalar_type() == at::kHalf || f.scalar_type() == at::kBFloat16;
  const auto acc = half ? at::kFloat : f.scalar_type();
  at::Tensor u = logits.to(acc);
  if (max_logit.has_value()) u = u.clamp_max(*max_logit);
  at::Tensor m;
  if (activation == "exp_relu") {
    m = u.relu().exp();
  } else if (activation == "sigmoid") {
    m = u.sigmoid();
  } else {
    m = u;
  }
  m = m.reshape({f.size(0), 1, f.size(2), f.size(3)});
  at::Tensor out = f_other.has_value() && f_other->defined()
                       ? f.to(acc).mul(m.neg().add(1)).add(f_other->to(acc).mul(m))
                       : f.to(acc).mul(m);
  return out.to(f.scalar_type());
}

class SpatialMaskMulFunction : public torch::autograd::Function<SpatialMaskMulFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& f, const at::Tensor& logits,
                            const std::optional<at::Tensor>& f_other, c10::string_view activation,
                            std::optional<double> max_logit) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fmn::spatial_mask_mul", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           c10::string_view, std::optional<double>)>();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = op.call(f, logits, f_other, activation, max_logit);
    }
    const bool has_other = f_other.has_value() && f_other->defined();
    ctx->save_for_backward({f, logits, has_other ? *f_other : at::Tensor()});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_max_logit"] = max_logit.has_value();
    ctx->saved_data["max_logit"] = max_logit.value_or(0.0);
    ctx->saved_data["has_other"] = has_other;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fmn::spatial_mask_mul_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, c10::string_view, std::optional<double>, bool, bool)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& f = saved[0];
    const at::Tensor& logits = saved[1];
    const bool has_other = ctx->saved_data["has_other"].toBool();
    const std::optional<at::Tensor> f_other = has_other ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::optional<double> max_logit =
        ctx->saved_data["has_max_logit"].toBool() ? std::optional<double>(ctx->saved_data["max_logit"].toDouble())
                                                  : std::nullopt;
    const bool need_df = ctx->needs_input_grad(0);
    const bool need_logits = ctx->needs_input_grad(1);
    const bool need_other = has_other && ctx->needs_input_grad(2);
    torch::autograd::variable_list grads(5);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;

    const bool graph = at::GradMode::is_enabled() &&
                       (grad_out.requires_grad() || f.requires_grad() || logits.requires_grad() ||
                        (has_other && f_other->requires_grad()));
    if (graph) {
      // create_graph=True: differentiate the reference, keeping its graph.
      torch::autograd::variable_list inputs;
      if (need_df) inputs.push_back(f);
      if (need_logits) inputs.push_back(logits);
      if (need_other) inputs.push_back(*f_other);
      if (inputs.empty()) return grads;
      const at::Tensor out = spatial_mask_mul_reference(f, logits, f_other, activation, max_logit);
      const auto g = torch::autograd::grad({out}, inputs, {grad_out}, /*retain_graph=*/true,
                                           /*create_graph=*/true, /*allow_unused=*/true);
      size_t i = 0;
      if (need_df) grads[0] = g[i++];
      if (need_logits) grads[1] = g[i++];
      if (need_other) grads[2] = g[i++];
      return grads;
    }
    auto [df, dlogits, dother] = op.call(grad_out, f, logits, f_other, activation, max_logit, need_df, need_other);
    if (need_df) grads[0] = df;
    if (need_logits) grads[1] = dlogits;
    if (need_other) grads[2] = dother;
    return grads;
  }
};

// The Autograd-key kernel of fmn::spatial_mask_mul.
inline at::Tensor spatial_mask_mul_autograd(const at::Tensor& f, const at::Tensor& logits,
                                            const std::optional<at::Tensor>& f_other, c10::string_view activation,
                                            std::optional<double> max_logit) {
  return SpatialMaskMulFunction::apply(f, logits, f_other, activation, max_logit);
}

}  // namespace fmn
