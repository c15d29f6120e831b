// Fused CPU kernels for the last, row-sized Kronecker product of a factor construction
// (tensorpoly/kron_kernel.py builds this file with torch.utils.cpp_extension on first use).
//
// mixed: out[g, u, r, i*q + j] = sum_s w[g, u, s] P[g, s, r, i] Q[g, s, r, j]   (TensorPoly-I's mixing)
// plain: out[g, u, r, i*q + j] = P[g, u, r, i] Q[g, u, r, j]                      (TLoRA, TensorPoly-II)
//
// Why a kernel: with PyTorch ops the mixing is hundreds of tiny matrix products whose inner
// dimension is the S experts, and the plain product's backward makes two product-sized
// temporaries and two reductions. Here every output row is written once and, in the backward
// pass, every gradient row is read once, with all the per-(g, r) operands kept in L1.
//
// The backward pass reads each member's gradient where it lies: a list of G tensors laid out
// [U, R, >= n] with unit stride on the last axis, of which only the first n_g entries of a row are
// read (the rest of the row, up to p*q, counts as zero: rows are cut to d after the product).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kron_lowrank.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

template <typename T> struct Lanes;
template <> struct Lanes<float> { typedef float V __attribute__((vector_size(32))); static constexpr int64_t W = 8; };
template <> struct Lanes<double> { typedef double V __attribute__((vector_size(32))); static constexpr int64_t W = 4; };

template <typename V> inline V load_vec(const void* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> inline void store_vec(void* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

// Writes the q entries of a chunk computed in nv padded vectors to dst, straight from the vectors when
// the padding's overrun stays inside the row (it lands on entries written later), else via memcpy.
template <typename T, typename V>
inline void store_chunk(T* dst, const V* acc, int64_t nv, int64_t q, bool overrun_ok) {
  if (overrun_ok) {
    for (int64_t k = 0; k < nv; ++k) store_vec(dst + k * (sizeof(V) / sizeof(T)), acc[k]);
  } else {
    std::memcpy(dst, acc, q * sizeof(T));
  }
}

struct Rows {  // one member's gradient rows: row (u, r) starts at base + u*su + r*sr; n entries are read
  const void* base;
  int64_t su, sr, n;
};

template <typename T>
std::vector<Rows> rows_of(const std::vector<torch::Tensor>& grads) {
  std::vector<Rows> rows;
  rows.reserve(grads.size());
  for (const auto& t : grads) {
    if (t.numel() == 0) {
      rows.push_back({nullptr, 0, 0, 0});
    } else {
      rows.push_back({t.data_ptr<T>(), t.stride(0), t.stride(1), t.size(2)});
    }
  }
  return rows;
}

// Copies entries [start, start + q) of a gradient row of n valid entries into a zero-padded buffer;
// returns how many were valid (0: the whole chunk is zero).
template <typename T>
inline int64_t load_chunk(T* dst, int64_t padded, const T* row, int64_t n, int64_t start, int64_t q) {
  const int64_t valid = std::max<int64_t>(0, std::min(q, n - start));
  std::memset(dst, 0, padded * sizeof(T));
  if (valid) std::memcpy(dst, row + start, valid * sizeof(T));
  return valid;
}

// C vectors of two output rows at once (2C accumulators in registers), summed over the S experts.
template <int C, typename T, typename V>
inline void mix_chunk(const V* Qv, int64_t nv, int64_t k, int64_t S, const T* c0, const T* c1, V* out0, V* out1) {
  V a0[C] = {}, a1[C] = {};
  for (int64_t s = 0; s < S; ++s) {
    const V* qs = Qv + s * nv + k;
    const T x0 = c0[s], x1 = c1[s];
    for (int c = 0; c < C; ++c) {
      a0[c] += x0 * qs[c];
      a1[c] += x1 * qs[c];
    }
  }
  for (int c = 0; c < C; ++c) {
    out0[k + c] = a0[c];
    out1[k + c] = a1[c];
  }
}

template <typename T>
void mixed_forward(const T* w, const T* P, const T* Q, T* out, int64_t G, int64_t U, int64_t S, int64_t R,
                   int64_t p, int64_t q) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::W;
  const int64_t nv = (q + W - 1) / W, L = p * q;
  // Blocks in the output's memory order (g, u, r): each writes one contiguous row after the previous one.
  at::parallel_for(0, G * U * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> Qv(S * nv), acc0(nv), acc1(nv);
    std::vector<T> coef0(S), coef1(S);
    for (int64_t gur = begin; gur < end; ++gur) {
      const int64_t g = gur / (U * R), u = (gur / R) % U, r = gur % R;
      for (int64_t s = 0; s < S; ++s) {
        T* dst = reinterpret_cast<T*>(&Qv[s * nv]);
        std::memset(dst, 0, nv * W * sizeof(T));
        std::memcpy(dst, Q + ((g * S + s) * R + r) * q, q * sizeof(T));
      }
      const T* wu = w + (g * U + u) * S;
      T* row = out + gur * L;
      for (int64_t i = 0; i < p; i += 2) {
        const int64_t i1 = std::min(i + 1, p - 1);  // an odd last row is computed twice, stored once
        for (int64_t s = 0; s < S; ++s) {
          const T* Ps = P + ((g * S + s) * R + r) * p;
          coef0[s] = wu[s] * Ps[i];
          coef1[s] = wu[s] * Ps[i1];
        }
        int64_t k = 0;
        for (; k + 4 <= nv; k += 4) mix_chunk<4>(Qv.data(), nv, k, S, coef0.data(), coef1.data(), acc0.data(), acc1.data());
        if (k + 2 <= nv) {
          mix_chunk<2>(Qv.data(), nv, k, S, coef0.data(), coef1.data(), acc0.data(), acc1.data());
          k += 2;
        }
        if (k < nv) mix_chunk<1>(Qv.data(), nv, k, S, coef0.data(), coef1.data(), acc0.data(), acc1.data());
        store_chunk(row + i * q, acc0.data(), nv, q, i * q + nv * W <= L);
        if (i1 != i) store_chunk(row + i1 * q, acc1.data(), nv, q, i1 * q + nv * W <= L);
      }
    }
  });
}

template <typename T>
void mixed_backward(const T* w, const T* P, const T* Q, const std::vector<Rows>& grads, T* gw, T* gP, T* gQ,
                    int64_t G, int64_t U, int64_t S, int64_t R, int64_t p, int64_t q) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::W;
  const int64_t nv = (q + W - 1) / W, ns = (S + W - 1) / W;
  // One member per task, its gradient rows read in memory order (u, r); its operands for all r stay in L2.
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    // Per rank row r: Q transposed [q][ns] and P transposed [p][ns] (experts along the lanes), and the
    // gradients of Q [S][nv] and of P (transposed) being accumulated over the tasks u.
    std::vector<V> Qt(R * q * ns), Pt(R * p * ns), gq(R * S * nv), gPt(R * p * ns), wv(ns), gwu(ns);
    std::vector<V> gi0(nv), gi1(nv), dots0(ns), dots1(ns);
    for (int64_t g = begin; g < end; ++g) {
      std::fill(Qt.begin(), Qt.end(), V{});
      std::fill(Pt.begin(), Pt.end(), V{});
      std::fill(gq.begin(), gq.end(), V{});
      std::fill(gPt.begin(), gPt.end(), V{});
      for (int64_t r = 0; r < R; ++r) {
        T* qt = reinterpret_cast<T*>(Qt.data() + r * q * ns);
        T* pt = reinterpret_cast<T*>(Pt.data() + r * p * ns);
        for (int64_t s = 0; s < S; ++s) {
          const T* Qs = Q + ((g * S + s) * R + r) * q;
          const T* Ps = P + ((g * S + s) * R + r) * p;
          for (int64_t j = 0; j < q; ++j) qt[j * ns * W + s] = Qs[j];
          for (int64_t i = 0; i < p; ++i) pt[i * ns * W + s] = Ps[i];
        }
      }
      const Rows& m = grads[g];
      // Chunk i of a gradient row into buf (vectors): its lanes past q, or past the cut, only reach gq
      // lanes that are never written out. Returns how many of its q entries are valid (0: all zero).
      auto load = [&](const T* row, int64_t i, V* buf) -> int64_t {
        if (i >= p) {
          std::fill(buf, buf + nv, V{});
          return 0;
        }
        if (i * q + nv * W > m.n) return load_chunk(reinterpret_cast<T*>(buf), nv * W, row, m.n, i * q, q);
        for (int64_t k = 0; k < nv; ++k) buf[k] = load_vec<V>(row + i * q + k * W);
        return q;
      };
      // dots[s] = <gradient chunk, Q[s]>, for all experts at once
      auto dot = [&](const V* buf, int64_t valid, const V* qt, V* dots) {
        const T* gis = reinterpret_cast<const T*>(buf);
        for (int64_t t = 0; t < ns; ++t) {
          V d0{}, d1{}, d2{}, d3{};
          int64_t j = 0;
          for (; j + 4 <= valid; j += 4) {
            d0 += gis[j] * qt[j * ns + t];
            d1 += gis[j + 1] * qt[(j + 1) * ns + t];
            d2 += gis[j + 2] * qt[(j + 2) * ns + t];
            d3 += gis[j + 3] * qt[(j + 3) * ns + t];
          }
          for (; j < valid; ++j) d0 += gis[j] * qt[j * ns + t];
          dots[t] = (d0 + d1) + (d2 + d3);
        }
      };
      for (int64_t u = 0; u < U; ++u) {
        std::fill(wv.begin(), wv.end(), V{});
        std::memcpy(wv.data(), w + (g * U + u) * S, S * sizeof(T));
        std::fill(gwu.begin(), gwu.end(), V{});
        for (int64_t r = 0; m.base && r < R; ++r) {
          const T* row = static_cast<const T*>(m.base) + u * m.su + r * m.sr;
          const V* qt = Qt.data() + r * q * ns;
          const V* pt = Pt.data() + r * p * ns;
          V* gpt = gPt.data() + r * p * ns;
          V* gqr = gq.data() + r * S * nv;
          for (int64_t i = 0; i < p; i += 2) {  // two rows at a time: gq is loaded and stored once for both
            const int64_t valid0 = load(row, i, gi0.data());
            if (!valid0) break;  // the rest of the row lies past the cut: zero
            const int64_t valid1 = load(row, i + 1, gi1.data());
            dot(gi0.data(), valid0, qt, dots0.data());
            dot(gi1.data(), valid1, qt, dots1.data());
            for (int64_t t = 0; t < ns; ++t) {
              const V p0 = pt[i * ns + t], p1 = valid1 ? pt[(i + 1) * ns + t] : V{};
              gpt[i * ns + t] += wv[t] * dots0[t];
              if (valid1) gpt[(i + 1) * ns + t] += wv[t] * dots1[t];
              gwu[t] += p0 * dots0[t] + p1 * dots1[t];
              dots0[t] = wv[t] * p0;  // now the coefficients of the chunks in each expert's gQ
              dots1[t] = wv[t] * p1;
            }
            const T* c0 = reinterpret_cast<const T*>(dots0.data());
            const T* c1 = reinterpret_cast<const T*>(dots1.data());
            for (int64_t s = 0; s < S; ++s) {
              const T x0 = c0[s], x1 = c1[s];
              V* acc = gqr + s * nv;
              for (int64_t k = 0; k < nv; ++k) acc[k] += x0 * gi0[k] + x1 * gi1[k];
            }
          }
        }
        std::memcpy(gw + (g * U + u) * S, gwu.data(), S * sizeof(T));
      }
      for (int64_t r = 0; r < R; ++r) {
        const T* gpt = reinterpret_cast<const T*>(gPt.data() + r * p * ns);
        for (int64_t s = 0; s < S; ++s) {
          T* gPs = gP + ((g * S + s) * R + r) * p;
          for (int64_t i = 0; i < p; ++i) gPs[i] = gpt[i * ns * W + s];
          std::memcpy(gQ + ((g * S + s) * R + r) * q, gq.data() + (r * S + s) * nv, q * sizeof(T));
        }
      }
    }
  });
}

template <typename T>
void plain_forward(const T* P, const T* Q, T* out, int64_t B, int64_t R, int64_t p, int64_t q) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::W;
  const int64_t nv = (q + W - 1) / W, L = p * q;
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> Qv(nv), acc(nv);
    for (int64_t br = begin; br < end; ++br) {
      T* dst = reinterpret_cast<T*>(Qv.data());
      std::memset(dst, 0, nv * W * sizeof(T));
      std::memcpy(dst, Q + br * q, q * sizeof(T));
      const T* Pr = P + br * p;
      T* row = out + br * L;
      for (int64_t i = 0; i < p; ++i) {
        const T c = Pr[i];
        for (int64_t k = 0; k < nv; ++k) acc[k] = c * Qv[k];
        store_chunk(row + i * q, acc.data(), nv, q, i * q + nv * W <= L);
      }
    }
  });
}

template <typename T>
void plain_backward(const T* P, const T* Q, const std::vector<Rows>& grads, int64_t U, T* gP, T* gQ, int64_t B,
                    int64_t R, int64_t p, int64_t q) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::W;
  const int64_t nv = (q + W - 1) / W;
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> Qv(nv), gq(nv), gi(nv);
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / R, r = br % R, g = b / U, u = b % U;
      T* qd = reinterpret_cast<T*>(Qv.data());
      std::memset(qd, 0, nv * W * sizeof(T));
      std::memcpy(qd, Q + br * q, q * sizeof(T));
      std::fill(gq.begin(), gq.end(), V{});
      const T* Pr = P + br * p;
      T* gPr = gP + br * p;
      std::fill(gPr, gPr + p, T(0));
      const Rows& m = grads[g];
      const T* row = m.base ? static_cast<const T*>(m.base) + u * m.su + r * m.sr : nullptr;
      for (int64_t i = 0; row && i < p; ++i) {
        if (i * q + nv * W > m.n) {
          // Lanes past q must be zero here: they enter the dot product.
          if (!load_chunk(reinterpret_cast<T*>(gi.data()), nv * W, row, m.n, i * q, q)) break;
        } else {
          for (int64_t k = 0; k < nv; ++k) gi[k] = load_vec<V>(row + i * q + k * W);
          if (q % W) {  // zero the lanes that belong to the next chunk
            T* last = reinterpret_cast<T*>(&gi[nv - 1]);
            for (int64_t l = q % W; l < W; ++l) last[l] = 0;
          }
        }
        V d{};
        const T c = Pr[i];
        for (int64_t k = 0; k < nv; ++k) {
          d += gi[k] * Qv[k];
          gq[k] += c * gi[k];
        }
        T sum = 0;
        for (int64_t l = 0; l < W; ++l) sum += d[l];
        gPr[i] = sum;
      }
      std::memcpy(gQ + br * q, gq.data(), q * sizeof(T));
    }
  });
}


// ---- a normalised leaf pair: LN(a ⊗ b) with a per-layer affine --------------------------------
// y[b, r, i*lb + j] = (z - mean) * rstd * W[g, r?, k] + beta[g, r?, k],   z = a[b, r, i] * bv[b, r, j]
// The statistics run over the block's first `used` entries of every row (scope joint: all R rows of
// the block together; scope row: each row alone; scope none: y = z). Block b uses affine g = b / (B / Gw),
// row r of it if the affine has R rows, else its only row.
enum Scope { kNone = 0, kJoint = 1, kRow = 2 };

// Mean and (biased) variance of n values, two passes. Leaves are a few to a few tens of entries: four
// scalar sums side by side, so that the additions do not wait on each other (one chain is
// latency-bound; vectors would spend more on masks and horizontal sums).
template <typename T>
inline T sum4(const T* x, int64_t n, T shift, bool square) {
  T s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) {
      const T v = x[i + k] - shift;
      s[k] += square ? v * v : v;
    }
  for (; i < n; ++i) {
    const T v = x[i] - shift;
    s[0] += square ? v * v : v;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

template <typename T>
inline void moments(const T* x, int64_t n, T& mean, T& var) {
  mean = sum4(x, n, T(0), false) / static_cast<T>(n);
  var = sum4(x, n, mean, true) / static_cast<T>(n);
}

// The statistics of the entries a_i b_j of rows `first` .. `first + rows` of block (a, bv), from the
// leaves' own: a row's mean is mean(a) mean(b), its variance mean(a)^2 var(b) + mean(b)^2 var(a) +
// var(a) var(b) (non-negative terms: no cancellation); over several rows, the mean of their variances plus
// the variance of their means. O(la + lb) per row instead of passes over its la lb entries.
template <typename T>
inline void folded_moments(const T* a, const T* bv, int64_t first, int64_t rows, int64_t la, int64_t lb, T& mu,
                           T& var) {
  T sum_mean = 0, sum_var = 0, sum_sq_mean = 0;
  thread_local std::vector<T> row_mean;
  row_mean.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    T ma, va, mb, vb;
    moments(a + (first + r) * la, la, ma, va);
    moments(bv + (first + r) * lb, lb, mb, vb);
    row_mean[r] = ma * mb;
    sum_mean += row_mean[r];
    sum_var += ma * ma * vb + mb * mb * va + va * vb;
  }
  mu = sum_mean / static_cast<T>(rows);
  for (int64_t r = 0; r < rows; ++r) sum_sq_mean += (row_mean[r] - mu) * (row_mean[r] - mu);
  var = (sum_var + sum_sq_mean) / static_cast<T>(rows);
}

// mean and rstd of the LayerNorm over group s (rows s rows .. (s + 1) rows) of block n, from the leaves.
template <typename T>
inline void group_stats(const T* a, const T* bv, int64_t n, int64_t s, int64_t rows, int64_t R, int64_t la,
                        int64_t lb, double eps, T& mu, T& inv) {
  T var;
  folded_moments(a + n * R * la, bv + n * R * lb, s * rows, rows, la, lb, mu, var);
  inv = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var) + eps));
}

template <typename T>
void pair_forward(const T* a, const T* bv, const T* W, const T* beta, T* y, T* mean, T* rstd, int64_t B, int64_t R,
                  int64_t la, int64_t lb, int64_t Gw, int64_t Rw, int scope, int64_t used, double eps) {
  const int64_t L = la * lb, per_affine = B / Gw;
  if (scope != kNone && !W && used == L) {
    // No affine and statistics over every entry (the paper's setting): statistics from the leaves, then
    // one pass that writes the normalised products.
    const int64_t groups = scope == kJoint ? 1 : R, rows = scope == kJoint ? R : 1;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t s = 0; s < groups; ++s) {
          T mu, inv;
          group_stats(a, bv, b, s, rows, R, la, lb, eps, mu, inv);
          const T shift = mu * inv;
          mean[b * groups + s] = mu;
          rstd[b * groups + s] = inv;
          for (int64_t r = s * rows; r < (s + 1) * rows; ++r) {
            const T* ar = a + (b * R + r) * la;
            const T* br = bv + (b * R + r) * lb;
            T* yr = y + (b * R + r) * L;
            for (int64_t i = 0; i < la; ++i) {
              const T c = ar[i] * inv;
              for (int64_t j = 0; j < lb; ++j) yr[i * lb + j] = c * br[j] - shift;
            }
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* yb = y + b * R * L;
      for (int64_t r = 0; r < R; ++r) {
        const T* ar = a + (b * R + r) * la;
        const T* br = bv + (b * R + r) * lb;
        T* yr = yb + r * L;
        for (int64_t i = 0; i < la; ++i) {
          const T c = ar[i];
#pragma omp simd
          for (int64_t j = 0; j < lb; ++j) yr[i * lb + j] = c * br[j];
        }
      }
      if (scope == kNone) continue;
      const int64_t groups = scope == kJoint ? 1 : R, rows = scope == kJoint ? R : 1;
      const int64_t g = b / per_affine;
      for (int64_t s = 0; s < groups; ++s) {
        T* ys = yb + s * L;
        T sum = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const T* yr = ys + r * L;
#pragma omp simd reduction(+ : sum)
          for (int64_t k = 0; k < used; ++k) sum += yr[k];
        }
        const T n = static_cast<T>(rows * used), mu = sum / n;
        T sq = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const T* yr = ys + r * L;
#pragma omp simd reduction(+ : sq)
          for (int64_t k = 0; k < used; ++k) sq += (yr[k] - mu) * (yr[k] - mu);
        }
        const T inv = static_cast<T>(1.0 / std::sqrt(static_cast<double>(sq / n) + eps));
        mean[b * groups + s] = mu;
        rstd[b * groups + s] = inv;
        for (int64_t r = 0; r < rows; ++r) {
          T* yr = ys + r * L;
          if (W) {
            const int64_t wrow = g * Rw + (Rw == 1 ? 0 : s * rows + r);
            const T* wr = W + wrow * L;
            const T* br = beta + wrow * L;
#pragma omp simd
            for (int64_t k = 0; k < L; ++k) yr[k] = (yr[k] - mu) * inv * wr[k] + br[k];
          } else {
#pragma omp simd
            for (int64_t k = 0; k < L; ++k) yr[k] = (yr[k] - mu) * inv;
          }
        }
      }
    }
  });
}

// pair_backward without an affine, statistics over every entry: with z = a_i b_j and yhat = (z - mu) rstd,
// dz = rstd (g - c1 - yhat c2), c1 = mean(g), c2 = mean(g yhat), so that only the dots
// D_i = sum_j g_ij b_j and E_j = sum_i a_i g_ij of each row are taken over its entries:
//   sum g yhat = rstd (sum_i a_i D_i - mu sum g),
//   grad a_i = rstd (D_i - c1 sum b - c2 rstd (a_i sum b^2 - mu sum b)), likewise grad b_j.
template <typename T>
void pair_backward_folded(const T* a, const T* bv, const T* mean, const T* rstd, const T* gy, T* ga, T* gb,
                          int64_t B, int64_t R, int64_t la, int64_t lb, int scope) {
  const int64_t L = la * lb, groups = scope == kJoint ? 1 : R, rows = scope == kJoint ? R : 1;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> D(rows * la), E(rows * lb);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t s = 0; s < groups; ++s) {
        const T mu = mean[b * groups + s], inv = rstd[b * groups + s];
        T s1 = 0, sad = 0;
        for (int64_t k = 0; k < rows; ++k) {
          const int64_t r = s * rows + k;
          const T* ar = a + (b * R + r) * la;
          const T* br = bv + (b * R + r) * lb;
          const T* gr = gy + (b * R + r) * L;
          T* Dk = D.data() + k * la;
          T* Ek = E.data() + k * lb;
          std::fill(Ek, Ek + lb, T(0));
          // Scalar on purpose: a leaf is a few entries long, too short for vectors' horizontal sums.
          for (int64_t i = 0; i < la; ++i) {
            const T c = ar[i];
            const T* gi = gr + i * lb;
            T dot = 0, sum = 0;
            for (int64_t j = 0; j < lb; ++j) {
              dot += gi[j] * br[j];
              sum += gi[j];
              Ek[j] += c * gi[j];
            }
            Dk[i] = dot;
            s1 += sum;
            sad += c * dot;
          }
        }
        const T n = static_cast<T>(rows * L), c1 = s1 / n, c2 = inv * (sad - mu * s1) / n;
        for (int64_t k = 0; k < rows; ++k) {
          const int64_t r = s * rows + k;
          const T* ar = a + (b * R + r) * la;
          const T* br = bv + (b * R + r) * lb;
          T sa = 0, saa = 0, sb = 0, sbb = 0;
          for (int64_t i = 0; i < la; ++i) sa += ar[i], saa += ar[i] * ar[i];
          for (int64_t j = 0; j < lb; ++j) sb += br[j], sbb += br[j] * br[j];
          T* gar = ga + (b * R + r) * la;
          T* gbr = gb + (b * R + r) * lb;
          for (int64_t i = 0; i < la; ++i)
            gar[i] = inv * (D[k * la + i] - c1 * sb - c2 * inv * (ar[i] * sbb - mu * sb));
          for (int64_t j = 0; j < lb; ++j)
            gbr[j] = inv * (E[k * lb + j] - c1 * sa - c2 * inv * (br[j] * saa - mu * sa));
        }
      }
    }
  });
}

template <typename T>
void pair_backward(const T* a, const T* bv, const T* W, const T* mean, const T* rstd, const T* gy, T* ga, T* gb,
                   T* gW, T* gbeta, int64_t B, int64_t R, int64_t la, int64_t lb, int64_t Gw, int64_t Rw, int scope,
                   int64_t used) {
  const int64_t L = la * lb, per_affine = B / Gw;
  if (scope != kNone && !W && used == L) {
    pair_backward_folded(a, bv, mean, rstd, gy, ga, gb, B, R, la, lb, scope);
    return;
  }
  // One task per affine: the blocks that share it accumulate its gradient without races.
  at::parallel_for(0, Gw, 1, [&](int64_t gbegin, int64_t gend) {
    std::vector<T> yhat(R * L), gz(R * L);
    for (int64_t g = gbegin; g < gend; ++g) {
      for (int64_t b = g * per_affine; b < (g + 1) * per_affine; ++b) {
        const T* gyb = gy + b * R * L;
        if (scope == kNone) {
          std::copy(gyb, gyb + R * L, gz.begin());
        } else {
          const int64_t groups = scope == kJoint ? 1 : R, rows = scope == kJoint ? R : 1;
          for (int64_t s = 0; s < groups; ++s) {
            const T mu = mean[b * groups + s], inv = rstd[b * groups + s];
            T s1 = 0, s2 = 0;  // sums of d(loss)/d(yhat) and of it times yhat, over every entry
            for (int64_t r = s * rows; r < (s + 1) * rows; ++r) {
              const T* ar = a + (b * R + r) * la;
              const T* br = bv + (b * R + r) * lb;
              const T* wr = W ? W + (g * Rw + (Rw == 1 ? 0 : r)) * L : nullptr;
              const T* gyr = gyb + r * L;
              T* yh = yhat.data() + r * L;
              T* gzr = gz.data() + r * L;
              for (int64_t i = 0; i < la; ++i) {
                const T c = ar[i];
#pragma omp simd
                for (int64_t j = 0; j < lb; ++j) yh[i * lb + j] = (c * br[j] - mu) * inv;
              }
              if (wr) {
#pragma omp simd
                for (int64_t k = 0; k < L; ++k) gzr[k] = gyr[k] * wr[k];
              } else {
                std::copy(gyr, gyr + L, gzr);
              }
#pragma omp simd reduction(+ : s1, s2)
              for (int64_t k = 0; k < L; ++k) {
                s1 += gzr[k];
                s2 += gzr[k] * yh[k];
              }
            }
            const T n = static_cast<T>(rows * used), c1 = s1 / n, c2 = s2 / n;
            for (int64_t r = s * rows; r < (s + 1) * rows; ++r) {
              const T* yh = yhat.data() + r * L;
              T* gzr = gz.data() + r * L;
              // Only the entries inside the statistics move the mean and the variance.
#pragma omp simd
              for (int64_t k = 0; k < used; ++k) gzr[k] = inv * (gzr[k] - c1 - yh[k] * c2);
#pragma omp simd
              for (int64_t k = used; k < L; ++k) gzr[k] = inv * gzr[k];
            }
          }
          if (gW) {
            for (int64_t r = 0; r < R; ++r) {
              const int64_t wrow = g * Rw + (Rw == 1 ? 0 : r);
              const T* gyr = gyb + r * L;
              const T* yh = yhat.data() + r * L;
              T* gwr = gW + wrow * L;
              T* gbr = gbeta + wrow * L;
#pragma omp simd
              for (int64_t k = 0; k < L; ++k) {
                gwr[k] += gyr[k] * yh[k];
                gbr[k] += gyr[k];
              }
            }
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          const T* ar = a + (b * R + r) * la;
          const T* br = bv + (b * R + r) * lb;
          T* gar = ga + (b * R + r) * la;
          T* gbr = gb + (b * R + r) * lb;
          std::fill(gbr, gbr + lb, T(0));
          for (int64_t i = 0; i < la; ++i) {
            const T* gzi = gz.data() + r * L + i * lb;
            const T c = ar[i];
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < lb; ++j) {
              dot += gzi[j] * br[j];
              gbr[j] += c * gzi[j];
            }
            gar[i] = dot;
          }
        }
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
}

void check_grads(const std::vector<torch::Tensor>& grads, int64_t count, int64_t U, int64_t R, int64_t L,
                 at::ScalarType dtype) {
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == count, "expected ", count, " gradient tensors, got ", grads.size());
  for (const auto& t : grads) {
    if (t.numel() == 0) continue;
    TORCH_CHECK(t.dim() == 3 && t.size(0) == U && t.size(1) == R && t.size(2) <= L && t.stride(2) == 1 &&
                    t.scalar_type() == dtype && t.device().is_cpu(),
                "gradient rows must be [U, R, <= p*q] CPU tensors of the factors' dtype with unit last stride");
  }
}

torch::Tensor mixed_kron_forward(torch::Tensor w, torch::Tensor P, torch::Tensor Q) {
  check(w, "w"); check(P, "P"); check(Q, "Q");
  const int64_t G = w.size(0), U = w.size(1), S = w.size(2), R = P.size(2), p = P.size(3), q = Q.size(3);
  TORCH_CHECK(P.size(0) == G && P.size(1) == S && Q.size(0) == G && Q.size(1) == S && Q.size(2) == R,
              "mixed_kron_forward: w [G, U, S], P [G, S, R, p], Q [G, S, R, q]");
  auto out = torch::empty({G, U, R, p * q}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "mixed_kron_forward", [&] {
    mixed_forward<scalar_t>(w.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), G, U, S, R, p, q);
  });
  return out;
}

std::vector<torch::Tensor> mixed_kron_backward(torch::Tensor w, torch::Tensor P, torch::Tensor Q,
                                               std::vector<torch::Tensor> grads) {
  check(w, "w"); check(P, "P"); check(Q, "Q");
  const int64_t G = w.size(0), U = w.size(1), S = w.size(2), R = P.size(2), p = P.size(3), q = Q.size(3);
  check_grads(grads, G, U, R, p * q, P.scalar_type());
  auto gw = torch::empty({G, U, S}, P.options());
  auto gP = torch::empty_like(P);
  auto gQ = torch::empty_like(Q);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "mixed_kron_backward", [&] {
    mixed_backward<scalar_t>(w.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(),
                             rows_of<scalar_t>(grads), gw.data_ptr<scalar_t>(), gP.data_ptr<scalar_t>(),
                             gQ.data_ptr<scalar_t>(), G, U, S, R, p, q);
  });
  return {gw, gP, gQ};
}

torch::Tensor plain_kron_forward(torch::Tensor P, torch::Tensor Q) {
  check(P, "P"); check(Q, "Q");
  const int64_t G = P.size(0), U = P.size(1), R = P.size(2), p = P.size(3), q = Q.size(3);
  TORCH_CHECK(Q.size(0) == G && Q.size(1) == U && Q.size(2) == R, "plain_kron_forward: P [G, U, R, p], Q [G, U, R, q]");
  auto out = torch::empty({G, U, R, p * q}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "plain_kron_forward", [&] {
    plain_forward<scalar_t>(P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), G * U, R, p, q);
  });
  return out;
}

std::vector<torch::Tensor> plain_kron_backward(torch::Tensor P, torch::Tensor Q, std::vector<torch::Tensor> grads) {
  check(P, "P"); check(Q, "Q");
  const int64_t G = P.size(0), U = P.size(1), R = P.size(2), p = P.size(3), q = Q.size(3);
  check_grads(grads, G, U, R, p * q, P.scalar_type());
  auto gP = torch::empty_like(P);
  auto gQ = torch::empty_like(Q);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "plain_kron_backward", [&] {
    plain_backward<scalar_t>(P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), rows_of<scalar_t>(grads), U,
                             gP.data_ptr<scalar_t>(), gQ.data_ptr<scalar_t>(), G * U, R, p, q);
  });
  return {gP, gQ};
}


std::vector<torch::Tensor> pair_norm_forward(torch::Tensor a, torch::Tensor bv, c10::optional<torch::Tensor> W,
                                             c10::optional<torch::Tensor> beta, int64_t scope, int64_t used,
                                             double eps) {
  check(a, "a"); check(bv, "b");
  const int64_t B = a.size(0), R = a.size(1), la = a.size(2), lb = bv.size(2), L = la * lb;
  TORCH_CHECK(bv.size(0) == B && bv.size(1) == R, "pair_norm_forward: a [B, R, la], b [B, R, lb]");
  TORCH_CHECK(scope >= kNone && scope <= kRow && used >= 1 && used <= L, "pair_norm_forward: bad scope or used");
  const bool affine = W.has_value() && W->defined();
  int64_t Gw = 1, Rw = 1;
  if (affine) {
    check(*W, "W"); check(*beta, "beta");
    Gw = W->size(0), Rw = W->size(1);
    TORCH_CHECK(W->dim() == 3 && W->size(2) == L && B % Gw == 0 && (Rw == 1 || Rw == R) && beta->sizes() == W->sizes(),
                "pair_norm_forward: W and beta [Gw, 1 or R, la*lb] with Gw dividing B");
  }
  const int64_t groups = scope == kRow ? R : 1;
  auto y = torch::empty({B, R, L}, a.options());
  auto mean = torch::empty({B, groups}, a.options());
  auto rstd = torch::empty({B, groups}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_norm_forward", [&] {
    pair_forward<scalar_t>(a.data_ptr<scalar_t>(), bv.data_ptr<scalar_t>(),
                           affine ? W->data_ptr<scalar_t>() : nullptr, affine ? beta->data_ptr<scalar_t>() : nullptr,
                           y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), B, R, la, lb,
                           Gw, Rw, static_cast<int>(scope), used, eps);
  });
  return {y, mean, rstd};
}

std::vector<torch::Tensor> pair_norm_backward(torch::Tensor a, torch::Tensor bv, c10::optional<torch::Tensor> W,
                                              torch::Tensor mean, torch::Tensor rstd, torch::Tensor gy, int64_t scope,
                                              int64_t used, bool affine_grad) {
  check(a, "a"); check(bv, "b"); check(gy, "grad");
  const int64_t B = a.size(0), R = a.size(1), la = a.size(2), lb = bv.size(2);
  const bool affine = W.has_value() && W->defined();
  const int64_t Gw = affine ? W->size(0) : 1, Rw = affine ? W->size(1) : 1;
  auto ga = torch::empty_like(a);
  auto gb = torch::empty_like(bv);
  torch::Tensor gW, gbeta;
  if (affine && affine_grad && scope != kNone) {
    gW = torch::zeros_like(*W);
    gbeta = torch::zeros_like(*W);
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_norm_backward", [&] {
    pair_backward<scalar_t>(a.data_ptr<scalar_t>(), bv.data_ptr<scalar_t>(), affine ? W->data_ptr<scalar_t>() : nullptr,
                            mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
                            ga.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(),
                            gW.defined() ? gW.data_ptr<scalar_t>() : nullptr,
                            gbeta.defined() ? gbeta.data_ptr<scalar_t>() : nullptr, B, R, la, lb, Gw, Rw,
                            static_cast<int>(scope), used);
  });
  return {ga, gb, gW, gbeta};
}


// ---- LayerNorm statistics of leaf pairs from the leaves' own --------------------------------------
// rstd and shift = mean * rstd of the entries a_i b_j of each row r of block n (scope row), or of all R
// rows of block n together (scope joint: each row gets its block's), [N, R]: what order 2 folds into
// the fused update's coefficients (adapters/tlora.py folded_pair_norm), in one call each way.
std::vector<torch::Tensor> pair_stats_forward(torch::Tensor a, torch::Tensor bv, int64_t scope, double eps) {
  check(a, "a"); check(bv, "b");
  const int64_t N = a.size(0), R = a.size(1), la = a.size(2), lb = bv.size(2);
  TORCH_CHECK(bv.size(0) == N && bv.size(1) == R && (scope == kJoint || scope == kRow),
              "pair_stats_forward: a [N, R, la], b [N, R, lb], scope joint or row");
  auto rstd = torch::empty({N, R}, a.options());
  auto shift = torch::empty({N, R}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_stats_forward", [&] {
    using T = scalar_t;
    const T *pa = a.data_ptr<T>(), *pb = bv.data_ptr<T>();
    T *pr = rstd.data_ptr<T>(), *ps = shift.data_ptr<T>();
    const int64_t groups = scope == kJoint ? 1 : R, rows = scope == kJoint ? R : 1;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t s = 0; s < groups; ++s) {
          T mu, inv;
          group_stats(pa, pb, n, s, rows, R, la, lb, eps, mu, inv);
          for (int64_t r = s * rows; r < (s + 1) * rows; ++r) {
            pr[n * R + r] = inv;
            ps[n * R + r] = mu * inv;
          }
        }
      }
    });
  });
  return {rstd, shift};
}

// Gradients of a and b from those of rstd and shift. Per row, with mean = ma mb and var = ma^2 vb +
// mb^2 va + va vb (ma, va: the mean and variance of a's entries): d var / d ma = 2 ma vb, d var / d va =
// mb^2 + vb, and d ma / d a_i = 1 / la, d va / d a_i = 2 (a_i - ma) / la (likewise for b). Joint: the
// block's mean is the rows' mean, its variance theirs plus the variance of their means, so a row's
// mean gets g_mean / R + g_var 2 (mean_r - mean) / R and its variance g_var / R.
std::vector<torch::Tensor> pair_stats_backward(torch::Tensor a, torch::Tensor bv, torch::Tensor rstd,
                                               torch::Tensor g_rstd, torch::Tensor g_shift, int64_t scope) {
  check(a, "a"); check(bv, "b"); check(rstd, "rstd"); check(g_rstd, "grad rstd");
  check(g_shift, "grad shift");
  const int64_t N = a.size(0), R = a.size(1), la = a.size(2), lb = bv.size(2);
  auto ga = torch::empty_like(a);
  auto gb = torch::empty_like(bv);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_stats_backward", [&] {
    using T = scalar_t;
    const T *pa = a.data_ptr<T>(), *pb = bv.data_ptr<T>(), *pr = rstd.data_ptr<T>();
    const T *gr = g_rstd.data_ptr<T>(), *gs = g_shift.data_ptr<T>();
    T *pga = ga.data_ptr<T>(), *pgb = gb.data_ptr<T>();
    const int64_t groups = scope == kJoint ? 1 : R, rows = scope == kJoint ? R : 1;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> ma(rows), va(rows), mb(rows), vb(rows);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t s = 0; s < groups; ++s) {
          const int64_t r0 = s * rows;
          T mu = 0;
          for (int64_t k = 0; k < rows; ++k) {
            moments(pa + (n * R + r0 + k) * la, la, ma[k], va[k]);
            moments(pb + (n * R + r0 + k) * lb, lb, mb[k], vb[k]);
            mu += ma[k] * mb[k];
          }
          mu /= static_cast<T>(rows);
          const T inv = pr[n * R + r0];
          T g_inv = 0, g_sh = 0;
          for (int64_t r = r0; r < r0 + rows; ++r) g_inv += gr[n * R + r], g_sh += gs[n * R + r];
          const T g_mu = g_sh * inv, g_var = T(-0.5) * (g_inv + g_sh * mu) * inv * inv * inv;
          for (int64_t k = 0; k < rows; ++k) {
            const int64_t r = r0 + k;
            const T g_mean = (g_mu + g_var * 2 * (ma[k] * mb[k] - mu)) / static_cast<T>(rows);
            const T g_v = g_var / static_cast<T>(rows);
            const T g_ma = g_mean * mb[k] + g_v * 2 * ma[k] * vb[k], g_va = g_v * (mb[k] * mb[k] + vb[k]);
            const T g_mb = g_mean * ma[k] + g_v * 2 * mb[k] * va[k], g_vb = g_v * (ma[k] * ma[k] + va[k]);
            const T* ar = pa + (n * R + r) * la;
            const T* br = pb + (n * R + r) * lb;
            T* gar = pga + (n * R + r) * la;
            T* gbr = pgb + (n * R + r) * lb;
            const T ca = g_ma / static_cast<T>(la), da = g_va * 2 / static_cast<T>(la);
            const T cb = g_mb / static_cast<T>(lb), db = g_vb * 2 / static_cast<T>(lb);
            for (int64_t i = 0; i < la; ++i) gar[i] = ca + da * (ar[i] - ma[k]);
            for (int64_t j = 0; j < lb; ++j) gbr[j] = cb + db * (br[j] - mb[k]);
          }
        }
      }
    });
  });
  return {ga, gb};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mixed_kron_forward", &mixed_kron_forward, "sum_s w[g,u,s] P[g,s,r] (x) Q[g,s,r] -> [G, U, R, p*q]");
  m.def("mixed_kron_backward", &mixed_kron_backward, "(grad w, grad P, grad Q) from G members' gradient rows");
  m.def("plain_kron_forward", &plain_kron_forward, "P[g,u,r] (x) Q[g,u,r] -> [G, U, R, p*q]");
  m.def("plain_kron_backward", &plain_kron_backward, "(grad P, grad Q) from G members' gradient rows");
  m.def("pair_norm_forward", &pair_norm_forward, "(LN(a (x) b) with affine, mean, rstd)");
  m.def("pair_norm_backward", &pair_norm_backward, "(grad a, grad b, grad W, grad beta)");
  m.def("pair_stats_forward", &pair_stats_forward, "(rstd, mean * rstd) of LN over a (x) b, from the leaves");
  m.def("pair_stats_backward", &pair_stats_backward, "(grad a, grad b) of pair_stats_forward");
  m.def("kron_lowrank_forward", &kron_lowrank_forward, "(out + (x A_u) B_u, scale x A_u), factors never stored");
  m.def("kron_lowrank_backward", &kron_lowrank_backward, "(grad x, grads of both sides' operands)");
}
