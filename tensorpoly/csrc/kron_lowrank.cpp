// The low-rank update of a tensor adapter with its factors never written to memory:
//
//     y[e] = out[e] + (1/rank) (x[e] A_u) B_u,    u = task[e]
//
// where every rank row of A_u^T and of B_u is the last Kronecker product of the factor construction
// (see kron_rows.cpp): sum_s w[u, s] P[s, r] ⊗ Q[s, r] (TensorPoly-I) or P[u, r] ⊗ Q[u, r] (TLoRA,
// TensorPoly-II), cut to d. Materialising the factors per task costs, in a training step on a CPU,
// tens of MB written, read back by the matrix products, kept for the backward pass, and as many
// gradient bytes again. Here a task's factors are built in L1/L2 right before the products that use
// them, and in the backward pass rebuilt, and their gradients reduced into the operands' at once.
//
// Layout: a factor is built as K[k][r] (rank along the vector lanes, padded to whole vectors), which
// makes the Kronecker build and its gradient's reduction full-width vector work for any d, and the
// product x A a broadcast-FMA kernel. The two products that need rows [r][k] get a transposed copy.
// Examples are processed in task order, so each task's factors are built once per thread.
#include "kron_lowrank.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

template <typename T> struct Wide;
template <> struct Wide<float> { typedef float V __attribute__((vector_size(64))); static constexpr int64_t W = 16; };
template <> struct Wide<double> { typedef double V __attribute__((vector_size(64))); static constexpr int64_t W = 8; };

template <typename V> inline V ldv(const void* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> inline void stv(void* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

// One factor side: the operands of its last product. Mixed: w [U, S], P [S, R, p], Q [S, R, q].
// Plain: w null, P [U, R, p], Q [U, R, q] (S = 1 here: the task picks the operand).
template <typename T>
struct Side {
  const T* w;
  const T* P;
  const T* Q;
  int64_t S, R, p, q, d;
};

// A side's operands for one task, transposed so the rank runs along the lanes, and its factor K[d][RV].
template <typename T>
struct Built {
  using V = typename Wide<T>::V;
  static constexpr int64_t W = Wide<T>::W;
  int64_t RV = 0, ready = -1;  // ready: the operand block transposed into Pt, Qt (mixed: all experts, once)
  std::vector<V> Pt, Pw, Qt, K;  // Pt, Pw [S][p][RV] (Pw = w_s P_s), Qt [S][q][RV], K [d][RV]
  std::vector<T> ws;             // the task's mixing weights (1 for plain)

  void transpose_operands(const Side<T>& sd, int64_t block) {
    const int64_t S = sd.S, p = sd.p, q = sd.q;
    Pt.assign(S * p * RV, V{});
    Qt.assign(S * q * RV, V{});
    for (int64_t s = 0; s < S; ++s) {
      const int64_t o = sd.w ? s : block;
      T* pt = reinterpret_cast<T*>(Pt.data() + s * p * RV);
      T* qt = reinterpret_cast<T*>(Qt.data() + s * q * RV);
      for (int64_t r = 0; r < sd.R; ++r) {
        const T* Pr = sd.P + (o * sd.R + r) * p;
        const T* Qr = sd.Q + (o * sd.R + r) * q;
        for (int64_t i = 0; i < p; ++i) pt[i * RV * W + r] = Pr[i];
        for (int64_t j = 0; j < q; ++j) qt[j * RV * W + r] = Qr[j];
      }
    }
    ready = block;
  }

  void build(const Side<T>& sd, int64_t u) {
    RV = (sd.R + W - 1) / W;
    const int64_t S = sd.S, p = sd.p, q = sd.q;
    const int64_t block = sd.w ? 0 : u;
    if (ready != block) transpose_operands(sd, block);
    ws.assign(S, T(1));
    if (sd.w) std::copy(sd.w + u * S, sd.w + (u + 1) * S, ws.begin());
    Pw.resize(S * p * RV);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t n = 0; n < p * RV; ++n) Pw[s * p * RV + n] = ws[s] * Pt[s * p * RV + n];
    K.assign(sd.d * RV, V{});
    // Experts four at a time, their coefficients held in registers across the q entries of a chunk.
    for (int64_t i = 0; i < p; ++i) {
      const int64_t j_end = std::min(q, sd.d - i * q);
      if (j_end <= 0) break;
      for (int64_t c = 0; c < RV; ++c) {
        for (int64_t s0 = 0; s0 < S; s0 += 4) {
          const int64_t ns = std::min<int64_t>(4, S - s0);
          V pw[4] = {};
          for (int64_t s = 0; s < ns; ++s) pw[s] = Pw[((s0 + s) * p + i) * RV + c];
          const V* q0 = Qt.data() + (s0 * q) * RV + c;
          V* k = K.data() + (i * q) * RV + c;
          if (ns == 4) {
            for (int64_t j = 0; j < j_end; ++j)
              k[j * RV] += pw[0] * q0[j * RV] + pw[1] * q0[(q + j) * RV] + pw[2] * q0[(2 * q + j) * RV] +
                           pw[3] * q0[(3 * q + j) * RV];
          } else {
            for (int64_t s = 0; s < ns; ++s)
              for (int64_t j = 0; j < j_end; ++j) k[j * RV] += pw[s] * q0[(s * q + j) * RV];
          }
        }
      }
    }
  }

  // rows[r][k] = K[k][r] for k < d, row stride ld >= rows_stride(sd): built straight from the operands
  // (rank row by rank row, q entries at a time along the lanes), not by transposing K.
  static int64_t rows_stride(const Side<T>& sd) { return (sd.p * sd.q + W - 1) / W * W + W; }

  void rows(const Side<T>& sd, int64_t u, std::vector<T>& out, int64_t ld) const {
    const int64_t S = sd.S, p = sd.p, q = sd.q, nv = (q + W - 1) / W;
    const int64_t i_end = std::min(p, (sd.d + q - 1) / q);
    out.resize(sd.R * ld);
    std::vector<V> Qv(S * nv), acc(nv);
    const T* pw = reinterpret_cast<const T*>(Pw.data());
    for (int64_t r = 0; r < sd.R; ++r) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t o = sd.w ? s : u;
        T* dst = reinterpret_cast<T*>(Qv.data() + s * nv);
        std::memset(dst, 0, nv * W * sizeof(T));
        std::memcpy(dst, sd.Q + (o * sd.R + r) * q, q * sizeof(T));
      }
      T* row = out.data() + r * ld;
      for (int64_t i = 0; i < i_end; ++i) {
        for (int64_t k = 0; k < nv; ++k) acc[k] = V{};
        for (int64_t s = 0; s < S; ++s) {
          const T c = pw[(s * p + i) * RV * W + r];
          for (int64_t k = 0; k < nv; ++k) acc[k] += c * Qv[s * nv + k];
        }
        // A chunk's padding lanes spill into the next chunk, written after it; the stride leaves room.
        for (int64_t k = 0; k < nv; ++k) stv(row + i * q + k * W, acc[k]);
      }
    }
  }
};

// H[t][c] = scale * sum_k X[t][k] K[k][c] for T tokens (X rows of length d, stride ldx); H [T][RV].
template <typename T, int TB, int RC>
inline void project_tile(const T* X, int64_t ldx, const typename Wide<T>::V* K, int64_t RV, int64_t c0, int64_t d,
                         typename Wide<T>::V* H, T scale) {
  using V = typename Wide<T>::V;
  V acc[TB][RC] = {};
  for (int64_t k = 0; k < d; ++k) {
    V kv[RC];
    for (int c = 0; c < RC; ++c) kv[c] = K[k * RV + c0 + c];
    for (int t = 0; t < TB; ++t) {
      const T xv = X[t * ldx + k];
      for (int c = 0; c < RC; ++c) acc[t][c] += xv * kv[c];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int c = 0; c < RC; ++c) H[t * RV + c0 + c] = acc[t][c] * scale;
}

template <typename T>
void project(const T* X, int64_t n_tok, int64_t d, const typename Wide<T>::V* K, int64_t RV,
             typename Wide<T>::V* H, T scale) {
  for (int64_t c0 = 0; c0 < RV; c0 += 2) {
    int64_t t = 0;
    if (RV - c0 >= 2) {
      for (; t + 4 <= n_tok; t += 4) project_tile<T, 4, 2>(X + t * d, d, K, RV, c0, d, H + t * RV, scale);
      for (; t < n_tok; ++t) project_tile<T, 1, 2>(X + t * d, d, K, RV, c0, d, H + t * RV, scale);
    } else {
      for (; t + 8 <= n_tok; t += 8) project_tile<T, 8, 1>(X + t * d, d, K, RV, c0, d, H + t * RV, scale);
      for (; t < n_tok; ++t) project_tile<T, 1, 1>(X + t * d, d, K, RV, c0, d, H + t * RV, scale);
    }
  }
}

// Y[t][k] = base[t][k] + sum_r H[t][r] rows[r][k] for k < D (base null: 0). H scalars [T][ldh],
// rows [R][dp] zero-padded past D.
template <typename T, int TB, int KC>
inline void expand_tile(const T* base, T* Y, int64_t D, int64_t k, const T* H, int64_t ldh, const T* rows,
                        int64_t dp, int64_t R, int64_t valid) {
  using V = typename Wide<T>::V;
  constexpr int64_t W = Wide<T>::W;
  V acc[TB][KC];
  for (int t = 0; t < TB; ++t)
    for (int c = 0; c < KC; ++c) {
      if (!base) {
        acc[t][c] = V{};
      } else if (valid == KC * W) {
        acc[t][c] = ldv<V>(base + t * D + k + c * W);
      } else {  // the last, partial vector of a row
        acc[t][c] = V{};
        std::memcpy(&acc[t][c], base + t * D + k, valid * sizeof(T));
      }
    }
  for (int64_t r = 0; r < R; ++r) {
    V bv[KC];
    for (int c = 0; c < KC; ++c) bv[c] = ldv<V>(rows + r * dp + k + c * W);
    for (int t = 0; t < TB; ++t) {
      const T hv = H[t * ldh + r];
      for (int c = 0; c < KC; ++c) acc[t][c] += hv * bv[c];
    }
  }
  for (int t = 0; t < TB; ++t) {
    if (valid == KC * W) {
      for (int c = 0; c < KC; ++c) stv(Y + t * D + k + c * W, acc[t][c]);
    } else {
      std::memcpy(Y + t * D + k, &acc[t][0], valid * sizeof(T));
    }
  }
}

template <typename T, int TB>
inline void expand_tokens(const T* base, T* Y, int64_t D, const T* H, int64_t ldh, const T* rows, int64_t dp,
                          int64_t R) {
  constexpr int64_t W = Wide<T>::W;
  int64_t k = 0;
  for (; k + 4 * W <= D; k += 4 * W) expand_tile<T, TB, 4>(base, Y, D, k, H, ldh, rows, dp, R, 4 * W);
  for (; k + W <= D; k += W) expand_tile<T, TB, 1>(base, Y, D, k, H, ldh, rows, dp, R, W);
  if (k < D) expand_tile<T, TB, 1>(base, Y, D, k, H, ldh, rows, dp, R, D - k);
}

template <typename T>
void expand(const T* base, T* Y, int64_t n_tok, int64_t D, const T* H, int64_t ldh, const T* rows, int64_t dp,
            int64_t R) {
  int64_t t = 0;
  for (; t + 4 <= n_tok; t += 4)
    expand_tokens<T, 4>(base ? base + t * D : nullptr, Y + t * D, D, H + t * ldh, ldh, rows, dp, R);
  for (; t < n_tok; ++t) expand_tokens<T, 1>(base ? base + t * D : nullptr, Y + t * D, D, H + t * ldh, ldh, rows, dp, R);
}

// G[k][c] += sum_t X[t][k] H[t][c]: a factor's gradient in the K layout, summed over T tokens.
template <typename T, int KB>
inline void outer_tile(const T* X, int64_t d, int64_t n_tok, int64_t k, const typename Wide<T>::V* H, int64_t RV,
                       int64_t c, typename Wide<T>::V* G) {
  using V = typename Wide<T>::V;
  V acc[KB];
  for (int b = 0; b < KB; ++b) acc[b] = G[(k + b) * RV + c];
  for (int64_t t = 0; t < n_tok; ++t) {
    const V hv = H[t * RV + c];
    const T* xr = X + t * d + k;
    for (int b = 0; b < KB; ++b) acc[b] += xr[b] * hv;
  }
  for (int b = 0; b < KB; ++b) G[(k + b) * RV + c] = acc[b];
}

template <typename T>
void outer(const T* X, int64_t n_tok, int64_t d, const typename Wide<T>::V* H, int64_t RV, typename Wide<T>::V* G) {
  for (int64_t c = 0; c < RV; ++c) {
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) outer_tile<T, 8>(X, d, n_tok, k, H, RV, c, G);
    for (; k < d; ++k) outer_tile<T, 1>(X, d, n_tok, k, H, RV, c, G);
  }
}

// The gradient of one task's factor, G [d][RV], reduced into its operands' gradients (accumulated):
// gw [S] (mixed), gP and gQ laid out as the operands of one task (plain) or of all experts (mixed).
template <typename T>
void reduce(const Side<T>& sd, const Built<T>& b, const typename Wide<T>::V* G, T* gw, T* gP, T* gQ) {
  using V = typename Wide<T>::V;
  constexpr int64_t W = Wide<T>::W;
  const int64_t S = sd.S, p = sd.p, q = sd.q, RV = b.RV;
  const int64_t i_end = std::min(p, (sd.d + q - 1) / q);
  std::vector<V> gPt(S * p * RV, V{}), gQt(S * q * RV, V{}), gwv(S, V{});
  // Two passes over G, four experts at a time with their sums in registers: the dots with Q (for P's
  // and w's gradients) chunk by chunk, then Q's gradient entry by entry.
  for (int64_t c = 0; c < RV; ++c) {
    for (int64_t s0 = 0; s0 < S; s0 += 4) {
      const int64_t ns = std::min<int64_t>(4, S - s0);
      for (int64_t i = 0; i < i_end; ++i) {
        const int64_t j_end = std::min(q, sd.d - i * q);
        V dot[4] = {};
        for (int64_t j = 0; j < j_end; ++j) {
          const V g = G[(i * q + j) * RV + c];
          for (int64_t s = 0; s < ns; ++s) dot[s] += g * b.Qt[((s0 + s) * q + j) * RV + c];
        }
        for (int64_t s = 0; s < ns; ++s) {
          gPt[((s0 + s) * p + i) * RV + c] = b.ws[s0 + s] * dot[s];
          gwv[s0 + s] += b.Pt[((s0 + s) * p + i) * RV + c] * dot[s];
        }
      }
      for (int64_t j = 0; j < q; ++j) {
        V acc[4] = {};
        for (int64_t i = 0; i < i_end && i * q + j < sd.d; ++i) {
          const V g = G[(i * q + j) * RV + c];
          for (int64_t s = 0; s < ns; ++s) acc[s] += g * b.Pw[((s0 + s) * p + i) * RV + c];
        }
        for (int64_t s = 0; s < ns; ++s) gQt[((s0 + s) * q + j) * RV + c] = acc[s];
      }
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    const T* pt = reinterpret_cast<const T*>(gPt.data() + s * p * RV);
    const T* qt = reinterpret_cast<const T*>(gQt.data() + s * q * RV);
    for (int64_t r = 0; r < sd.R; ++r) {
      T* gPr = gP + (s * sd.R + r) * p;
      T* gQr = gQ + (s * sd.R + r) * q;
      for (int64_t i = 0; i < p; ++i) gPr[i] += pt[i * RV * W + r];
      for (int64_t j = 0; j < q; ++j) gQr[j] += qt[j * RV * W + r];
    }
    if (gw) {
      T sum = 0;
      for (int64_t l = 0; l < W; ++l) sum += gwv[s][l];
      gw[s] += sum;
    }
  }
}

template <typename T>
Side<T> side_of(const c10::optional<torch::Tensor>& w, const torch::Tensor& P, const torch::Tensor& Q, int64_t d) {
  const bool mixed = w.has_value() && w->defined();
  return {mixed ? w->data_ptr<T>() : nullptr, P.data_ptr<T>(), Q.data_ptr<T>(), mixed ? P.size(0) : 1, P.size(1),
          P.size(2), Q.size(2), d};
}

// Example indices in task order (stable), so that each thread builds a task's factors once.
std::vector<int64_t> task_order(const int64_t* task, int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return task[a] < task[b]; });
  return order;
}

void check_side(const c10::optional<torch::Tensor>& w, const torch::Tensor& P, const torch::Tensor& Q, int64_t d,
                int64_t U, const char* name) {
  const bool mixed = w.has_value() && w->defined();
  TORCH_CHECK(P.dim() == 3 && Q.dim() == 3 && P.is_contiguous() && Q.is_contiguous() && P.size(0) == Q.size(0) &&
                  P.size(1) == Q.size(1),
              "kron_lowrank: side ", name, ": P [S or U, R, p] and Q [S or U, R, q], contiguous");
  TORCH_CHECK(P.size(2) * Q.size(2) >= d, "kron_lowrank: side ", name, ": p*q = ", P.size(2) * Q.size(2),
              " is shorter than d = ", d);
  if (mixed) {
    TORCH_CHECK(w->dim() == 2 && w->is_contiguous() && w->size(0) == U && w->size(1) == P.size(0),
                "kron_lowrank: side ", name, ": w [U, S], contiguous");
  } else {
    TORCH_CHECK(P.size(0) == U, "kron_lowrank: side ", name, ": plain operands need one block per task");
  }
}

}  // namespace

std::vector<torch::Tensor> kron_lowrank_forward(torch::Tensor x, torch::Tensor out, torch::Tensor task,
                                                double scale, c10::optional<torch::Tensor> wA, torch::Tensor PA,
                                                torch::Tensor QA, c10::optional<torch::Tensor> wB, torch::Tensor PB,
                                                torch::Tensor QB) {
  TORCH_CHECK(x.dim() == 3 && out.dim() == 3 && x.is_contiguous() && out.is_contiguous() &&
                  x.size(0) == out.size(0) && x.size(1) == out.size(1),
              "kron_lowrank_forward: x [n, T, d_in] and out [n, T, d_out], contiguous");
  const int64_t n = x.size(0), n_tok = x.size(1), d_in = x.size(2), d_out = out.size(2), R = PA.size(1);
  TORCH_CHECK(task.dim() == 1 && task.size(0) == n && task.scalar_type() == torch::kInt64,
              "kron_lowrank_forward: task [n] int64");
  const int64_t U = wA.has_value() && wA->defined() ? wA->size(0) : PA.size(0);
  check_side(wA, PA, QA, d_in, U, "A");
  check_side(wB, PB, QB, d_out, U, "B");
  TORCH_CHECK(PB.size(1) == R, "kron_lowrank_forward: both sides need the same rank");
  auto y = torch::empty_like(out);
  auto h = torch::empty({n, n_tok, R}, x.options());
  const int64_t* tk = task.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e) TORCH_CHECK(tk[e] >= 0 && tk[e] < U, "kron_lowrank_forward: task index out of range");
  const auto order = task_order(tk, n);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_lowrank_forward", [&] {
    using T = scalar_t;
    using V = typename Wide<T>::V;
    constexpr int64_t W = Wide<T>::W;
    const Side<T> A = side_of<T>(wA, PA, QA, d_in), B = side_of<T>(wB, PB, QB, d_out);
    const int64_t ldB = Built<T>::rows_stride(B);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      Built<T> a, b;
      std::vector<T> rowsB;
      std::vector<V> H;
      int64_t current = -1;
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t e = order[pos], u = tk[e];
        if (u != current) {
          a.build(A, u);
          b.build(B, u);
          b.rows(B, u, rowsB, ldB);
          H.resize(n_tok * a.RV);
          current = u;
        }
        project<T>(x.data_ptr<T>() + e * n_tok * d_in, n_tok, d_in, a.K.data(), a.RV, H.data(), static_cast<T>(scale));
        const T* Hs = reinterpret_cast<const T*>(H.data());
        T* he = h.data_ptr<T>() + e * n_tok * R;
        for (int64_t t = 0; t < n_tok; ++t) std::memcpy(he + t * R, Hs + t * a.RV * W, R * sizeof(T));
        expand<T>(out.data_ptr<T>() + e * n_tok * d_out, y.data_ptr<T>() + e * n_tok * d_out, n_tok, d_out, Hs,
                  a.RV * W, rowsB.data(), ldB, R);
      }
    });
  });
  return {y, h};
}

std::vector<torch::Tensor> kron_lowrank_backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor h,
                                                 torch::Tensor task, double scale, c10::optional<torch::Tensor> wA,
                                                 torch::Tensor PA, torch::Tensor QA, c10::optional<torch::Tensor> wB,
                                                 torch::Tensor PB, torch::Tensor QB, bool need_x) {
  TORCH_CHECK(grad_y.is_contiguous() && x.is_contiguous() && h.is_contiguous(), "kron_lowrank_backward: contiguous inputs");
  const int64_t n = x.size(0), n_tok = x.size(1), d_in = x.size(2), d_out = grad_y.size(2), R = PA.size(1);
  const bool mixed = wA.has_value() && wA->defined();
  const int64_t U = mixed ? wA->size(0) : PA.size(0);
  const int64_t* tk = task.data_ptr<int64_t>();
  const auto order = task_order(tk, n);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  // Per thread, the operands' gradients it accumulated (a task may be split between two threads).
  auto acc = [&](const torch::Tensor& t) {
    std::vector<int64_t> shape{threads};
    for (auto s : t.sizes()) shape.push_back(s);
    return torch::zeros(shape, t.options());
  };
  torch::Tensor gwA = mixed ? acc(*wA) : torch::Tensor(), gwB = mixed ? acc(*wB) : torch::Tensor();
  torch::Tensor gPA = acc(PA), gQA = acc(QA), gPB = acc(PB), gQB = acc(QB);
  torch::Tensor gx = need_x ? torch::empty_like(x) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_lowrank_backward", [&] {
    using T = scalar_t;
    using V = typename Wide<T>::V;
    constexpr int64_t W = Wide<T>::W;
    const Side<T> A = side_of<T>(wA, PA, QA, d_in), B = side_of<T>(wB, PB, QB, d_out);
    const int64_t ldA = Built<T>::rows_stride(A);
    const int64_t chunk = (n + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t tbegin, int64_t tend) {
      for (int64_t th = tbegin; th < tend; ++th) {
        Built<T> a, b;
        std::vector<T> rowsA;
        std::vector<V> GH, Hp, GA, GB;
        int64_t current = -1;
        auto flush = [&]() {
          if (current < 0) return;
          // Mixed: the operands are the experts' (one block for all tasks) and w has a row per task;
          // plain: the task's own block.
          const int64_t blockA = mixed ? 0 : current * R * A.p, blockB = mixed ? 0 : current * R * B.p;
          reduce<T>(A, a, GA.data(), mixed ? gwA.data_ptr<T>() + (th * U + current) * A.S : nullptr,
                    gPA.data_ptr<T>() + th * PA.numel() + blockA,
                    gQA.data_ptr<T>() + th * QA.numel() + (mixed ? 0 : current * R * A.q));
          reduce<T>(B, b, GB.data(), mixed ? gwB.data_ptr<T>() + (th * U + current) * B.S : nullptr,
                    gPB.data_ptr<T>() + th * PB.numel() + blockB,
                    gQB.data_ptr<T>() + th * QB.numel() + (mixed ? 0 : current * R * B.q));
        };
        for (int64_t pos = th * chunk; pos < std::min(n, (th + 1) * chunk); ++pos) {
          const int64_t e = order[pos], u = tk[e];
          if (u != current) {
            flush();
            a.build(A, u);
            b.build(B, u);
            if (need_x) a.rows(A, u, rowsA, ldA);
            GA.assign(d_in * a.RV, V{});
            GB.assign(d_out * b.RV, V{});
            GH.resize(n_tok * a.RV);
            Hp.assign(n_tok * a.RV, V{});
            current = u;
          }
          const T* gy = grad_y.data_ptr<T>() + e * n_tok * d_out;
          const T* xe = x.data_ptr<T>() + e * n_tok * d_in;
          // The rank-r intermediate as saved (already scaled), padded to whole vectors.
          const T* he = h.data_ptr<T>() + e * n_tok * R;
          T* hp = reinterpret_cast<T*>(Hp.data());
          for (int64_t t = 0; t < n_tok; ++t) std::memcpy(hp + t * a.RV * W, he + t * R, R * sizeof(T));
          project<T>(gy, n_tok, d_out, b.K.data(), b.RV, GH.data(), static_cast<T>(scale));
          outer<T>(gy, n_tok, d_out, Hp.data(), b.RV, GB.data());
          outer<T>(xe, n_tok, d_in, GH.data(), a.RV, GA.data());
          if (need_x)
            expand<T>(nullptr, gx.data_ptr<T>() + e * n_tok * d_in, n_tok, d_in,
                      reinterpret_cast<const T*>(GH.data()), a.RV * W, rowsA.data(), ldA, R);
        }
        flush();
      }
    });
  });
  auto total = [](const torch::Tensor& t) { return t.defined() ? t.sum(0) : t; };
  return {gx, total(gwA), total(gPA), total(gQA), total(gwB), total(gPB), total(gQB)};
}
