// k-reciprocal re-ranking (fmn::rerank), sparse CPU pipeline. Semantics: DESIGN.md section 3
// and fmn_kernels/rerank.py.
//
// query (q, d), gallery (g, d): float32, contiguous. N = q + g, queries first.
// k_forward / k_half / k_qe: neighbour list lengths (capped at N) for R, Rh and the query
// expansion. square_twice: working distance d2^2. raw_weights: V = softmax(-w) on the raw working
// distance (faiss_compat); else exp(-w / rowmax) normalised. clamp_jaccard: J = max(J, 0).
// topk = 0: returns ((q, g) re-ranked distances, empty); topk = m: ((q, m) values, (q, m) int64
// gallery indices), the m smallest per row in (value, index) order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fmn {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> rerank(
    const at::Tensor& query,
    const at::Tensor& gallery,
    int64_t k_forward,
    int64_t k_half,
    int64_t k_qe,
    double lambda_value,
    bool square_twice,
    bool raw_weights,
    bool clamp_jaccard,
    int64_t topk);

}  // namespace cpu
}  // namespace fmn
