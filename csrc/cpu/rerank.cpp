// Sparse k-reciprocal re-ranking on the CPU: at::parallel_for (OpenMP) and BLAS GEMMs via at::mm.
//
// Notation: x the centred features (N, d), s_i = |x_i|^2, d2~(i, j) = max(s_i + s_j - 2 x_i.x_j, 0)
//   (d2~(i, i) = 0) the GEMM form; d2(i, j) = sum_k (f_ik - f_jk)^2 the exact fp32 distance of the
//   features f as given (a function of the two vectors only: equal distances tie exactly);
//   w the working distance d2 (or d2~), squared once more when square_twice.
// Stages:
//   1. kNN with row maxima over symmetric tiles: row blocks [a, b) (queries in blocks of rq rows,
//      the gallery in blocks of 512) against column blocks from a, one single-threaded GEMM
//      x[a:b] . x[c:e]^T per tile, the blocks handed to the threads one at a time. Every value
//      goes to the candidate list of row i (rows of the tile) and, for columns j >= b, to the list
//      of j (the transposed half), so each pair's dot product is computed once. The lists keep the
//      L + 16 smallest (d2~, index) pairs (candidates); rowmax[i] = max_j d2~(i, j) over all N.
//      The candidates are rescored with d2 and sorted by (d2, index); |d2~ - d2| <= delta_i (bound
//      below) certifies that the first L are the exact list, else the row is rescanned with d2.
//   2. reciprocal lists R(i) = {j in T(i) : i in T(j)}, Rh likewise with the half lists.
//   3. R*(i) = R(i) + Rh(c) for c in R(i) with 3 |Rh(c) & R(i)| > 2 |Rh(c)|.
//   4. V[i, j] = exp(-w(i, j) / rowmax_i) / sum over R*(i), w from d2 = sum_k (f_ik - f_jk)^2
//      computed directly for every member (raw_weights: exp(-(w - min w)) normalised).
//   5. Vqe[i] = (1 / Q) sum_{j in first Q of row i} V[j]   (Q = min(k_qe, N); Vqe = V if Q = 1).
//   6. inverted index over gallery rows: column c -> [(j - q, Vqe[j, c])].
//   7. per query row i: S(i, j) = sum_{c in supp Vqe[i]} sum_{(j, v) in index[c]} min(Vqe[i, c], v),
//      J = 1 - S / (2 - S), final = (1 - lambda) J + lambda w~(i, j) / rowmax_i (w~ from d2~).
//      Dense output: d2~ is copied into the output from the kNN tiles of the query rows and
//      finished in place; topk: the same tiles are recomputed (identical GEMM calls, so identical
//      values) into an (rq, g) buffer per thread and each row is reduced to its m smallest
//      (value, index) pairs.
//   Building blocks of the sharded pipeline (fmn_kernels/rerank_distributed.py) follow rerank():
//   rerank_knn_update, rerank_overlap, rerank_sqdist_pairs.
#include "cpu/rerank.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <atomic>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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

// Candidate lists of many rows: each row keeps its cap smallest (value, index) pairs seen so far
// among width = cap + staging slots. A value can enter row r only when value <= thr[r] (the cap-th
// smallest value kept, +inf until cap are known); entries are appended, and a full row is
// compacted back to its cap smallest (ties by index), which lowers thr[r]. The kept set depends on
// the values offered, not on their order. With exact != nullptr each entry carries a second value
// (NaN when appended; the caller fills it).
struct CandStore {
  int64_t cap, width;
  float* val;
  int64_t* idx;
  float* exact;
  int64_t* count;
  float* thr;
  std::atomic_flag* locks = nullptr;  // striped by row when several threads offer to one row
  int64_t lock_mask = 0;

  // Offers (v, j) to row r if it may still enter (re-checked under the row's lock: thresholds
  // only fall, so a stale one read without the lock admits more, never fewer).
  void offer_checked(int64_t r, float v, int64_t j) {
    if (locks == nullptr) {
      if (v <= thr[r]) offer(r, v, j);
      return;
    }
    std::atomic_flag& l = locks[r & lock_mask];
    while (l.test_and_set(std::memory_order_acquire)) {
    }
    if (v <= thr[r]) offer(r, v, j);
    l.clear(std::memory_order_release);
  }

  void offer(int64_t r, float v, int64_t j) {
    const int64_t c = count[r];
    val[r * width + c] = v;
    idx[r * width + c] = j;
    if (exact != nullptr) exact[r * width + c] = std::numeric_limits<float>::quiet_NaN();
    count[r] = c + 1;
    if (c + 1 == width) compact(r);
  }

  void compact(int64_t r) {
    float* v = val + r * width;
    int64_t* id = idx + r * width;
    float* ex = exact != nullptr ? exact + r * width : nullptr;
    const int64_t n = count[r];
    if (n > cap) {
      thread_local std::vector<int64_t> perm;
      thread_local std::vector<float> tv, te;
      thread_local std::vector<int64_t> ti;
      perm.resize(n);
      for (int64_t t = 0; t < n; ++t) perm[t] = t;
      std::nth_element(perm.begin(), perm.begin() + (cap - 1), perm.begin() + n,
                       [&](int64_t a, int64_t b) { return pair_less(v[a], id[a], v[b], id[b]); });
      tv.resize(cap);
      ti.resize(cap);
      te.resize(cap);
      for (int64_t t = 0; t < cap; ++t) {
        tv[t] = v[perm[t]];
        ti[t] = id[perm[t]];
        if (ex != nullptr) te[t] = ex[perm[t]];
      }
      std::copy(tv.begin(), tv.end(), v);
      std::copy(ti.begin(), ti.end(), id);
      if (ex != nullptr) std::copy(te.begin(), te.end(), ex);
      count[r] = cap;
    }
    if (count[r] == cap) thr[r] = *std::max_element(v, v + cap);
  }
};

// The d2~ epilogue of a GEMM tile, vectorised where AVX2 is there (same results: no reductions
// but the max, and 2 * dot is exact): row[j] = max(si + sc[j] - 2 row[j], 0).
__attribute__((target("avx2"))) void form_row_avx2(float* row, const float* sc, float si, int64_t w) {
  const __m256 vs = _mm256_set1_ps(si), zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= w; j += 8) {
    const __m256 dot = _mm256_loadu_ps(row + j);
    const __m256 v = _mm256_sub_ps(_mm256_add_ps(vs, _mm256_loadu_ps(sc + j)), _mm256_add_ps(dot, dot));
    _mm256_storeu_ps(row + j, _mm256_max_ps(v, zero));
  }
  for (; j < w; ++j) row[j] = gemm_d2(si, sc[j], row[j]);
}

void form_row(float* row, const float* sc, float si, int64_t w) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return form_row_avx2(row, sc, si, w);
  for (int64_t j = 0; j < w; ++j) row[j] = gemm_d2(si, sc[j], row[j]);
}

// max(init, row[0..w)) and every j with row[j] <= thr[r] offered to row r of the store (column
// id col0 + j); thr[r] is read again after each offer.
__attribute__((target("avx2"))) float scan_row_avx2(const float* row, int64_t w, float init, CandStore& st,
                                                   int64_t r, int64_t col0) {
  __m256 mx = _mm256_set1_ps(init);
  int64_t j = 0;
  for (; j + 8 <= w; j += 8) {
    const __m256 v = _mm256_loadu_ps(row + j);
    mx = _mm256_max_ps(mx, v);
    int m = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(st.thr[r]), _CMP_LE_OQ));
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      if (row[j + b] <= st.thr[r]) st.offer_checked(r, row[j + b], col0 + j + b);
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float out = lanes[0];
  for (int t = 1; t < 8; ++t) out = lanes[t] > out ? lanes[t] : out;
  for (; j < w; ++j) {
    out = row[j] > out ? row[j] : out;
    if (row[j] <= st.thr[r]) st.offer_checked(r, row[j], col0 + j);
  }
  return out;
}

float scan_row(const float* row, int64_t w, float init, CandStore& st, int64_t r, int64_t col0) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return scan_row_avx2(row, w, init, st, r, col0);
  float out = init;
  for (int64_t j = 0; j < w; ++j) {
    out = row[j] > out ? row[j] : out;
    if (row[j] <= st.thr[r]) st.offer_checked(r, row[j], col0 + j);
  }
  return out;
}

// The transposed half of a tile T (rows a.., ld columns; columns j0..j1 of it are the items
// col0 + j): for each column, the max over the tile's rows into rowmax[col0 + j] (the calling
// thread's own maxima) and every value <= thr offered to that item with the row's id a + i.
__attribute__((target("avx2"))) void scan_cols_avx2(const float* T, int64_t rows, int64_t ld, int64_t j0, int64_t j1,
                                                   int64_t a, int64_t col0, float* rowmax, CandStore& st) {
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    const int64_t gj = col0 + j;
    __m256 mx = _mm256_loadu_ps(rowmax + gj);
    __m256 th = _mm256_loadu_ps(st.thr + gj);
    for (int64_t i = 0; i < rows; ++i) {
      const __m256 v = _mm256_loadu_ps(T + i * ld + j);
      mx = _mm256_max_ps(mx, v);
      int m = _mm256_movemask_ps(_mm256_cmp_ps(v, th, _CMP_LE_OQ));
      if (m == 0) continue;
      while (m) {
        const int b = __builtin_ctz(m);
        m &= m - 1;
        const float x = T[i * ld + j + b];
        if (x <= st.thr[gj + b]) st.offer_checked(gj + b, x, a + i);
      }
      th = _mm256_loadu_ps(st.thr + gj);
    }
    _mm256_storeu_ps(rowmax + gj, mx);
  }
  for (; j < j1; ++j) {
    const int64_t gj = col0 + j;
    for (int64_t i = 0; i < rows; ++i) {
      const float x = T[i * ld + j];
      rowmax[gj] = x > rowmax[gj] ? x : rowmax[gj];
      if (x <= st.thr[gj]) st.offer_checked(gj, x, a + i);
    }
  }
}

void scan_cols(const float* T, int64_t rows, int64_t ld, int64_t j0, int64_t j1, int64_t a, int64_t col0,
               float* rowmax, CandStore& st) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return scan_cols_avx2(T, rows, ld, j0, j1, a, col0, rowmax, st);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t gj = col0 + j;
    for (int64_t i = 0; i < rows; ++i) {
      const float x = T[i * ld + j];
      rowmax[gj] = x > rowmax[gj] ? x : rowmax[gj];
      if (x <= st.thr[gj]) st.offer_checked(gj, x, a + i);
    }
  }
}

// Row blocks of the kNN tiles: queries in blocks of rq rows (the topk output recomputes exactly
// those tiles into an (rq, g) buffer), then the gallery in blocks of rg; column blocks of cb from
// each block's first row. Every tile is one at::mm call, so equal calls give equal values.
struct Tiling {
  int64_t q, n, rq, rg, cb;
  Tiling(int64_t q_, int64_t g_, int64_t d)
      : q(q_), n(q_ + g_), rq(std::max<int64_t>(16, std::min<int64_t>(256, (int64_t{1} << 23) / std::max<int64_t>(1, g_)))),
        rg(512), cb(std::max<int64_t>(256, std::min<int64_t>(4096, (int64_t{1} << 18) / std::max<int64_t>(1, d)))) {}
  std::vector<std::pair<int64_t, int64_t>> row_blocks() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (int64_t a = 0; a < q; a += rq) out.emplace_back(a, std::min(q, a + rq));
    for (int64_t a = q; a < n; a += rg) out.emplace_back(a, std::min(n, a + rg));
    return out;
  }
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

  // f: the features as given (exact d2), read in place; x: centred for the GEMM form (translation
  // invariant, smaller norms cancel less)
  const at::Tensor qc = query.contiguous(), gc = gallery.contiguous();
  const float* FQ = qc.data_ptr<float>();
  const float* FG = gc.data_ptr<float>();
  auto frow = [&](int64_t i) { return i < q ? FQ + i * d : FG + (i - q) * d; };
  at::Tensor x = at::empty({n, d}, qc.options());
  {
    at::Tensor total = at::zeros({d}, qc.options().dtype(at::kDouble));
    const int64_t step = std::max<int64_t>(1, (int64_t{1} << 20) / d);
    for (const at::Tensor* part : {&qc, &gc})
      for (int64_t r = 0; r < part->size(0); r += step) total += part->narrow(0, r, std::min(step, part->size(0) - r)).to(at::kDouble).sum(0);
    const at::Tensor mean = (total / static_cast<double>(n)).to(at::kFloat);
    at::Tensor xq = x.narrow(0, 0, q), xg = x.narrow(0, q, g);
    at::sub_out(xq, qc, mean);
    at::sub_out(xg, gc, mean);
  }
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

  // Tile [a, b) x [c, e): d2~(r, c + j) (unsquared) for rows a <= r < b, 0 where r == c + j, in
  // buf. Called by one thread (a single-threaded at::mm inside a parallel region); the kNN pass
  // and the topk output pass call it with the same blocks, so both see bitwise identical values.
  const Tiling tiling(q, g, d);
  auto tile_at = [&](int64_t a, int64_t b, int64_t c, int64_t e, at::Tensor& buf) {
    at::Tensor tile = buf.narrow(0, 0, (b - a) * (e - c)).view({b - a, e - c});
    at::mm_out(tile, x.narrow(0, a, b - a), x.narrow(0, c, e - c).t());
    float* T = tile.data_ptr<float>();
    for (int64_t r = a; r < b; ++r) {
      float* row = T + (r - a) * (e - c);
      form_row(row, S2 + c, S2[r], e - c);
      if (r >= c && r < e) row[r - c] = 0.0f;
    }
    return T;
  };
  // Work items handed to the threads one at a time (no barrier between tiles: a thread that the
  // machine's load holds back delays only its own blocks).
  auto each_block = [&](const std::vector<std::pair<int64_t, int64_t>>& blocks,
                        const std::function<void(int64_t, int64_t, int, at::Tensor&)>& work) {
    std::atomic<int64_t> next{0};
    const int64_t threads = at::get_num_threads();
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      at::Tensor buf = at::empty({std::max(tiling.rq, tiling.rg) * tiling.cb}, x.options());
      const int tid = at::get_thread_num();
      for (int64_t k; (k = next.fetch_add(1)) < static_cast<int64_t>(blocks.size());)
        work(blocks[k].first, blocks[k].second, tid, buf);
    });
  };

  StageClock clock;
  // ---- 1. kNN with row maxima over symmetric tiles ------------------------------------------
  // Row block [a, b) against column blocks from a: every row of the block takes all columns
  // c >= a of its tiles (the block's own columns both ways), every column j >= b takes the block's
  // rows (the transposed half), so each pair's dot product is computed once. A row's list is
  // offered to by its own block's thread and by the threads of earlier blocks (striped locks);
  // the maxima of the transposed halves go to per-thread arrays, merged at the end.
  const int64_t LW = 2 * LC;
  const int64_t threads = at::get_num_threads();
  std::vector<float> cand_val(n * LW);
  std::vector<int64_t> cand_idx(n * LW);
  std::vector<int64_t> cand_count(n, 0);
  std::vector<float> thr(n, std::numeric_limits<float>::infinity());
  std::vector<float> rowmax(n, 0.0f), colmax(threads * n, 0.0f);
  std::unique_ptr<std::atomic_flag[]> locks(new std::atomic_flag[4096]);
  for (int64_t t = 0; t < 4096; ++t) locks[t].clear();
  CandStore store{LC, LW, cand_val.data(), cand_idx.data(), nullptr, cand_count.data(), thr.data(),
                  threads > 1 ? locks.get() : nullptr, 4095};
  {
    float* O = topk == 0 ? out_val.data_ptr<float>() : nullptr;
    each_block(tiling.row_blocks(), [&](int64_t a, int64_t b, int tid, at::Tensor& buf) {
      for (int64_t c = a; c < n; c += tiling.cb) {
        const int64_t e = std::min(n, c + tiling.cb), w = e - c;
        const float* T = tile_at(a, b, c, e, buf);
        for (int64_t r = a; r < b; ++r) {
          const float* row = T + (r - a) * w;
          if (O != nullptr && r < q && e > q) {
            const int64_t c0 = std::max(c, q);
            std::memcpy(O + r * g + (c0 - q), row + (c0 - c), (e - c0) * sizeof(float));
          }
          rowmax[r] = scan_row(row, w, rowmax[r], store, r, c);
        }
        if (e > b) scan_cols(T, b - a, w, std::max(c, b) - c, w, a, c, colmax.data() + tid * n, store);
      }
    });
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        store.compact(r);
        for (int64_t t = 0; t < threads; ++t) rowmax[r] = std::max(rowmax[r], colmax[t * n + r]);
      }
    });
    std::vector<float>().swap(colmax);
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
        const float* fi = frow(i);
        const float* hv = cand_val.data() + i * LW;
        const int64_t* hi = cand_idx.data() + i * LW;
        cand.resize(LC);
        for (int64_t t = 0; t < LC; ++t) cand[t] = {sqdist(fi, frow(hi[t]), d), hi[t]};
        std::sort(cand.begin(), cand.end());
        bool ok = true;
        if (LC < n) {
          const double ni = std::sqrt(static_cast<double>(S2[i])) * grow;
          const double delta = c_acc * (ni + nmax) * (ni + nmax);
          ok = static_cast<double>(cand[L - 1].first) < static_cast<double>(*std::max_element(hv, hv + LC)) - delta;
        }
        if (!ok) {
          cand.resize(n);
          for (int64_t j = 0; j < n; ++j) cand[j] = {sqdist(fi, frow(j), d), j};
          std::partial_sort(cand.begin(), cand.begin() + L, cand.end());
        }
        for (int64_t t = 0; t < L; ++t) nbr_store[i * L + t] = cand[t].second;
      }
    });
    if (square_twice)
      for (int64_t i = 0; i < n; ++i) rowmax[i] *= rowmax[i];
  }
  std::vector<float>().swap(cand_val);
  std::vector<int64_t>().swap(cand_idx);
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
      const float* fi = frow(i);
      float wmin = std::numeric_limits<float>::infinity();
      for (int64_t m = 0; m < cnt; ++m) {
        float v = sqdist(fi, frow(members[m]), d);
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
    // the query blocks' tiles again (the same calls), their gallery columns gathered into an
    // (rq, g) buffer per thread, then finished there
    std::vector<std::pair<int64_t, int64_t>> query_blocks;
    for (const auto& blk : tiling.row_blocks())
      if (blk.first < q) query_blocks.push_back(blk);
    at::Tensor rows_buf = at::empty({threads, tiling.rq * g}, x.options());
    each_block(query_blocks, [&](int64_t a, int64_t b, int tid, at::Tensor& buf) {
      float* B = rows_buf[tid].data_ptr<float>();
      for (int64_t c = a; c < n; c += tiling.cb) {
        const int64_t e = std::min(n, c + tiling.cb);
        if (e <= q) continue;
        const int64_t c0 = std::max(c, q);
        const float* T = tile_at(a, b, c, e, buf);
        for (int64_t r = a; r < b; ++r)
          std::memcpy(B + (r - a) * g + (c0 - q), T + (r - a) * (e - c) + (c0 - c), (e - c0) * sizeof(float));
      }
      finish_rows(a, b, B, g);
    });
  }
  clock.mark("output");
  return std::make_tuple(out_val, out_idx);
}


// ---- building blocks of the sharded pipeline (fmn_kernels/rerank_distributed.py) -------------

// One block of columns into the candidate lists of a block of rows (both centred features x, raw
// features f, s = |x|^2, as in stage 1 of rerank above): for every row i and column c
//   d2~(i, c) = max(s_i + s_c - 2 x_i.x_c, 0)   (0 where row_ids[i] == col0 + c: the item itself)
//   rowmax[i] = max(rowmax[i], d2~(i, c))
//   row i keeps the cap smallest (d2~, col0 + c) pairs seen over all calls (a CandStore of width
//   cand_val.size(1) >= cap), each with its exact d2 = sum_k (f_ik - f_ck)^2, computed at the end
//   of the call for the pairs of this block that are kept.
// Between calls each row holds at most cap entries (cand_count). Tiles of 512 rows x up to 1024
// columns (at d = 256), one at::mm each; blocks of rows handed to the threads one at a time.
void rerank_knn_update(
    const at::Tensor& rows_x, const at::Tensor& rows_f, const at::Tensor& rows_sq, const at::Tensor& row_ids,
    const at::Tensor& cols_x, const at::Tensor& cols_f, const at::Tensor& cols_sq, int64_t col0, int64_t cap,
    at::Tensor cand_val, at::Tensor cand_exact, at::Tensor cand_idx, at::Tensor cand_count, at::Tensor rowmax) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t R = rows_x.size(0), C = cols_x.size(0), d = rows_x.size(1), width = cand_val.size(1);
  TORCH_CHECK(rows_x.scalar_type() == at::kFloat && cols_x.scalar_type() == at::kFloat && rows_f.scalar_type() == at::kFloat &&
                  cols_f.scalar_type() == at::kFloat, "fmn::rerank_knn_update: float32 features expected");
  TORCH_CHECK(rows_x.is_contiguous() && rows_f.is_contiguous() && cols_x.is_contiguous() && cols_f.is_contiguous() &&
                  rows_sq.is_contiguous() && cols_sq.is_contiguous() && row_ids.is_contiguous() &&
                  cand_val.is_contiguous() && cand_exact.is_contiguous() && cand_idx.is_contiguous() &&
                  cand_count.is_contiguous() && rowmax.is_contiguous(),
              "fmn::rerank_knn_update: contiguous tensors expected");
  TORCH_CHECK(cols_x.size(1) == d && rows_f.sizes() == rows_x.sizes() && cols_f.sizes() == cols_x.sizes() &&
                  cand_exact.sizes() == cand_val.sizes() && cand_idx.sizes() == cand_val.sizes() && cand_val.size(0) == R &&
                  cap >= 1 && width > cap,
              "fmn::rerank_knn_update: shapes disagree");
  if (R == 0 || C == 0) return;
  const float* SR = rows_sq.data_ptr<float>();
  const float* SC = cols_sq.data_ptr<float>();
  const float* FR = rows_f.data_ptr<float>();
  const float* FC = cols_f.data_ptr<float>();
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  float* MX = rowmax.data_ptr<float>();
  std::vector<float> thr(R);
  CandStore st{cap, width, cand_val.data_ptr<float>(), cand_idx.data_ptr<int64_t>(), cand_exact.data_ptr<float>(),
               cand_count.data_ptr<int64_t>(), thr.data()};
  for (int64_t r = 0; r < R; ++r)
    thr[r] = st.count[r] >= cap ? *std::max_element(st.val + r * width, st.val + r * width + cap)
                                : std::numeric_limits<float>::infinity();
  const int64_t rb = 512;
  const int64_t cb = std::max<int64_t>(256, std::min<int64_t>(4096, (int64_t{1} << 18) / std::max<int64_t>(1, d)));
  const int64_t n_rb = (R + rb - 1) / rb;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    at::Tensor buf = at::empty({rb * std::min(C, cb)}, rows_x.options());
    for (int64_t blk; (blk = next.fetch_add(1)) < n_rb;) {
      const int64_t r0 = blk * rb, r1 = std::min(R, r0 + rb);
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const int64_t c1 = std::min(C, c0 + cb), w = c1 - c0;
        at::Tensor tile = buf.narrow(0, 0, (r1 - r0) * w).view({r1 - r0, w});
        at::mm_out(tile, rows_x.narrow(0, r0, r1 - r0), cols_x.narrow(0, c0, w).t());
        float* T = tile.data_ptr<float>();
        for (int64_t r = r0; r < r1; ++r) {
          float* row = T + (r - r0) * w;
          form_row(row, SC + c0, SR[r], w);
          const int64_t self = ids[r] - col0 - c0;
          if (self >= 0 && self < w) row[self] = 0.0f;
          MX[r] = scan_row(row, w, MX[r], st, r, col0 + c0);
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        st.compact(r);
        float* ex = st.exact + r * width;
        const int64_t* id = st.idx + r * width;
        for (int64_t t = 0; t < st.count[r]; ++t)
          if (std::isnan(ex[t])) ex[t] = sqdist(FR + r * d, FC + (id[t] - col0) * d, d);
      }
    }
  });
}

// S of query rows against the gallery items [item0, item1) of an inverted index (CSR by column
// over n columns: col_ptr (n + 1); inv_item int32 ascending within each column, inv_val), written
// over out (rows, item1 - item0):
//   out[i, j - item0] = sum over the entries (c, v) of row i (qcols ascending, columns >= n are
//   padding) of min(v, inv_val[p]) for the index entry p of column c whose item is j.
// An item occurs at most once per column, so each out[i, j] sums over the columns in ascending
// order whatever the item range: a tile of items gives the values of the whole row bit for bit.
// Each column's entries in the range are found by binary search.
void rerank_overlap(const at::Tensor& qcols, const at::Tensor& qvals, const at::Tensor& col_ptr,
                    const at::Tensor& inv_item, const at::Tensor& inv_val, int64_t item0, int64_t item1, at::Tensor out) {
  TORCH_CHECK(qcols.dim() == 2 && qvals.sizes() == qcols.sizes() && qcols.scalar_type() == at::kLong &&
                  qvals.scalar_type() == at::kFloat && col_ptr.scalar_type() == at::kLong &&
                  inv_item.scalar_type() == at::kInt && inv_val.scalar_type() == at::kFloat &&
                  inv_item.numel() == inv_val.numel() && 0 <= item0 && item0 <= item1,
              "fmn::rerank_overlap: (rows, W) int64 columns and float32 values, an int64 column pointer, int32 "
              "items and float32 values, and 0 <= item0 <= item1 expected");
  const at::Tensor qc = qcols.contiguous(), qv = qvals.contiguous(), ptr = col_ptr.contiguous();
  const at::Tensor item = inv_item.contiguous(), val = inv_val.contiguous();
  const int64_t rows = qc.size(0), width = qc.size(1), n = ptr.size(0) - 1, g = item1 - item0;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) == g,
              "fmn::rerank_overlap: out must be a contiguous float32 (rows, item1 - item0) tensor");
  out.zero_();
  const int64_t* C = qc.data_ptr<int64_t>();
  const float* V = qv.data_ptr<float>();
  const int64_t* P = ptr.data_ptr<int64_t>();
  const int32_t* I = item.data_ptr<int32_t>();
  const float* IV = val.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      float* s = O + i * g;
      for (int64_t e = 0; e < width; ++e) {
        const int64_t c = C[i * width + e];
        if (c < 0 || c >= n) continue;
        const float vi = V[i * width + e];
        const int32_t* end = I + P[c + 1];
        for (const int32_t* it = std::lower_bound(I + P[c], end, static_cast<int32_t>(item0));
             it != end && *it < item1; ++it)
          s[*it - item0] += std::min(vi, IV[it - I]);
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
