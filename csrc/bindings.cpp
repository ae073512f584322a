// The one file that registers fmn's compiled kernels as torch ops (namespace `fmn`).
// Schemas and the autograd of spatial_mask_mul (csrc/feature_mask_autograd.h) live here; fake
// (meta) kernels are registered in Python (fmn_kernels/feature_mask.py, fmn_kernels/rerank.py).
// CPU kernels take at::Tensor (csrc/cpu); CUDA kernels take raw pointers and a stream
// (csrc/cuda) and are wrapped in csrc/cuda/feature_mask_torch.cpp.
#include <Python.h>
#include <torch/library.h>

#include "cpu/feature_mask.h"
#include "cpu/rerank.h"
#include "feature_mask_autograd.h"

#ifdef FMN_WITH_CUDA
#include "cuda/feature_mask_launch.h"
#endif

extern "C" {
// Importing fmn_kernels._C runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fmn, m) {
  // k-reciprocal re-ranking (DESIGN.md section 3): query (q, d), gallery (g, d) float32.
  // topk = 0: ((q, g) re-ranked distances, empty); topk = m: ((q, m) values, (q, m) int64 indices).
  m.def(
      "rerank(Tensor query, Tensor gallery, int k_forward, int k_half, int k_qe, float lambda_value, "
      "bool square_twice, bool raw_weights, bool clamp_jaccard, int topk) -> (Tensor, Tensor)");
  // Building blocks of the sharded re-ranking (fmn_kernels/rerank_distributed.py): one block of
  // columns into the rows' candidate lists (in place), exact squared distances of index pairs, and
  // the Jaccard overlaps S of query rows against an inverted index.
  m.def(
      "rerank_knn_update(Tensor rows_x, Tensor rows_f, Tensor rows_sq, Tensor row_ids, Tensor cols_x, "
      "Tensor cols_f, Tensor cols_sq, int col0, int cap, Tensor(a!) cand_val, Tensor(b!) cand_exact, "
      "Tensor(c!) cand_idx, Tensor(d!) cand_count, Tensor(e!) rowmax) -> ()");
  m.def("rerank_sqdist_pairs(Tensor a, Tensor a_idx, Tensor b, Tensor b_idx) -> Tensor");
  m.def("rerank_overlap(Tensor qcols, Tensor qvals, Tensor col_ptr, Tensor inv_item, Tensor inv_val, int item0, "
        "int item1, Tensor(a!) out) -> ()");
  // o = f * act(logits)                          (f_other absent)
  // o = f * (1 - act(logits)) + f_other * act(logits)  (f_other present: spatial_mix)
  // f, f_other: (B, C, H, W); logits: (B, H*W); act in {exp_relu, sigmoid, identity};
  // max_logit clamps logits from above before act.
  m.def("spatial_mask_mul(Tensor f, Tensor logits, Tensor? f_other, str activation, float? max_logit) -> Tensor");
  // Returns (df, dlogits, df_other); df is empty unless need_df, df_other empty unless
  // f_other is given and need_dother.
  m.def(
      "spatial_mask_mul_backward(Tensor grad_out, Tensor f, Tensor logits, Tensor? f_other, str activation, "
      "float? max_logit, bool need_df, bool need_dother) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fmn, CPU, m) {
  m.impl("rerank", &fmn::cpu::rerank);
  m.impl("rerank_knn_update", &fmn::cpu::rerank_knn_update);
  m.impl("rerank_sqdist_pairs", &fmn::cpu::rerank_sqdist_pairs);
  m.impl("rerank_overlap", &fmn::cpu::rerank_overlap);
  m.impl("spatial_mask_mul", &fmn::cpu::spatial_mask_mul);
  m.impl("spatial_mask_mul_backward", &fmn::cpu::spatial_mask_mul_backward);
}

// One autograd for every device's kernels (the backward calls spatial_mask_mul_backward through
// the dispatcher).
TORCH_LIBRARY_IMPL(fmn, Autograd, m) {
  m.impl("spatial_mask_mul", &fmn::spatial_mask_mul_autograd);
}

#ifdef FMN_WITH_CUDA
TORCH_LIBRARY_IMPL(fmn, CUDA, m) {
  m.impl("spatial_mask_mul", &fmn::cuda::spatial_mask_mul);
  m.impl("spatial_mask_mul_backward", &fmn::cuda::spatial_mask_mul_backward);
}
#endif
