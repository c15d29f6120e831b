// The low-rank update of a tensor adapter with its factors never written to memory:
//
//     y[e] = out[e] + scale (x[e] A_u) B_u,    u = task[e]
//
// where every rank row r of A_u^T and of B_u is an affine function of a mixture of Kronecker products,
//
//     row[r] = W[r] * (sum_s c[u, s, r] P[s, r] ⊗ Q[s, r] - m[u, r]) + sigma[u] beta[r],   cut to d,
//
// the experts' operands P, Q (mixed: TensorPoly-I) or the task's own (plain, one term: TLoRA,
// TensorPoly-II); c is per task and expert, optionally per rank row (an absent c is 1). Without the
// affine part (W and m absent) a row is the bare mixture: the last Kronecker product of a factor built
// from order 3 on. With it, a row is a mixture of LayerNorm'd leaf pairs, the whole factor at order 2:
// LN(z) W + beta = W (rstd z - rstd mean) + beta, the statistics folded into c and m by the caller;
// with m but no W (the norm's affine frozen at the identity) a row is the mixture minus m.
//
// Why: materialising the factors per task costs, in a training step on a CPU, tens of MB written, read
// back by the matrix products, kept for the backward pass, and as many gradient bytes again. Here a
// task's factors are built in L1/L2 right before the products that use them; in the backward pass they
// are rebuilt, and their gradients reduced into the operands' at once.
//
// Layout: a factor is built as K[k][r] (rank along the vector lanes, padded to whole vectors), which
// makes the Kronecker build and its gradient's reduction full-width vector work for any d, and the
// product x A a broadcast-FMA kernel. The two products that need rows [r][k] build those directly.
// Examples are processed in task order, so each thread builds a task's factors once.
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

// One factor side, as in the header comment. c: null, [U, S] (c_per_row false) or [U, S, R]. P, Q:
// [S, R, p], [S, R, q] (mixed) or [U, R, p], [U, R, q] (plain, S = 1). W, beta: null or [Rw, ldw] with
// Rw 1 (one row for all) or R, ldw >= d; m [U, R]; sigma [U].
template <typename T>
struct Side {
  const T* c;
  bool c_per_row, mixed;
  const T* P;
  const T* Q;
  const T* W;
  const T* beta;
  const T* m;
  const T* sigma;
  int64_t Rw, ldw, S, R, p, q, d;
  bool affine() const { return W != nullptr; }
  bool shifted() const { return m != nullptr; }  // W absent, m present: row = mixture - m
  const T* W_row(int64_t r) const { return W + (Rw == 1 ? 0 : r) * ldw; }
  const T* beta_row(int64_t r) const { return beta + (Rw == 1 ? 0 : r) * ldw; }
};

// A side's operands for one task, transposed so the rank runs along the lanes, and its factor K[d][RV].
template <typename T>
struct Built {
  using V = typename Wide<T>::V;
  static constexpr int64_t W = Wide<T>::W;
  int64_t RV = 0, ready = -1;  // ready: the operand block transposed into Pt, Qt (mixed: all experts, once)
  bool affine_ready = false;
  std::vector<V> Pt, Pw, Qt, cv;  // Pt, Pw [S][p][RV] (Pw = c_s P_s), Qt [S][q][RV], cv [S][RV]
  std::vector<V> K, Kp, Wt, Bt;   // K [d][RV]; affine: Kp the mixture before it, Wt and Bt W and beta as K
  std::vector<V> mv;              // m[u] along the lanes [RV] (affine)
  T sg = 0;                       // sigma[u] (affine)

  static void transpose_into(std::vector<V>& out, const T* src, int64_t rows, int64_t len, int64_t ld_src,
                             int64_t RV, bool one_row) {
    out.assign(len * RV, V{});
    T* o = reinterpret_cast<T*>(out.data());
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = src + (one_row ? 0 : r) * ld_src;
      for (int64_t i = 0; i < len; ++i) o[i * RV * W + r] = row[i];
    }
  }

  void transpose_operands(const Side<T>& sd, int64_t block) {
    const int64_t S = sd.S, p = sd.p, q = sd.q;
    Pt.resize(S * p * RV);
    Qt.resize(S * q * RV);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t o = sd.mixed ? s : block;
      std::vector<V> one;
      transpose_into(one, sd.P + o * sd.R * p, sd.R, p, p, RV, false);
      std::copy(one.begin(), one.end(), Pt.begin() + s * p * RV);
      transpose_into(one, sd.Q + o * sd.R * q, sd.R, q, q, RV, false);
      std::copy(one.begin(), one.end(), Qt.begin() + s * q * RV);
    }
    ready = block;
  }

  // Everything of task u that the factor, its rows and the reduction of its gradient start from.
  void prepare(const Side<T>& sd, int64_t u) {
    RV = (sd.R + W - 1) / W;
    const int64_t S = sd.S, p = sd.p;
    const int64_t block = sd.mixed ? 0 : u;
    if (ready != block) transpose_operands(sd, block);
    cv.assign(S * RV, V{});
    for (int64_t s = 0; s < S; ++s) {
      T* cs = reinterpret_cast<T*>(cv.data() + s * RV);
      for (int64_t r = 0; r < sd.R; ++r)
        cs[r] = !sd.c ? T(1) : sd.c_per_row ? sd.c[(u * S + s) * sd.R + r] : sd.c[u * S + s];
    }
    Pw.resize(S * p * RV);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < p; ++i)
        for (int64_t k = 0; k < RV; ++k) Pw[(s * p + i) * RV + k] = cv[s * RV + k] * Pt[(s * p + i) * RV + k];
    if (sd.shifted()) {
      mv.assign(RV, V{});
      std::copy(sd.m + u * sd.R, sd.m + (u + 1) * sd.R, reinterpret_cast<T*>(mv.data()));
    }
    if (sd.affine()) {
      sg = sd.sigma[u];
      if (!affine_ready) {
        transpose_into(Wt, sd.W, sd.R, sd.d, sd.ldw, RV, sd.Rw == 1);
        transpose_into(Bt, sd.beta, sd.R, sd.d, sd.ldw, RV, sd.Rw == 1);
        affine_ready = true;
      }
    }
  }

  // The factor K (after prepare), and with an affine part the mixture before it, Kp.
  void factor(const Side<T>& sd) {
    const int64_t S = sd.S, p = sd.p, q = sd.q;
    std::vector<V>& mix = sd.affine() ? Kp : K;
    mix.assign(sd.d * RV, V{});
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
          V* k = mix.data() + (i * q) * RV + c;
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
    if (!sd.shifted()) return;
    if (!sd.affine()) {
      for (int64_t k = 0; k < sd.d; ++k)
        for (int64_t c = 0; c < RV; ++c) K[k * RV + c] -= mv[c];
      return;
    }
    K.resize(sd.d * RV);
    for (int64_t k = 0; k < sd.d; ++k)
      for (int64_t c = 0; c < RV; ++c) K[k * RV + c] = Wt[k * RV + c] * (Kp[k * RV + c] - mv[c]) + sg * Bt[k * RV + c];
  }

  // Row r's chunks row[i q : (i + 1) q] = sum_s Pw[s][i][r] Q_s[r] (Qv: each expert's Q row in NV vectors;
  // NV 0: any length), IB chunks at a time: independent sums, so that the experts' multiply-adds do not
  // wait on each other (with short chunks one chain per chunk is latency-bound).
  template <int NV>
  void row_chunks(const Side<T>& sd, int64_t r, const V* Qv, T* row) const {
    constexpr int IB = NV == 0 ? 1 : NV == 1 ? 8 : 4;
    const int64_t i_end = std::min(sd.p, (sd.d + sd.q - 1) / sd.q);
    int64_t i0 = 0;
    for (; i0 + IB <= i_end; i0 += IB) chunk_block<NV, IB>(sd, r, Qv, row, i0);
    for (; i0 < i_end; ++i0) chunk_block<NV, 1>(sd, r, Qv, row, i0);
  }

  template <int NV, int IB>
  inline void chunk_block(const Side<T>& sd, int64_t r, const V* Qv, T* row, int64_t i0) const {
    const int64_t S = sd.S, p = sd.p, q = sd.q;
    const T* pw = reinterpret_cast<const T*>(Pw.data()) + i0 * RV * W + r;
    if constexpr (NV == 0) {
      const int64_t nv = (q + W - 1) / W;
      for (int64_t k = 0; k < nv; ++k) {
        V acc{};
        for (int64_t s = 0; s < S; ++s) acc += pw[s * p * RV * W] * Qv[s * nv + k];
        stv(row + i0 * q + k * W, acc);
      }
    } else {
      V acc[IB][NV] = {};
      for (int64_t s = 0; s < S; ++s) {
        V qs[NV];
        for (int k = 0; k < NV; ++k) qs[k] = Qv[s * NV + k];
        const T* c = pw + s * p * RV * W;
        for (int b = 0; b < IB; ++b) {
          const T cb = c[b * RV * W];
          for (int k = 0; k < NV; ++k) acc[b][k] += cb * qs[k];
        }
      }
      // A chunk's padding lanes spill into the next chunk, written after it; the stride leaves room.
      for (int b = 0; b < IB; ++b)
        for (int k = 0; k < NV; ++k) stv(row + (i0 + b) * q + k * W, acc[b][k]);
    }
  }

  // rows[r][k] = K[k][r] for k < d, row stride ld >= rows_stride(sd): built straight from the operands
  // (rank row by rank row, q entries at a time along the lanes), not by transposing K.
  static int64_t rows_stride(const Side<T>& sd) { return (sd.p * sd.q + W - 1) / W * W + W; }

  void rows(const Side<T>& sd, int64_t u, std::vector<T>& out, int64_t ld) const {
    const int64_t S = sd.S, q = sd.q, nv = (q + W - 1) / W;
    out.resize(sd.R * ld);
    std::vector<V> Qv(S * nv);
    for (int64_t r = 0; r < sd.R; ++r) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t o = sd.mixed ? s : u;
        T* dst = reinterpret_cast<T*>(Qv.data() + s * nv);
        std::memset(dst, 0, nv * W * sizeof(T));
        std::memcpy(dst, sd.Q + (o * sd.R + r) * q, q * sizeof(T));
      }
      T* row = out.data() + r * ld;
      switch (nv) {
        case 1: row_chunks<1>(sd, r, Qv.data(), row); break;
        case 2: row_chunks<2>(sd, r, Qv.data(), row); break;
        case 3: row_chunks<3>(sd, r, Qv.data(), row); break;
        case 4: row_chunks<4>(sd, r, Qv.data(), row); break;
        default: row_chunks<0>(sd, r, Qv.data(), row);
      }
      if (sd.affine()) {
        const T* Wr = sd.W_row(r);
        const T* br = sd.beta_row(r);
        const T mr = sd.m[u * sd.R + r], sgr = sd.sigma[u];
#pragma omp simd
        for (int64_t k = 0; k < sd.d; ++k) row[k] = Wr[k] * (row[k] - mr) + sgr * br[k];
      } else if (sd.shifted()) {
        const T mr = sd.m[u * sd.R + r];
#pragma omp simd
        for (int64_t k = 0; k < sd.d; ++k) row[k] -= mr;
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

// Per thread, the gradients of a side's inputs, accumulated over the tasks it processed: gc like c,
// gP and gQ like P and Q; affine: gW and gbeta in the K layout [d][RV], gm [U, R], gsigma [U].
template <typename T>
struct SideGrads {
  T *gc, *gP, *gQ, *gW, *gbeta, *gm, *gsigma;
};

// P's and Q's gradients in the lane layout of Built's Pt and Qt ([S][p][RV], [S][q][RV]). Mixed operands
// are every task's: their sums stay in this layout over all of a thread's tasks, and are transposed into
// the gradients' layout once (add_into); a plain side's are the task's own, transposed per task.
template <typename T>
struct LaneGrads {
  using V = typename Wide<T>::V;
  std::vector<V> P, Q;

  void zero(const Side<T>& sd, int64_t RV) {
    P.assign(sd.S * sd.p * RV, V{});
    Q.assign(sd.S * sd.q * RV, V{});
  }

  // gP[block + s][r][:] += P[s][:][r] (likewise Q), block: the task's operands (plain) or 0 (mixed).
  void add_into(const Side<T>& sd, int64_t RV, int64_t block, const SideGrads<T>& out) const {
    constexpr int64_t W = Wide<T>::W;
    for (int64_t s = 0; s < sd.S; ++s) {
      const T* pt = reinterpret_cast<const T*>(P.data() + s * sd.p * RV);
      const T* qt = reinterpret_cast<const T*>(Q.data() + s * sd.q * RV);
      for (int64_t r = 0; r < sd.R; ++r) {
        T* gPr = out.gP + ((block + s) * sd.R + r) * sd.p;
        T* gQr = out.gQ + ((block + s) * sd.R + r) * sd.q;
        for (int64_t i = 0; i < sd.p; ++i) gPr[i] += pt[i * RV * W + r];
        for (int64_t j = 0; j < sd.q; ++j) gQr[j] += qt[j * RV * W + r];
      }
    }
  }
};

// The gradient G [d][RV] of one task's factor, lane vector c, reduced into the sums of experts s0 .. s0 + NS
// (gPt, gQt, gcv in the lane layout of Built's Pt, Qt, cv). Two passes over G with the experts' sums in
// registers, two chunks (pass 1) or two entries (pass 2) at a time, so that each load of G feeds 2 NS
// multiply-adds: the dots with Q chunk by chunk (P's and c's gradients), then Q's gradient entry by entry.
template <typename T, int NS>
void reduce_experts(const Side<T>& sd, const Built<T>& b, const typename Wide<T>::V* G, int64_t c, int64_t s0,
                    typename Wide<T>::V* gPt, typename Wide<T>::V* gQt, typename Wide<T>::V* gcv) {
  using V = typename Wide<T>::V;
  const int64_t p = sd.p, q = sd.q, RV = b.RV;
  const int64_t full = std::min(p, sd.d / q);             // chunks of q entries, all inside d
  const int64_t i_end = std::min(p, (sd.d + q - 1) / q);  // and the last, partial one
  const V* Qt = b.Qt.data() + s0 * q * RV + c;            // Qt[s][j] at (s q + j) RV
  const V* Pw = b.Pw.data() + s0 * p * RV + c;            // Pw[s][i] at (s p + i) RV
  const V* g = G + c;                                      // G[k] at k RV
  auto finish = [&](int64_t i, const V* dot) {
    for (int s = 0; s < NS; ++s) {
      gPt[((s0 + s) * p + i) * RV + c] += b.cv[(s0 + s) * RV + c] * dot[s];
      gcv[(s0 + s) * RV + c] += b.Pt[((s0 + s) * p + i) * RV + c] * dot[s];
    }
  };
  int64_t i = 0;
  for (; i + 2 <= full; i += 2) {
    V d0[NS] = {}, d1[NS] = {};
    const V* g0 = g + i * q * RV;
    const V* g1 = g0 + q * RV;
    for (int64_t j = 0; j < q; ++j) {
      const V a0 = g0[j * RV], a1 = g1[j * RV];
      for (int s = 0; s < NS; ++s) {
        const V qv = Qt[(s * q + j) * RV];
        d0[s] += a0 * qv;
        d1[s] += a1 * qv;
      }
    }
    finish(i, d0);
    finish(i + 1, d1);
  }
  for (; i < i_end; ++i) {
    const int64_t j_end = std::min(q, sd.d - i * q);
    V d0[NS] = {};
    for (int64_t j = 0; j < j_end; ++j) {
      const V a0 = g[(i * q + j) * RV];
      for (int s = 0; s < NS; ++s) d0[s] += a0 * Qt[(s * q + j) * RV];
    }
    finish(i, d0);
  }
  const int64_t tail = full < i_end ? sd.d - full * q : 0;  // entries of the partial chunk
  int64_t j = 0;
  for (; j + 2 <= q; j += 2) {
    V a0[NS] = {}, a1[NS] = {};
    for (int64_t i = 0; i < full; ++i) {
      const V g0 = g[(i * q + j) * RV], g1 = g[(i * q + j + 1) * RV];
      for (int s = 0; s < NS; ++s) {
        const V pw = Pw[(s * p + i) * RV];
        a0[s] += g0 * pw;
        a1[s] += g1 * pw;
      }
    }
    for (int s = 0; s < NS; ++s) {
      if (j < tail) a0[s] += g[(full * q + j) * RV] * Pw[(s * p + full) * RV];
      if (j + 1 < tail) a1[s] += g[(full * q + j + 1) * RV] * Pw[(s * p + full) * RV];
      gQt[((s0 + s) * q + j) * RV + c] += a0[s];
      gQt[((s0 + s) * q + j + 1) * RV + c] += a1[s];
    }
  }
  for (; j < q; ++j) {
    V a0[NS] = {};
    for (int64_t i = 0; i < full; ++i) {
      const V g0 = g[(i * q + j) * RV];
      for (int s = 0; s < NS; ++s) a0[s] += g0 * Pw[(s * p + i) * RV];
    }
    for (int s = 0; s < NS; ++s) {
      if (j < tail) a0[s] += g[(full * q + j) * RV] * Pw[(s * p + full) * RV];
      gQt[((s0 + s) * q + j) * RV + c] += a0[s];
    }
  }
}

// The gradient of one task's factor, G [d][RV] (consumed), reduced into its inputs' gradients; P's and Q's
// summed into lanes (mixed: zeroed by the caller once, added to out by it at the end).
template <typename T>
void reduce(const Side<T>& sd, const Built<T>& b, int64_t u, typename Wide<T>::V* G, const SideGrads<T>& out,
            LaneGrads<T>& lanes) {
  using V = typename Wide<T>::V;
  constexpr int64_t W = Wide<T>::W;
  const int64_t S = sd.S, p = sd.p, q = sd.q, RV = b.RV;
  if (sd.affine()) {
    // row = W * (mix - m) + sigma beta: W's, beta's, m's and sigma's gradients, then mix's, W * G.
    V* gW = reinterpret_cast<V*>(out.gW);
    V* gB = reinterpret_cast<V*>(out.gbeta);
    std::vector<V> gm(RV, V{});
    V gs{};
    for (int64_t k = 0; k < sd.d; ++k) {
      for (int64_t c = 0; c < RV; ++c) {
        const V g = G[k * RV + c];
        gW[k * RV + c] += g * (b.Kp[k * RV + c] - b.mv[c]);
        gB[k * RV + c] += b.sg * g;
        const V wg = b.Wt[k * RV + c] * g;
        gm[c] -= wg;
        gs += b.Bt[k * RV + c] * g;
        G[k * RV + c] = wg;
      }
    }
    const T* gms = reinterpret_cast<const T*>(gm.data());
    for (int64_t r = 0; r < sd.R; ++r) out.gm[u * sd.R + r] += gms[r];
    T sum = 0;
    for (int64_t l = 0; l < W; ++l) sum += gs[l];
    out.gsigma[u] += sum;
  } else if (sd.shifted()) {
    std::vector<V> gm(RV, V{});
    for (int64_t k = 0; k < sd.d; ++k)
      for (int64_t c = 0; c < RV; ++c) gm[c] -= G[k * RV + c];
    const T* gms = reinterpret_cast<const T*>(gm.data());
    for (int64_t r = 0; r < sd.R; ++r) out.gm[u * sd.R + r] += gms[r];
  }
  const int64_t i_end = std::min(p, (sd.d + q - 1) / q);
  if (!sd.mixed) lanes.zero(sd, RV);
  std::vector<V>& gPt = lanes.P;
  std::vector<V>& gQt = lanes.Q;
  std::vector<V> gcv(S * RV, V{});
  for (int64_t c = 0; c < RV; ++c) {
    int64_t s0 = 0;
    for (; s0 + 8 <= S; s0 += 8) reduce_experts<T, 8>(sd, b, G, c, s0, gPt.data(), gQt.data(), gcv.data());
    for (; s0 + 4 <= S; s0 += 4) reduce_experts<T, 4>(sd, b, G, c, s0, gPt.data(), gQt.data(), gcv.data());
    for (; s0 < S; ++s0) reduce_experts<T, 1>(sd, b, G, c, s0, gPt.data(), gQt.data(), gcv.data());
  }
  if (!sd.mixed) lanes.add_into(sd, RV, u, out);
  for (int64_t s = 0; s < S; ++s) {
    const T* cs = reinterpret_cast<const T*>(gcv.data() + s * RV);
    if (!sd.c) continue;
    if (sd.c_per_row) {
      for (int64_t r = 0; r < sd.R; ++r) out.gc[(u * S + s) * sd.R + r] += cs[r];
    } else {
      T sum = 0;
      for (int64_t r = 0; r < sd.R; ++r) sum += cs[r];
      out.gc[u * S + s] += sum;
    }
  }
}

// Example indices in task order (stable), so that each thread builds a task's factors once.
std::vector<int64_t> task_order(const int64_t* task, int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return task[a] < task[b]; });
  return order;
}

// A side's tensors, in the order the Python side passes them: c, P, Q, W, beta, m, sigma.
struct SideTensors {
  torch::Tensor c, P, Q, W, beta, m, sigma;
  bool mixed;
  int64_t U, d;
};

torch::Tensor present(const std::vector<c10::optional<torch::Tensor>>& t, size_t i) {
  return i < t.size() && t[i].has_value() ? *t[i] : torch::Tensor();
}

SideTensors unpack(const std::vector<c10::optional<torch::Tensor>>& t, bool mixed, int64_t d, const char* name) {
  TORCH_CHECK(t.size() == 7, "kron_lowrank: side ", name, ": 7 entries (c, P, Q, W, beta, m, sigma)");
  SideTensors s{present(t, 0), present(t, 1), present(t, 2), present(t, 3), present(t, 4), present(t, 5),
                present(t, 6), mixed, 0, d};
  TORCH_CHECK(s.P.defined() && s.Q.defined() && s.P.dim() == 3 && s.Q.dim() == 3 && s.P.is_contiguous() &&
                  s.Q.is_contiguous() && s.P.size(0) == s.Q.size(0) && s.P.size(1) == s.Q.size(1),
              "kron_lowrank: side ", name, ": P [S or U, R, p] and Q [S or U, R, q], contiguous");
  TORCH_CHECK(s.P.size(2) * s.Q.size(2) >= d, "kron_lowrank: side ", name, ": p*q = ", s.P.size(2) * s.Q.size(2),
              " is shorter than d = ", d);
  const int64_t S = mixed ? s.P.size(0) : 1, R = s.P.size(1);
  TORCH_CHECK(!mixed || s.c.defined(), "kron_lowrank: side ", name, ": mixed operands need c");
  if (s.c.defined()) {
    TORCH_CHECK(s.c.is_contiguous() && (s.c.dim() == 2 || (s.c.dim() == 3 && s.c.size(2) == R)) && s.c.size(1) == S,
                "kron_lowrank: side ", name, ": c [U, S] or [U, S, R], contiguous");
  }
  s.U = mixed ? s.c.size(0) : s.P.size(0);
  TORCH_CHECK(!s.c.defined() || s.c.size(0) == s.U, "kron_lowrank: side ", name, ": c needs one row per task");
  TORCH_CHECK(!s.m.defined() || (s.m.is_contiguous() && s.m.dim() == 2 && s.m.size(0) == s.U && s.m.size(1) == R),
              "kron_lowrank: side ", name, ": m [U, R], contiguous");
  if (s.W.defined()) {
    TORCH_CHECK(s.beta.defined() && s.m.defined() && s.sigma.defined() && s.W.dim() == 2 && s.W.is_contiguous() &&
                    s.beta.sizes() == s.W.sizes() && s.beta.is_contiguous() && (s.W.size(0) == 1 || s.W.size(0) == R) &&
                    s.W.size(1) >= d && s.m.is_contiguous() && s.m.dim() == 2 && s.m.size(0) == s.U &&
                    s.m.size(1) == R && s.sigma.dim() == 1 && s.sigma.size(0) == s.U,
                "kron_lowrank: side ", name, ": W, beta [1 or R, >= d], m [U, R], sigma [U], contiguous");
  }
  return s;
}

template <typename T>
Side<T> side_of(const SideTensors& t) {
  const bool affine = t.W.defined();
  auto ptr = [](const torch::Tensor& x) { return x.defined() ? x.data_ptr<T>() : nullptr; };
  return {ptr(t.c), t.c.defined() && t.c.dim() == 3, t.mixed, ptr(t.P), ptr(t.Q), ptr(t.W), ptr(t.beta), ptr(t.m),
          ptr(t.sigma), affine ? t.W.size(0) : 1, affine ? t.W.size(1) : 0, t.mixed ? t.P.size(0) : 1, t.P.size(1),
          t.P.size(2), t.Q.size(2), t.d};
}

}  // namespace

std::vector<torch::Tensor> kron_lowrank_forward(torch::Tensor x, torch::Tensor out, torch::Tensor task, double scale,
                                                bool mixed, std::vector<c10::optional<torch::Tensor>> side_A,
                                                std::vector<c10::optional<torch::Tensor>> side_B) {
  TORCH_CHECK(x.dim() == 3 && out.dim() == 3 && x.is_contiguous() && out.is_contiguous() &&
                  x.size(0) == out.size(0) && x.size(1) == out.size(1),
              "kron_lowrank_forward: x [n, T, d_in] and out [n, T, d_out], contiguous");
  const int64_t n = x.size(0), n_tok = x.size(1), d_in = x.size(2), d_out = out.size(2);
  const SideTensors tA = unpack(side_A, mixed, d_in, "A"), tB = unpack(side_B, mixed, d_out, "B");
  const int64_t R = tA.P.size(1), U = tA.U;
  TORCH_CHECK(tB.P.size(1) == R && tB.U == U, "kron_lowrank_forward: both sides need the same rank and tasks");
  TORCH_CHECK(task.dim() == 1 && task.size(0) == n && task.scalar_type() == torch::kInt64,
              "kron_lowrank_forward: task [n] int64");
  const int64_t* tk = task.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e) TORCH_CHECK(tk[e] >= 0 && tk[e] < U, "kron_lowrank_forward: task index out of range");
  auto y = torch::empty_like(out);
  auto h = torch::empty({n, n_tok, R}, x.options());
  const auto order = task_order(tk, n);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_lowrank_forward", [&] {
    using T = scalar_t;
    using V = typename Wide<T>::V;
    constexpr int64_t W = Wide<T>::W;
    const Side<T> A = side_of<T>(tA), B = side_of<T>(tB);
    const int64_t ldB = Built<T>::rows_stride(B);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      Built<T> a, b;
      std::vector<T> rowsB;
      std::vector<V> H;
      int64_t current = -1;
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t e = order[pos], u = tk[e];
        if (u != current) {
          a.prepare(A, u);
          a.factor(A);
          b.prepare(B, u);
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

namespace {
// Per-thread gradient sums of one side, and their totals in the inputs' shapes.
struct SideAccumulators {
  torch::Tensor gc, gP, gQ, gW, gbeta, gm, gsigma;  // [threads, ...]; gW, gbeta in the K layout [threads, d, RV*W]

  SideAccumulators(const SideTensors& t, int64_t threads, int64_t lanes) {
    auto acc = [&](const torch::Tensor& x) {
      if (!x.defined()) return torch::Tensor();
      std::vector<int64_t> shape{threads};
      for (auto s : x.sizes()) shape.push_back(s);
      return torch::zeros(shape, x.options());
    };
    gc = acc(t.c), gP = acc(t.P), gQ = acc(t.Q), gm = acc(t.m), gsigma = acc(t.sigma);
    if (t.W.defined()) {
      gW = torch::zeros({threads, t.d, lanes}, t.W.options());
      gbeta = torch::zeros({threads, t.d, lanes}, t.W.options());
    }
  }

  template <typename T>
  SideGrads<T> of_thread(int64_t th) const {
    auto at = [&](const torch::Tensor& x) { return x.defined() ? x[th].data_ptr<T>() : nullptr; };
    return {at(gc), at(gP), at(gQ), at(gW), at(gbeta), at(gm), at(gsigma)};
  }

  // W's gradient from the K layout: [d, lanes] -> [Rw, ldw] (rows past d zero; Rw = 1: summed over r).
  static torch::Tensor affine_total(const torch::Tensor& g, const torch::Tensor& like, int64_t R) {
    auto full = torch::zeros_like(like);
    auto rows = g.sum(0).narrow(1, 0, R).t();  // [R, d]
    full.narrow(1, 0, rows.size(1)).copy_(like.size(0) == 1 ? rows.sum(0, true) : rows);
    return full;
  }

  std::vector<torch::Tensor> totals(const SideTensors& t) const {
    auto total = [](const torch::Tensor& x) { return x.defined() ? x.sum(0) : x; };
    const int64_t R = t.P.size(1);
    return {total(gc), total(gP), total(gQ),
            gW.defined() ? affine_total(gW, t.W, R) : torch::Tensor(),
            gbeta.defined() ? affine_total(gbeta, t.beta, R) : torch::Tensor(), total(gm), total(gsigma)};
  }
};
}  // namespace

std::vector<torch::Tensor> kron_lowrank_backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor h,
                                                 torch::Tensor task, double scale, bool mixed,
                                                 std::vector<c10::optional<torch::Tensor>> side_A,
                                                 std::vector<c10::optional<torch::Tensor>> side_B, bool need_x) {
  TORCH_CHECK(grad_y.is_contiguous() && x.is_contiguous() && h.is_contiguous(),
              "kron_lowrank_backward: contiguous inputs");
  const int64_t n = x.size(0), n_tok = x.size(1), d_in = x.size(2), d_out = grad_y.size(2);
  const SideTensors tA = unpack(side_A, mixed, d_in, "A"), tB = unpack(side_B, mixed, d_out, "B");
  const int64_t R = tA.P.size(1);
  const int64_t* tk = task.data_ptr<int64_t>();
  const auto order = task_order(tk, n);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t lanes = x.scalar_type() == torch::kDouble ? Wide<double>::W : Wide<float>::W;
  const int64_t padded = (R + lanes - 1) / lanes * lanes;
  // Per thread, the inputs' gradients it accumulated (a task may be split between two threads).
  const SideAccumulators accA(tA, threads, padded), accB(tB, threads, padded);
  torch::Tensor gx = need_x ? torch::empty_like(x) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_lowrank_backward", [&] {
    using T = scalar_t;
    using V = typename Wide<T>::V;
    constexpr int64_t W = Wide<T>::W;
    const Side<T> A = side_of<T>(tA), B = side_of<T>(tB);
    const int64_t ldA = Built<T>::rows_stride(A);
    const int64_t chunk = (n + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t tbegin, int64_t tend) {
      for (int64_t th = tbegin; th < tend; ++th) {
        const SideGrads<T> gA = accA.of_thread<T>(th), gB = accB.of_thread<T>(th);
        Built<T> a, b;
        LaneGrads<T> lanesA, lanesB;
        std::vector<T> rowsA;
        std::vector<V> GH, Hp, GA, GB;
        int64_t current = -1;
        auto flush = [&]() {
          if (current < 0) return;
          reduce<T>(A, a, current, GA.data(), gA, lanesA);
          reduce<T>(B, b, current, GB.data(), gB, lanesB);
        };
        for (int64_t pos = th * chunk; pos < std::min(n, (th + 1) * chunk); ++pos) {
          const int64_t e = order[pos], u = tk[e];
          if (u != current) {
            flush();
            // A: its rows for x's gradient, its mixture for W's; B: its factor for the intermediate's.
            a.prepare(A, u);
            if (A.affine()) a.factor(A);
            if (need_x) a.rows(A, u, rowsA, ldA);
            b.prepare(B, u);
            b.factor(B);
            if (current < 0) {  // the first task: mixed operands' sums start here
              if (A.mixed) lanesA.zero(A, a.RV);
              if (B.mixed) lanesB.zero(B, b.RV);
            }
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
        if (current >= 0 && A.mixed) lanesA.add_into(A, a.RV, 0, gA);
        if (current >= 0 && B.mixed) lanesB.add_into(B, b.RV, 0, gB);
      }
    });
  });
  std::vector<torch::Tensor> result{gx};
  for (const auto& t : accA.totals(tA)) result.push_back(t);
  for (const auto& t : accB.totals(tB)) result.push_back(t);
  return result;
}
