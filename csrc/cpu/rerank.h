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

// Building blocks of the sharded pipeline (fmn_kernels/rerank_distributed.py), see rerank.cpp.
void rerank_knn_update(
    const at::Tensor& rows_x, const at::Tensor& rows_f, const at::Tensor& rows_sq, const at::Tensor& row_ids,
    const at::Tensor& cols_x, const at::Tensor& cols_f, const at::Tensor& cols_sq, int64_t col0, int64_t cap,
    at::Tensor cand_val, at::Tensor cand_exact, at::Tensor cand_idx, at::Tensor cand_count, at::Tensor rowmax);

void rerank_overlap(const at::Tensor& qcols, const at::Tensor& qvals, const at::Tensor& col_ptr,
                    const at::Tensor& inv_item, const at::Tensor& inv_val, int64_t item0, int64_t item1, at::Tensor out);

at::Tensor rerank_sqdist_pairs(const at::Tensor& a, const at::Tensor& ai, const at::Tensor& b, const at::Tensor& bi);

}  // namespace cpu
}  // namespace fmn
