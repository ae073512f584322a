// Sparse k-reciprocal re-ranking on the CPU: at::parallel_for (OpenMP) and BLAS GEMMs via at::mm.
//
// Notation: x the centred features (N, d), s_i = |x_i|^2, d2~(i, j) = max(s_i + s_j - 2 x_i.x_j, 0)
//   (d2~(i, i) = 0) the GEMM form; d2(i, j) = sum_k (f_ik - f_jk)^2 the exact fp32 distance of the
//   features f as given (a function of the two vectors only: equal distances tie exactly);
//   w the working distance d2 (or d2~), squared once more when square_twice.
// Stages:
//   1. kNN with row maxima over symmetric strips: for a block of rows [a, b) one GEMM gives
//      x[a:b] . x[a:N]^T; every value updates the row heap of i (rows of the strip) and, for
//      columns j >= b, the heap of j (the transposed half), so each pair's dot product is computed
//      once. Heaps keep the L + 16 smallest (d2~, index) pairs (candidates); rowmax[i] =
//      max_j d2~(i, j) over all N. The candidates are rescored with d2 and sorted by (d2, index);
//      |d2~ - d2| <= delta_i (bound below) certifies that the first L are the exact list, else the
//      row is rescanned with d2.
//   2. reciprocal lists R(i) = {j in T(i) : i in T(j)}, Rh likewise with the half lists.
//   3. R*(i) = R(i) + Rh(c) for c in R(i) with 3 |Rh(c) & R(i)| > 2 |Rh(c)|.
//   4. V[i, j] = exp(-w(i, j) / rowmax_i) / sum over R*(i), w from d2 = sum_k (f_ik - f_jk)^2
//      computed directly for every member (raw_weights: exp(-(w - min w)) normalised).
//   5. Vqe[i] = (1 / Q) sum_{j in first Q of row i} V[j]   (Q = min(k_qe, N); Vqe = V if Q = 1).
//   6. inverted index over gallery rows: column c -> [(j - q, Vqe[j, c])].
//   7. per query row i: S(i, j) = sum_{c in supp Vqe[i]} sum_{(j, v) in index[c]} min(Vqe[i, c], v),
//      J = 1 - S / (2 - S), final = (1 - lambda) J + lambda w~(i, j) / rowmax_i (w~ from d2~).
//      Dense output: d2~ is copied into the output from the kNN strips of the query rows and finished in place;
//      topk: the same strips are recomputed (identical GEMM calls, so identical values) and each
//      row is reduced to its m smallest (value, index) pairs.
#include "cpu/rerank.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace fmn {
namespace cpu {

namespace {

// (v1, i1) < (v2, i2) in (value, index) order.
inline bool pair_less(float v1, int64_t i1, float v2, int64_t i2) {
  return v1 < v2 || (v1 == v2 && i1 < i2);
}

// A max-heap (by (value, index)) of at most cap entries in caller-owned arrays.
struct BoundedHeap {
  float* val;
  int64_t* idx;
  int64_t cap;
  int64_t size;

  void sift_down(int64_t pos) {
    for (;;) {
      int64_t l = 2 * pos + 1, r = l + 1, big = pos;
      if (l < size && pair_less(val[big], idx[big], val[l], idx[l])) big = l;
      if (r < size && pair_less(val[big], idx[big], val[r], idx[r])) big = r;
      if (big == pos) return;
      std::swap(val[pos], val[big]);
      std::swap(idx[pos], idx[big]);
      pos = big;
    }
  }

  void push(float v, int64_t j) {
    if (size < cap) {
      int64_t pos = size++;
      val[pos] = v;
      idx[pos] = j;
      while (pos > 0) {
        int64_t parent = (pos - 1) / 2;
        if (!pair_less(val[parent], idx[parent], val[pos], idx[pos])) break;
        std::swap(val[pos], val[parent]);
        std::swap(idx[pos], idx[parent]);
        pos = parent;
      }
    } else if (pair_less(v, j, val[0], idx[0])) {
      val[0] = v;
      idx[0] = j;
      sift_down(0);
    }
  }

  // Empties the heap into ascending (value, index) order in place.
  void sort_ascending() {
    int64_t n = size;
    while (size > 1) {
      --size;
      std::swap(val[0], val[size]);
      std::swap(idx[0], idx[size]);
      sift_down(0);
    }
    size = n;
  }
};

inline float gemm_d2(float si, float sj, float dot) {
  float w = si + sj - 2.0f * dot;
  return w > 0.0f ? w : 0.0f;
}

inline float sqdist(const float* a, const float* b, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) {
    float t = a[k] - b[k];
    acc += t * t;
  }
  return acc;
}

// FMN_RERANK_PROFILE=1 prints the wall time of each stage to stderr.
struct StageClock {
  bool on = std::getenv("FMN_RERANK_PROFILE") != nullptr;
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  void mark(const char* stage) {
    if (!on) return;
    auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "fmn::rerank %-12s %8.3f s\n", stage, std::chrono::duration<double>(now - last).count());
    last = now;
  }
};

struct SparseRows {
  std::vector<std::vector<int64_t>> col;
  std::vector<std::vector<float>> val;
  explicit SparseRows(int64_t n) : col(n), val(n) {}
};

}  // namespace

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
    int64_t topk) {
  TORCH_CHECK(query.device().is_cpu() && gallery.device().is_cpu(), "fmn::rerank (cpu): tensors must be on the CPU");
  TORCH_CHECK(query.dim() == 2 && gallery.dim() == 2, "fmn::rerank: query and gallery must be 2-D");
  TORCH_CHECK(query.scalar_type() == at::kFloat && gallery.scalar_type() == at::kFloat,
              "fmn::rerank (cpu): float32 features expected");
  TORCH_CHECK(query.size(1) == gallery.size(1), "fmn::rerank: feature dims differ");
  TORCH_CHECK(query.size(0) > 0 && gallery.size(0) > 0, "fmn::rerank: empty query or gallery");
  TORCH_CHECK(k_forward >= 1 && k_half >= 1 && k_qe >= 1, "fmn::rerank: list lengths must be >= 1");
  TORCH_CHECK(lambda_value >= 0.0 && lambda_value <= 1.0, "fmn::rerank: lambda_value outside [0, 1]");
  TORCH_CHECK(topk >= 0 && topk <= gallery.size(0), "fmn::rerank: topk outside [0, g]");
  // fp32 GEMMs also when called inside an autocast region (at::mm would otherwise return bf16/fp16)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const int64_t q = query.size(0), g = gallery.size(0), n = q + g, d = query.size(1);
  const int64_t K = std::min(k_forward, n);
  const int64_t H = std::min(k_half, K);
  const int64_t Q = std::min(k_qe, n);
  const int64_t L = std::max(K, Q);
  const int64_t LC = std::min(n, L + 16);  // candidates per row from the GEMM form
  const float lam = static_cast<float>(lambda_value);

  // f: the features as given (exact d2); x: centred for the GEMM form (translation invariant,
  // smaller norms cancel less)
  const at::Tensor f = at::cat({query, gallery}, 0).contiguous();
  const float* F = f.data_ptr<float>();
  at::Tensor x = (f - f.to(at::kDouble).mean(0).to(at::kFloat)).contiguous();
  const at::Tensor sq_t = (x * x).sum(1).contiguous();
  const float* S2 = sq_t.data_ptr<float>();

  // Output: dense (q, g), or the m smallest per query row.
  at::Tensor out_val, out_idx;
  if (topk == 0) {
    out_val = at::empty({q, g}, x.options());
    out_idx = at::empty({0}, x.options().dtype(at::kLong));
  } else {
    out_val = at::empty({q, topk}, x.options());
    out_idx = at::empty({q, topk}, x.options().dtype(at::kLong));
  }

  // Strip [a, b): d2~(r, a + j) (unsquared) for rows a <= r < b, columns a <= a + j < N, in
  // a (b - a, N - a) buffer. The kNN pass and the topk output pass call it with the same blocks,
  // so both see bitwise identical values.
  const int64_t block = std::max<int64_t>(16, std::min<int64_t>(512, (int64_t{1} << 22) / n));
  auto strip_at = [&](int64_t a, const std::function<void(int64_t, const float*)>& per_row) {
    const int64_t b = std::min(n, a + block);
    const int64_t width = n - a;
    at::Tensor strip = at::mm(x.narrow(0, a, b - a), x.narrow(0, a, width).t()).contiguous();
    float* P = strip.data_ptr<float>();
    at::parallel_for(a, b, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* row = P + (r - a) * width;
        const float sr = S2[r];
        for (int64_t j = 0; j < width; ++j) row[j] = gemm_d2(sr, S2[a + j], row[j]);
        row[r - a] = 0.0f;
        if (per_row) per_row(r, row);
      }
    });
    return strip;
  };

  StageClock clock;
  // ---- 1. kNN with row maxima over symmetric strips ------------------------------------------
  std::vector<float> heap_val(n * LC);
  std::vector<int64_t> heap_idx(n * LC);
  std::vector<int64_t> heap_size(n, 0);
  std::vector<float> worst(n, std::numeric_limits<float>::infinity());  // heap top once full
  std::vector<float> rowmax(n, 0.0f);
  {
    float* O = topk == 0 ? out_val.data_ptr<float>() : nullptr;
    for (int64_t a = 0; a < n; a += block) {
      const int64_t b = std::min(n, a + block);
      const int64_t width = n - a;
      // rows of the strip: columns a .. N-1 (and, for query rows of the dense output, the
      // query-gallery part of the strip is the output's w, finished in stage 7)
      at::Tensor strip = strip_at(a, [&](int64_t r, const float* row) {
        if (O != nullptr && r < q) std::memcpy(O + r * g, row + (q - a), g * sizeof(float));
        BoundedHeap h{heap_val.data() + r * LC, heap_idx.data() + r * LC, LC, heap_size[r]};
        float mx = rowmax[r];
        float top = worst[r];
        for (int64_t j = 0; j < width; ++j) {
          const float v = row[j];
          mx = v > mx ? v : mx;
          if (v <= top) {
            h.push(v, a + j);
            if (h.size == h.cap) top = h.val[0];
          }
        }
        heap_size[r] = h.size;
        worst[r] = top;
        rowmax[r] = mx;
      });
      const float* P = strip.data_ptr<float>();
      // the transposed half: columns j >= b receive rows a .. b-1
      if (b < n) {
        at::parallel_for(b, n, 256, [&](int64_t j0, int64_t j1) {
          for (int64_t r = a; r < b; ++r) {
            const float* row = P + (r - a) * width - a;
            for (int64_t j = j0; j < j1; ++j) {
              const float v = row[j];
              rowmax[j] = v > rowmax[j] ? v : rowmax[j];
              if (v <= worst[j]) {
                BoundedHeap h{heap_val.data() + j * LC, heap_idx.data() + j * LC, LC, heap_size[j]};
                h.push(v, r);
                heap_size[j] = h.size;
                if (h.size == h.cap) worst[j] = h.val[0];
              }
            }
          }
        });
      }
    }
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        BoundedHeap h{heap_val.data() + r * LC, heap_idx.data() + r * LC, LC, heap_size[r]};
        h.sort_ascending();
      }
    });
  }
  clock.mark("knn");
  // Exact lists. With n_i = |x_i|, M = max n_j, e = 2^-24, gamma = d e / (1 - d e):
  //   |d2~(i, j) - d2(i, j)| <= delta_i = 1.25 (2 gamma + 10 e) (n_i + M)^2
  // (the GEMM form's dot, norms and additions, the centring, and d2's own rounding). Every column
  // outside the LC candidates has d2~ >= t (the largest candidate d2~), so d2 >= t - delta_i: the
  // L-th exact candidate below that proves the list; otherwise the row is rescanned exactly.
  std::vector<int64_t> nbr_store(n * L);
  {
    const double e = std::ldexp(1.0, -24);
    const double c_acc = 1.25 * (2.0 * d * e / std::max(1e-3, 1.0 - d * e) + 10.0 * e);
    double nmax = 0.0;
    for (int64_t i = 0; i < n; ++i) nmax = std::max(nmax, std::sqrt(static_cast<double>(S2[i])));
    const double grow = 1.0 + 2.0 * d * e;  // norms from the rounded s_i, made upper bounds
    nmax *= grow;
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      std::vector<std::pair<float, int64_t>> cand;
      for (int64_t i = r0; i < r1; ++i) {
        const float* fi = F + i * d;
        const float* hv = heap_val.data() + i * LC;
        const int64_t* hi = heap_idx.data() + i * LC;
        cand.resize(LC);
        for (int64_t t = 0; t < LC; ++t) cand[t] = {sqdist(fi, F + hi[t] * d, d), hi[t]};
        std::sort(cand.begin(), cand.end());
        bool ok = true;
        if (LC < n) {
          const double ni = std::sqrt(static_cast<double>(S2[i])) * grow;
          const double delta = c_acc * (ni + nmax) * (ni + nmax);
          ok = static_cast<double>(cand[L - 1].first) < static_cast<double>(hv[LC - 1]) - delta;
        }
        if (!ok) {
          cand.resize(n);
          for (int64_t j = 0; j < n; ++j) cand[j] = {sqdist(fi, F + j * d, d), j};
          std::partial_sort(cand.begin(), cand.begin() + L, cand.end());
        }
        for (int64_t t = 0; t < L; ++t) nbr_store[i * L + t] = cand[t].second;
      }
    });
    if (square_twice)
      for (int64_t i = 0; i < n; ++i) rowmax[i] *= rowmax[i];
  }
  clock.mark("exact lists");
  const int64_t* nbr = nbr_store.data();  // row i: nbr[i * L + s], ascending (d2, index)

  // ---- 2. reciprocal lists ----------------------------------------------------------------
  auto in_prefix = [&](int64_t row, int64_t len, int64_t who) {
    const int64_t* p = nbr + row * L;
    for (int64_t t = 0; t < len; ++t)
      if (p[t] == who) return true;
    return false;
  };
  std::vector<uint8_t> recip(n * K), recip_h(n * H);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      for (int64_t s = 0; s < K; ++s) recip[i * K + s] = in_prefix(nbr[i * L + s], K, i);
      for (int64_t s = 0; s < H; ++s) recip_h[i * H + s] = in_prefix(nbr[i * L + s], H, i);
    }
  });

  clock.mark("reciprocal");
  // ---- 3. expansion and 4. weights ----------------------------------------------------------
  SparseRows V(n);
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> mark(n, -1);   // mark[j] == i: j in R(i)
    std::vector<int64_t> seen(n, -1);   // seen[j] == i: j already in R*(i)
    std::vector<int64_t> members;
    std::vector<float> w;
    for (int64_t i = r0; i < r1; ++i) {
      members.clear();
      for (int64_t s = 0; s < K; ++s)
        if (recip[i * K + s]) {
          const int64_t j = nbr[i * L + s];
          mark[j] = i;
          seen[j] = i;
          members.push_back(j);
        }
      const int64_t n_r = static_cast<int64_t>(members.size());
      for (int64_t m = 0; m < n_r; ++m) {
        const int64_t c = members[m];
        int64_t size = 0, common = 0;
        for (int64_t t = 0; t < H; ++t)
          if (recip_h[c * H + t]) {
            ++size;
            common += mark[nbr[c * L + t]] == i;
          }
        if (3 * common > 2 * size) {
          for (int64_t t = 0; t < H; ++t)
            if (recip_h[c * H + t]) {
              const int64_t j = nbr[c * L + t];
              if (seen[j] != i) {
                seen[j] = i;
                members.push_back(j);
              }
            }
        }
      }
      std::sort(members.begin(), members.end());
      const int64_t cnt = static_cast<int64_t>(members.size());
      w.resize(cnt);
      const float* fi = F + i * d;
      float wmin = std::numeric_limits<float>::infinity();
      for (int64_t m = 0; m < cnt; ++m) {
        float v = sqdist(fi, F + members[m] * d, d);
        if (square_twice) v *= v;
        if (raw_weights) {
          wmin = std::min(wmin, v);
        } else {
          v = rowmax[i] > 0.0f ? v / rowmax[i] : 0.0f;
        }
        w[m] = v;
      }
      float total = 0.0f;
      for (int64_t m = 0; m < cnt; ++m) {
        w[m] = std::exp(-(raw_weights ? w[m] - wmin : w[m]));
        total += w[m];
      }
      for (int64_t m = 0; m < cnt; ++m) w[m] /= total;
      V.col[i] = members;
      V.val[i] = w;
    }
  });

  clock.mark("weights");
  // ---- 5. query expansion -----------------------------------------------------------------
  SparseRows VqeStore(Q > 1 ? n : 0);
  if (Q > 1) {
    const float inv_q = 1.0f / static_cast<float>(Q);
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> acc(n, 0.0f);
      std::vector<uint8_t> touched(n, 0);
      std::vector<int64_t> cols;
      for (int64_t i = r0; i < r1; ++i) {
        cols.clear();
        for (int64_t t = 0; t < Q; ++t) {
          const int64_t j = nbr[i * L + t];
          const auto& jc = V.col[j];
          const auto& jv = V.val[j];
          for (size_t e = 0; e < jc.size(); ++e) {
            if (!touched[jc[e]]) {
              touched[jc[e]] = 1;
              cols.push_back(jc[e]);
            }
            acc[jc[e]] += jv[e];
          }
        }
        std::sort(cols.begin(), cols.end());
        auto& oc = VqeStore.col[i];
        auto& ov = VqeStore.val[i];
        oc.assign(cols.begin(), cols.end());
        ov.resize(cols.size());
        for (size_t e = 0; e < cols.size(); ++e) {
          ov[e] = acc[cols[e]] * inv_q;
          acc[cols[e]] = 0.0f;
          touched[cols[e]] = 0;
        }
      }
    });
  }
  const SparseRows& Vqe = Q > 1 ? VqeStore : V;
  clock.mark("qe");

  // ---- 6. inverted index over the gallery rows ---------------------------------------------
  std::vector<int64_t> col_ptr(n + 1, 0);
  for (int64_t j = q; j < n; ++j)
    for (int64_t c : Vqe.col[j]) ++col_ptr[c + 1];
  for (int64_t c = 0; c < n; ++c) col_ptr[c + 1] += col_ptr[c];
  std::vector<int32_t> inv_item(col_ptr[n]);
  std::vector<float> inv_val(col_ptr[n]);
  {
    std::vector<int64_t> fill(col_ptr.begin(), col_ptr.end() - 1);
    for (int64_t j = q; j < n; ++j) {
      const auto& jc = Vqe.col[j];
      const auto& jv = Vqe.val[j];
      for (size_t e = 0; e < jc.size(); ++e) {
        const int64_t pos = fill[jc[e]]++;
        inv_item[pos] = static_cast<int32_t>(j - q);
        inv_val[pos] = jv[e];
      }
    }
  }

  clock.mark("index");
  // ---- 7. output, a strip of query rows at a time -------------------------------------------
  // Row i: S from the inverted index, then final = (1 - lambda) J + lambda w / rowmax_i over the
  // gallery, in place on w (dense: w already sits in the output; topk: w from the same strips).
  auto finish_rows = [&](int64_t r0, int64_t r1, float* W, int64_t ld) {
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> s(g);
      std::vector<float> hv(topk > 0 ? topk : 1);
      std::vector<int64_t> hi(topk > 0 ? topk : 1);
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(s.begin(), s.end(), 0.0f);
        const auto& ic = Vqe.col[i];
        const auto& iv = Vqe.val[i];
        for (size_t e = 0; e < ic.size(); ++e) {
          const float vi = iv[e];
          for (int64_t p = col_ptr[ic[e]]; p < col_ptr[ic[e] + 1]; ++p) s[inv_item[p]] += std::min(vi, inv_val[p]);
        }
        float* row = W + (i - r0) * ld;
        const bool has_max = rowmax[i] > 0.0f;
        for (int64_t j = 0; j < g; ++j) {
          const float w = square_twice ? row[j] * row[j] : row[j];
          const float dn = has_max ? w / rowmax[i] : 0.0f;
          float jac = 1.0f - s[j] / (2.0f - s[j]);
          if (clamp_jaccard && jac < 0.0f) jac = 0.0f;
          row[j] = (1.0f - lam) * jac + lam * dn;
        }
        if (topk > 0) {
          BoundedHeap h{hv.data(), hi.data(), topk, 0};
          for (int64_t j = 0; j < g; ++j)
            if (h.size < h.cap || row[j] <= h.val[0]) h.push(row[j], j);
          h.sort_ascending();
          std::memcpy(out_val.data_ptr<float>() + i * topk, hv.data(), topk * sizeof(float));
          std::memcpy(out_idx.data_ptr<int64_t>() + i * topk, hi.data(), topk * sizeof(int64_t));
        }
      }
    });
  };
  if (topk == 0) {
    finish_rows(0, q, out_val.data_ptr<float>(), g);
  } else {
    for (int64_t a = 0; a < q; a += block) {
      const int64_t width = n - a;
      at::Tensor strip = strip_at(a, nullptr);
      finish_rows(a, std::min(q, a + block), strip.data_ptr<float>() + (q - a), width);
    }
  }
  clock.mark("output");
  return std::make_tuple(out_val, out_idx);
}


// ---- building blocks of the sharded pipeline (fmn_kernels/rerank_distributed.py) -------------

namespace {

// BoundedHeap with the exact d2 of each entry carried along (ordered by (value, index) only).
struct ExactHeap {
  float* val;
  float* exact;
  int64_t* idx;
  int64_t cap;
  int64_t size;

  void swap_at(int64_t a, int64_t b) {
    std::swap(val[a], val[b]);
    std::swap(exact[a], exact[b]);
    std::swap(idx[a], idx[b]);
  }

  void push(float v, int64_t j, float e) {
    if (size < cap) {
      int64_t pos = size++;
      val[pos] = v;
      exact[pos] = e;
      idx[pos] = j;
      while (pos > 0) {
        int64_t parent = (pos - 1) / 2;
        if (!pair_less(val[parent], idx[parent], val[pos], idx[pos])) break;
        swap_at(pos, parent);
        pos = parent;
      }
      return;
    }
    val[0] = v;
    exact[0] = e;
    idx[0] = j;
    for (int64_t pos = 0;;) {
      int64_t l = 2 * pos + 1, r = l + 1, big = pos;
      if (l < size && pair_less(val[big], idx[big], val[l], idx[l])) big = l;
      if (r < size && pair_less(val[big], idx[big], val[r], idx[r])) big = r;
      if (big == pos) return;
      swap_at(pos, big);
      pos = big;
    }
  }
};

}  // namespace

// One block of columns into the candidate heaps of a block of rows (both centred features x, raw
// features f, s = |x|^2, as in stage 1 of rerank above): for every row i and column c
//   d2~(i, c) = max(s_i + s_c - 2 x_i.x_c, 0)   (0 where row_ids[i] == col0 + c: the item itself)
//   rowmax[i] = max(rowmax[i], d2~(i, c))
//   the heap of row i keeps the cap smallest (d2~, col0 + c) pairs, each with its exact d2,
//   sum_k (f_ik - f_ck)^2, computed when the pair enters the heap.
// Tiles of rows x columns per thread: the dot products come from at::mm on the tile (one thread
// each), so a pair's d2~ is the value the single-process strips give it.
void rerank_knn_update(
    const at::Tensor& rows_x, const at::Tensor& rows_f, const at::Tensor& rows_sq, const at::Tensor& row_ids,
    const at::Tensor& cols_x, const at::Tensor& cols_f, const at::Tensor& cols_sq, int64_t col0,
    at::Tensor heap_val, at::Tensor heap_exact, at::Tensor heap_idx, at::Tensor heap_size, at::Tensor rowmax) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t R = rows_x.size(0), C = cols_x.size(0), d = rows_x.size(1), cap = heap_val.size(1);
  TORCH_CHECK(rows_x.scalar_type() == at::kFloat && cols_x.scalar_type() == at::kFloat && rows_f.scalar_type() == at::kFloat &&
                  cols_f.scalar_type() == at::kFloat, "fmn::rerank_knn_update: float32 features expected");
  TORCH_CHECK(rows_x.is_contiguous() && rows_f.is_contiguous() && cols_x.is_contiguous() && cols_f.is_contiguous() &&
                  heap_val.is_contiguous() && heap_exact.is_contiguous() && heap_idx.is_contiguous(),
              "fmn::rerank_knn_update: contiguous tensors expected");
  TORCH_CHECK(cols_x.size(1) == d && rows_f.sizes() == rows_x.sizes() && cols_f.sizes() == cols_x.sizes() &&
                  heap_exact.sizes() == heap_val.sizes() && heap_idx.sizes() == heap_val.sizes() && heap_val.size(0) == R,
              "fmn::rerank_knn_update: shapes disagree");
  if (R == 0 || C == 0) return;
  const float* SR = rows_sq.data_ptr<float>();
  const float* SC = cols_sq.data_ptr<float>();
  const float* FR = rows_f.data_ptr<float>();
  const float* FC = cols_f.data_ptr<float>();
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  float* HV = heap_val.data_ptr<float>();
  float* HE = heap_exact.data_ptr<float>();
  int64_t* HI = heap_idx.data_ptr<int64_t>();
  int64_t* HS = heap_size.data_ptr<int64_t>();
  float* MX = rowmax.data_ptr<float>();
  const int64_t rb = 64;
  const int64_t cb = std::max<int64_t>(16, std::min<int64_t>(C, (int64_t{1} << 18) / rb));
  const int64_t n_rb = (R + rb - 1) / rb;
  at::parallel_for(0, n_rb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rb, r1 = std::min(R, r0 + rb);
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const int64_t c1 = std::min(C, c0 + cb), w = c1 - c0;
        at::Tensor tile = at::mm(rows_x.narrow(0, r0, r1 - r0), cols_x.narrow(0, c0, w).t()).contiguous();
        float* T = tile.data_ptr<float>();
        for (int64_t r = r0; r < r1; ++r) {
          float* row = T + (r - r0) * w;
          const float sr = SR[r];
          float mx = MX[r];
          for (int64_t j = 0; j < w; ++j) row[j] = gemm_d2(sr, SC[c0 + j], row[j]);
          const int64_t self = ids[r] - col0 - c0;
          if (self >= 0 && self < w) row[self] = 0.0f;
          for (int64_t j = 0; j < w; ++j) mx = row[j] > mx ? row[j] : mx;
          MX[r] = mx;
          ExactHeap h{HV + r * cap, HE + r * cap, HI + r * cap, cap, HS[r]};
          float top = h.size == cap ? h.val[0] : std::numeric_limits<float>::infinity();
          const float* fr = FR + r * d;
          for (int64_t j = 0; j < w; ++j) {
            const float v = row[j];
            if (v > top) continue;
            const int64_t gj = col0 + c0 + j;
            if (h.size == cap && !pair_less(v, gj, h.val[0], h.idx[0])) continue;
            h.push(v, gj, sqdist(fr, FC + (c0 + j) * d, d));
            if (h.size == cap) top = h.val[0];
          }
          HS[r] = h.size;
        }
      }
    }
  });
}

// Exact d2 of pairs: out[p] = sum_k (a[ai[p], k] - b[bi[p], k])^2, the function stage 1 rescores with.
at::Tensor rerank_sqdist_pairs(const at::Tensor& a, const at::Tensor& ai, const at::Tensor& b, const at::Tensor& bi) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.is_contiguous() && b.is_contiguous(),
              "fmn::rerank_sqdist_pairs: contiguous float32 features expected");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && ai.numel() == bi.numel(),
              "fmn::rerank_sqdist_pairs: shapes disagree");
  const at::Tensor ia = ai.to(at::kLong).contiguous(), ib = bi.to(at::kLong).contiguous();
  const int64_t n = ia.numel(), d = a.size(1);
  at::Tensor out = at::empty({n}, a.options());
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  const int64_t* IA = ia.data_ptr<int64_t>();
  const int64_t* IB = ib.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, n, 1024, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) O[p] = sqdist(A + IA[p] * d, B + IB[p] * d, d);
  });
  return out;
}

}  // namespace cpu
}  // namespace fmn
