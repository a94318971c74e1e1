// Native CPU selective scan (and the mixer's depthwise convs with their SiLU), built on first use by
// dis_dist/ops/selective_scan/cpu.py. Semantics: dis_dist/ops/selective_scan/reference.py.
//
// Layout: channels last, as the mixer's projections produce them. u, delta (ndir, b, L, d);
// A, initial/last states (ndir, [b,] N, d); B, C (ndir, b, L, N); D, delta bias (ndir, d);
// z and the output (b, L, d). Direction 1 of a two-direction call scans right to left and the
// directions' outputs are summed before the z gate.
//
// Work is split over blocks of W channels (one vector register of them); a block keeps its
// N x W states in a local array the compiler holds in registers, so a step never writes state
// to memory. The forward pass saves the states at chunk boundaries only; the backward pass
// recomputes a chunk's states (and decays) from its boundary into a small buffer and runs the
// reverse recurrence through it, last chunk first. The gradients of B and C, sums over the
// channels, are kept as vectors over a thread's channel blocks and summed across lanes once per
// batch element.
#include <torch/csrc/utils/pybind.h>
#include <torch/types.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxState = 64;

// W lanes of T in one 64-byte vector (GCC/Clang vector extensions: one AVX-512 register, or
// two AVX2 / four SSE registers on CPUs without it).
template <typename T>
struct Lanes {
  static constexpr int W = 64 / sizeof(T);
  typedef T V __attribute__((vector_size(64)));
};
using VF = Lanes<float>::V;
using VD = Lanes<double>::V;
typedef int32_t VI __attribute__((vector_size(64)));

template <typename V>
inline V splat(typename std::remove_reference<decltype(V{}[0])>::type x) {
  return V{} + x;
}

template <typename T, typename V = typename Lanes<T>::V>
inline V loadv(const T* p, int valid) {
  V v;
  if (valid == Lanes<T>::W) {
    std::memcpy(&v, p, sizeof(V));
  } else {
    v = V{};
    for (int w = 0; w < valid; ++w) v[w] = p[w];
  }
  return v;
}

template <typename T, typename V = typename Lanes<T>::V>
inline void storev(T* p, V v, int valid) {
  if (valid == Lanes<T>::W) {
    std::memcpy(p, &v, sizeof(V));
  } else {
    for (int w = 0; w < valid; ++w) p[w] = v[w];
  }
}

template <typename V>
inline auto hsum(V v) {
  auto s = v[0];
  for (int w = 1; w < static_cast<int>(sizeof(V) / sizeof(s)); ++w) s += v[w];
  return s;
}

// Sums of the lanes of 16 vectors at once: r[n] = sum over w of s[n][w] (a transpose-and-add
// tree, 15 pair steps instead of 16 separate horizontal sums).
inline VF lane_sums16(const VF* s) {
  VF t[8], u[4], v[2];
  for (int k = 0; k < 8; ++k)
    t[k] = __builtin_shufflevector(s[2 * k], s[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(s[2 * k], s[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int k = 0; k < 4; ++k)
    u[k] = __builtin_shufflevector(t[2 * k], t[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(t[2 * k], t[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int k = 0; k < 2; ++k)
    v[k] = __builtin_shufflevector(u[2 * k], u[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(u[2 * k], u[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const VF r = __builtin_shufflevector(v[0], v[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
               __builtin_shufflevector(v[0], v[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return __builtin_shufflevector(r, r, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);  // bit-reversed order
}

// row[n] += sum over lanes of s[n], n < N
template <typename T, typename V, int NT>
inline void add_lane_sums(T* row, const V* s, int N) {
  if constexpr (std::is_same_v<T, float> && NT == 16) {
    VF r;
    std::memcpy(&r, row, sizeof(r));
    r += lane_sums16(s);
    std::memcpy(row, &r, sizeof(r));
  } else {
    for (int n = 0; n < N; ++n) row[n] += hsum(s[n]);
  }
}

// exp over 16 floats, within 3 ulp.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
// 2^t with t = x log2(e) = th + tl (th rounded, tl its rounding error and that of log2(e)):
// th = floor(th) + f, f in [0, 1) by vreduceps; 2^(f + tl) by a degree-5 polynomial (a
// relative-error minimax fit on [0, 1]), times 2^floor(th) by vscalefps, which saturates to 0
// below the range and to inf above it. x is clamped at -138 (2^-199: 0) so that -inf gives 0; NaN
// stays NaN (vmaxps returns its second operand when either is NaN). Fewer cycles than Cephes'
// range reduction with vrndscaleps: the scan's forward 4% faster at the demo's shapes.
inline VF vexp(VF x) {
  constexpr float kLog2e = 1.44269504088896341f, kLog2eLow = 1.925963033500011e-08f;  // log2(e) - kLog2e
  const VF xc = (VF)_mm512_max_ps(_mm512_set1_ps(-138.0f), (__m512)x);
  const __m512 th = (__m512)(xc * kLog2e);
  const VF tl = (VF)_mm512_fmsub_ps((__m512)xc, _mm512_set1_ps(kLog2e), th) + xc * kLog2eLow;
  const VF r = (VF)_mm512_reduce_ps(th, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC) + tl;
  VF p = splat<VF>(1.8671182915568352e-3f);
  p = p * r + 9.017054922878742e-3f;
  p = p * r + 5.579989403486252e-2f;
  p = p * r + 2.4016445875167847e-1f;
  p = p * r + 6.931512951850891e-1f;
  p = p * r + 1.0f;
  return (VF)_mm512_scalef_ps((__m512)p, th);
}
#else
// Cephes' expf: range reduction by ln 2, a degree-6 polynomial.
inline VF vexp(VF x) {
  const VF xc = x < -87.0f ? splat<VF>(-87.0f) : (x > 88.0f ? splat<VF>(88.0f) : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VF t = xc * 1.44269504088896341f + magic;
  const VF fx = t - magic;
  VF r = xc - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  // exp(r) = 1 + r + r^2 q(r) on |r| <= ln 2 / 2, q cubic (minimax fit)
  VF q = splat<VF>(8.31252e-3f);
  q = q * r + 4.189016e-2f;
  q = q * r + 1.6667115e-1f;
  q = q * r + 4.9999231e-1f;
  const VF p = (q * (r * r) + r) + 1.0f;
  const VI n = (VI)t - (VI)splat<VF>(magic);
  const VF res = p * (VF)((n + 127) << 23);
  return (VF)((VI)res & ~(VI)(x < -87.0f));  // 0 where expf would be denormal
}
#endif
// double keeps std::exp per lane (the tests' precision, not a fast path)
inline VD vexp(VD x) {
  for (int w = 0; w < 8; ++w) x[w] = std::exp(x[w]);
  return x;
}

// log1p over [0, 1] (what softplus needs): 2 atanh(y / (2 + y)) as its odd series.
inline VF vlog1p_unit(VF y) {
  const VF s = y / (2.0f + y);
  const VF s2 = s * s;
  VF p = splat<VF>(1.0f / 19);
  for (const float c : {1.0f / 17, 1.0f / 15, 1.0f / 13, 1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f})
    p = p * s2 + c;
  return 2.0f * s * p;
}
inline VD vlog1p_unit(VD y) {
  for (int w = 0; w < 8; ++w) y[w] = std::log1p(y[w]);
  return y;
}

// torch's softplus (beta 1, threshold 20), as max(x, 0) + log1p(exp(-|x|))
template <typename V>
inline V softplus(V x) {
  const V neg_abs = x < 0 ? x : -x;
  const V sp = (x > 0 ? x : V{}) + vlog1p_unit(vexp(neg_abs));
  return x > 20 ? x : sp;
}

// softplus and its derivative (torch's: exactly 1 above the threshold) from one exponential
template <typename V>
inline V softplus(V x, V& slope) {
  const V neg_abs = x < 0 ? x : -x;
  const V e = vexp(neg_abs);
  const V inv = 1 / (1 + e);
  slope = x > 20 ? V{} + 1 : (x < 0 ? e * inv : inv);
  const V sp = (x > 0 ? x : V{}) + vlog1p_unit(e);
  return x > 20 ? x : sp;
}

template <typename V>
inline V sigmoid(V x) {
  return 1 / (1 + vexp(-x));
}

template <typename T>
struct Args {
  const T* u;      // (ndir, b, L, d)
  const T* delta;  // (ndir, b, L, d)
  const T* A;      // (ndir, N, d)
  const T* B;      // (ndir, b, L, N)
  const T* C;      // (ndir, b, L, N)
  const T* D;      // (ndir, d)
  const T* bias;   // (ndir, d)
  const T* z;      // (b, L, d) or null
  const T* h0;     // (ndir, b, N, d) or null
  int64_t ndir, batch, L, d, N, chunk, nchunks;
  bool softplus;

  int64_t row(int64_t dir, int64_t b, int64_t t) const { return (dir * batch + b) * L + t; }
  // the sequence position of scan step s in direction dir
  int64_t pos(int64_t dir, int64_t s) const { return dir == 1 ? L - 1 - s : s; }
};

// Consecutive steps read rows d channels apart, a stride the hardware prefetchers miss when it
// is near a page: fetch the rows of the step kAhead steps on while this one computes.
constexpr int64_t kAhead = 4;
template <typename T>
inline void prefetch_row(const T* base, int64_t row, int64_t d, int64_t c0) {
  __builtin_prefetch(base + row * d + c0);
}

template <typename V>
inline V delta_of(V raw, V bias, bool sp) {
  return sp ? softplus(raw + bias) : raw + bias;
}

// Forward scan of one batch element for the block of channels c0 .. c0 + W: every direction,
// summed, gated, written to out; last states and chunk-boundary states (when bounds) too.
template <typename T, int NT>
void scan_forward_block(const Args<T>& a, int64_t b, int64_t c0, T* out, T* last, T* bounds,
                        typename Lanes<T>::V* ytot) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  constexpr int kN = NT > 0 ? NT : kMaxState;
  const int N = NT > 0 ? NT : static_cast<int>(a.N);
  const int valid = static_cast<int>(std::min<int64_t>(W, a.d - c0));
  for (int64_t t = 0; t < a.L; ++t) ytot[t] = V{};
  V h[kN], Ab[kN];
  for (int64_t dir = 0; dir < a.ndir; ++dir) {
    for (int n = 0; n < N; ++n) {
      Ab[n] = loadv(a.A + (dir * N + n) * a.d + c0, valid);
      h[n] = a.h0 ? loadv(a.h0 + ((dir * a.batch + b) * N + n) * a.d + c0, valid) : V{};
    }
    const V bias = loadv(a.bias + dir * a.d + c0, valid);
    const V Dd = loadv(a.D + dir * a.d + c0, valid);
    for (int64_t s = 0; s < a.L; ++s) {
      if (bounds && s % a.chunk == 0) {
        T* bp = bounds + (((dir * a.batch + b) * a.nchunks + s / a.chunk) * N) * a.d + c0;
        for (int n = 0; n < N; ++n) storev(bp + n * a.d, h[n], valid);
      }
      const int64_t t = a.pos(dir, s);
      const int64_t row = a.row(dir, b, t);
      if (s + kAhead < a.L) {
        const int64_t ahead = a.row(dir, b, a.pos(dir, s + kAhead));
        prefetch_row(a.u, ahead, a.d, c0);
        prefetch_row(a.delta, ahead, a.d, c0);
      }
      const V uu = loadv(a.u + row * a.d + c0, valid);
      const V dt = delta_of(loadv(a.delta + row * a.d + c0, valid), bias, a.softplus);
      const V du = dt * uu;
      V y = Dd * uu;
      const T* Bt = a.B + row * N;
      const T* Ct = a.C + row * N;
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        h[n] = vexp(dt * Ab[n]) * h[n] + du * Bt[n];
        y += h[n] * Ct[n];
      }
      ytot[t] += y;
    }
    if (last)
      for (int n = 0; n < N; ++n) storev(last + ((dir * a.batch + b) * N + n) * a.d + c0, h[n], valid);
  }
  for (int64_t t = 0; t < a.L; ++t) {
    T* o = out + (b * a.L + t) * a.d + c0;
    if (a.z) {
      const V zz = loadv(a.z + (b * a.L + t) * a.d + c0, valid);
      storev(o, ytot[t] * zz * sigmoid(zz), valid);
    } else {
      storev(o, ytot[t], valid);
    }
  }
}

template <typename T>
struct GradPtrs {
  const T* bounds;  // (ndir, b, nchunks, N, d)
  const T* gout;    // (b, L, d)
  const T* glast;   // (ndir, b, N, d) or null
  T *gu, *gdelta, *gA, *gB, *gC, *gD, *gbias, *gz, *gh0;  // gB, gC: this thread's part
};

// Backward pass for batch element b, the block of channels c0 .. c0 + W, every direction. The
// gradients of B and C (sums over channels) are added, still as vectors of W channels, to
// accB, accC ((ndir, L, N) vectors): the caller sums their lanes once the thread's channel
// blocks are done, not once per block.
template <typename T, int NT>
void scan_backward_block(const Args<T>& a, int64_t b, int64_t c0, const GradPtrs<T>& g_,
                         std::vector<typename Lanes<T>::V>& buf, typename Lanes<T>::V* accB,
                         typename Lanes<T>::V* accC) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  constexpr int kN = NT > 0 ? NT : kMaxState;
  const int N = NT > 0 ? NT : static_cast<int>(a.N);
  const int valid = static_cast<int>(std::min<int64_t>(W, a.d - c0));
  const int64_t CH = a.chunk;
  // a chunk's states before each step and after the last ((CH + 1) x N), its decays (CH x N),
  // deltas, delta * u and softplus slopes (CH each); the output summed over directions (L, for dz)
  buf.resize((CH + 1) * N + CH * N + 3 * CH + a.L);
  V* states = buf.data();
  V* decays = states + (CH + 1) * N;
  V* dts = decays + CH * N;
  V* dus = dts + CH;
  V* slopes = dus + CH;  // d delta / d raw delta
  V* ytot = slopes + CH;
  V Ab[kN], g[kN], gA[kN];

  for (int64_t t = 0; t < a.L; ++t) ytot[t] = V{};
  for (int64_t dir = 0; dir < a.ndir; ++dir) {
    for (int n = 0; n < N; ++n) {
      Ab[n] = loadv(a.A + (dir * N + n) * a.d + c0, valid);
      g[n] = g_.glast ? loadv(g_.glast + ((dir * a.batch + b) * N + n) * a.d + c0, valid) : V{};
      gA[n] = b == 0 ? V{} : loadv(g_.gA + (dir * N + n) * a.d + c0, valid);
    }
    const V bias = loadv(a.bias + dir * a.d + c0, valid);
    const V Dd = loadv(a.D + dir * a.d + c0, valid);
    V gbias = b == 0 ? V{} : loadv(g_.gbias + dir * a.d + c0, valid);
    V gD = b == 0 ? V{} : loadv(g_.gD + dir * a.d + c0, valid);
    for (int64_t c = a.nchunks - 1; c >= 0; --c) {
      const int64_t s0 = c * CH;
      const int64_t len = std::min<int64_t>(CH, a.L - s0);
      // recompute the chunk's states from its boundary
      const T* bp = g_.bounds + (((dir * a.batch + b) * a.nchunks + c) * N) * a.d + c0;
      for (int n = 0; n < N; ++n) states[n] = loadv(bp + n * a.d, valid);
      // the chunk's deltas first: softplus's latency then overlaps across steps rather than
      // holding up each step's recurrence (about 6% of the backward at the demo's shapes)
      for (int64_t i = 0; i < len; ++i) {
        const int64_t row = a.row(dir, b, a.pos(dir, s0 + i));
        const V raw = loadv(a.delta + row * a.d + c0, valid) + bias;
        dts[i] = a.softplus ? softplus(raw, slopes[i]) : raw;
        dus[i] = dts[i] * loadv(a.u + row * a.d + c0, valid);
      }
      for (int64_t i = 0; i < len; ++i) {
        const int64_t t = a.pos(dir, s0 + i);
        const int64_t row = a.row(dir, b, t);
        const V dt = dts[i], du = dus[i];
        V y = Dd * loadv(a.u + row * a.d + c0, valid);
        const T* Bt = a.B + row * N;
        const T* Ct = a.C + row * N;
        const V* hp = states + i * N;
        V* hn = states + (i + 1) * N;
        V* dA = decays + i * N;
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) {
          dA[n] = vexp(dt * Ab[n]);
          hn[n] = dA[n] * hp[n] + du * Bt[n];
          y += hn[n] * Ct[n];
        }
        ytot[t] += y;
      }
      // the reverse recurrence through the chunk
      for (int64_t i = len - 1; i >= 0; --i) {
        const int64_t t = a.pos(dir, s0 + i);
        const int64_t row = a.row(dir, b, t);
        if (s0 + i >= kAhead) {
          const int64_t t_ahead = a.pos(dir, s0 + i - kAhead);
          prefetch_row(g_.gout, b * a.L + t_ahead, a.d, c0);
          if (a.z) prefetch_row(a.z, b * a.L + t_ahead, a.d, c0);
          if (i >= kAhead) {
            prefetch_row(a.u, a.row(dir, b, t_ahead), a.d, c0);
          }
        }
        V gy = loadv(g_.gout + (b * a.L + t) * a.d + c0, valid);
        if (a.z) {
          const V zz = loadv(a.z + (b * a.L + t) * a.d + c0, valid);
          gy *= zz * sigmoid(zz);
        }
        const V uu = loadv(a.u + row * a.d + c0, valid);
        const V dt = dts[i], du = dus[i];
        const T* Bt = a.B + row * N;
        const T* Ct = a.C + row * N;
        const V* hp = states + i * N;
        const V* hn = states + (i + 1) * N;
        const V* dA = decays + i * N;
        V gBu{}, gdt{};
        V* sB = accB + (dir * a.L + t) * N;
        V* sC = accC + (dir * a.L + t) * N;
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) {
          const V gn = g[n] + gy * Ct[n];  // dL/d(state after the step)
          sC[n] += gy * hn[n];
          sB[n] += gn * du;
          gBu += gn * Bt[n];
          g[n] = gn * dA[n];
          const V q = g[n] * hp[n];  // dL/d(delta A)
          gdt += q * Ab[n];
          gA[n] += q * dt;
        }
        V graw = gdt + gBu * uu;
        if (a.softplus) graw *= slopes[i];
        storev(g_.gdelta + row * a.d + c0, graw, valid);
        storev(g_.gu + row * a.d + c0, gBu * dt + gy * Dd, valid);
        gbias += graw;
        gD += gy * uu;
      }
    }
    for (int n = 0; n < N; ++n) {
      storev(g_.gh0 + ((dir * a.batch + b) * N + n) * a.d + c0, g[n], valid);
      storev(g_.gA + (dir * N + n) * a.d + c0, gA[n], valid);
    }
    storev(g_.gbias + dir * a.d + c0, gbias, valid);
    storev(g_.gD + dir * a.d + c0, gD, valid);
  }
  if (g_.gz) {
    for (int64_t t = 0; t < a.L; ++t) {
      const V go = loadv(g_.gout + (b * a.L + t) * a.d + c0, valid);
      const V zz = loadv(a.z + (b * a.L + t) * a.d + c0, valid);
      const V sg = sigmoid(zz);
      storev(g_.gz + (b * a.L + t) * a.d + c0, go * ytot[t] * sg * (1 + zz * (1 - sg)), valid);
    }
  }
}

template <typename T>
Args<T> make_args(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                  const torch::Tensor& B, const torch::Tensor& C, const torch::Tensor& D,
                  const torch::Tensor& bias, const c10::optional<torch::Tensor>& z,
                  const c10::optional<torch::Tensor>& h0, bool softplus, int64_t chunk) {
  Args<T> a;
  a.u = u.data_ptr<T>();
  a.delta = delta.data_ptr<T>();
  a.A = A.data_ptr<T>();
  a.B = B.data_ptr<T>();
  a.C = C.data_ptr<T>();
  a.D = D.data_ptr<T>();
  a.bias = bias.data_ptr<T>();
  a.z = z.has_value() ? z->data_ptr<T>() : nullptr;
  a.h0 = h0.has_value() ? h0->data_ptr<T>() : nullptr;
  a.ndir = u.size(0);
  a.batch = u.size(1);
  a.L = u.size(2);
  a.d = u.size(3);
  a.N = A.size(1);
  a.chunk = chunk;
  a.nchunks = (a.L + chunk - 1) / chunk;
  a.softplus = softplus;
  return a;
}

void check(const std::vector<torch::Tensor>& ts) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), "scan_cpu: tensors must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "scan_cpu: tensors must be contiguous");
    TORCH_CHECK(t.scalar_type() == ts[0].scalar_type(), "scan_cpu: tensors must share one dtype");
  }
}

template <typename F>
void dispatch_state(int64_t N, F&& f) {
  TORCH_CHECK(N >= 1 && N <= kMaxState, "scan_cpu: d_state must be 1..", kMaxState, ", got ", N);
  if (N == 16)
    f(std::integral_constant<int, 16>{});
  else
    f(std::integral_constant<int, 0>{});
}

}  // namespace

// Returns (out (b, L, d), last state (ndir, b, N, d), chunk-boundary states
// (ndir, b, nchunks, N, d) or an empty tensor when not save_states).
std::vector<torch::Tensor> scan_forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                        torch::Tensor C, torch::Tensor D, torch::Tensor bias,
                                        c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> h0,
                                        bool softplus, int64_t chunk, bool save_states) {
  std::vector<torch::Tensor> all{u, delta, A, B, C, D, bias};
  if (z) all.push_back(*z);
  if (h0) all.push_back(*h0);
  check(all);
  TORCH_CHECK(chunk >= 1, "scan_cpu: chunk must be >= 1");
  const int64_t ndir = u.size(0), batch = u.size(1), L = u.size(2), d = u.size(3), N = A.size(1);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  auto out = torch::empty({batch, L, d}, u.options());
  auto last = torch::empty({ndir, batch, N, d}, u.options());
  auto bounds = save_states ? torch::empty({ndir, batch, nchunks, N, d}, u.options()) : torch::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_forward", [&] {
    constexpr int W = Lanes<scalar_t>::W;
    const auto a = make_args<scalar_t>(u, delta, A, B, C, D, bias, z, h0, softplus, chunk);
    const int64_t nblocks = (d + W - 1) / W;
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = last.data_ptr<scalar_t>();
    scalar_t* bd = save_states ? bounds.data_ptr<scalar_t>() : nullptr;
    dispatch_state(N, [&](auto nt) {
      constexpr int NT = decltype(nt)::value;
      at::parallel_for(0, batch * nblocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<typename Lanes<scalar_t>::V> ytot(L);
        for (int64_t i = begin; i < end; ++i)
          scan_forward_block<scalar_t, NT>(a, i / nblocks, (i % nblocks) * W, o, l, bd, ytot.data());
      });
    });
  });
  return {out, last, bounds};
}

// Returns the gradients (gu, gdelta, gA, gB, gC, gD, gbias, gz (empty without z), gh0).
std::vector<torch::Tensor> scan_backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                         torch::Tensor C, torch::Tensor D, torch::Tensor bias,
                                         c10::optional<torch::Tensor> z, torch::Tensor bounds,
                                         torch::Tensor gout, c10::optional<torch::Tensor> glast,
                                         bool softplus, int64_t chunk) {
  std::vector<torch::Tensor> all{u, delta, A, B, C, D, bias, bounds, gout};
  if (z) all.push_back(*z);
  if (glast) all.push_back(*glast);
  check(all);
  const int64_t ndir = u.size(0), batch = u.size(1), L = u.size(2), d = u.size(3), N = A.size(1);
  auto gu = torch::empty_like(u), gdelta = torch::empty_like(delta);
  auto gA = torch::empty_like(A), gD = torch::empty_like(D), gbias = torch::empty_like(bias);
  auto gh0 = torch::empty({ndir, batch, N, d}, u.options());
  auto gz = z ? torch::empty_like(*z) : torch::empty({0}, u.options());
  // B and C gradients sum over channels, which the threads split: one buffer per thread
  const int64_t nthreads = at::get_num_threads();
  auto gB_parts = torch::zeros({nthreads, ndir, batch, L, N}, u.options());
  auto gC_parts = torch::zeros({nthreads, ndir, batch, L, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_backward", [&] {
    constexpr int W = Lanes<scalar_t>::W;
    const auto a = make_args<scalar_t>(u, delta, A, B, C, D, bias, z, c10::nullopt, softplus, chunk);
    const int64_t nblocks = (d + W - 1) / W;
    const int64_t part = ndir * batch * L * N;
    dispatch_state(N, [&](auto nt) {
      constexpr int NT = decltype(nt)::value;
      at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
        const int64_t tid = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
        GradPtrs<scalar_t> p{bounds.data_ptr<scalar_t>(), gout.data_ptr<scalar_t>(),
                             glast ? glast->data_ptr<scalar_t>() : nullptr, gu.data_ptr<scalar_t>(),
                             gdelta.data_ptr<scalar_t>(), gA.data_ptr<scalar_t>(),
                             gB_parts.data_ptr<scalar_t>() + tid * part, gC_parts.data_ptr<scalar_t>() + tid * part,
                             gD.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(),
                             z ? gz.data_ptr<scalar_t>() : nullptr, gh0.data_ptr<scalar_t>()};
        using V = typename Lanes<scalar_t>::V;
        std::vector<V> buf, accB(ndir * L * N), accC(ndir * L * N);
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t i = begin; i < end; ++i)
            scan_backward_block<scalar_t, NT>(a, b, i * W, p, buf, accB.data(), accC.data());
          for (int64_t dir = 0; dir < ndir; ++dir) {
            for (int64_t t = 0; t < L; ++t) {
              const int64_t at = (dir * L + t) * N, row = a.row(dir, b, t);
              add_lane_sums<scalar_t, V, NT>(p.gB + row * N, accB.data() + at, N);
              add_lane_sums<scalar_t, V, NT>(p.gC + row * N, accC.data() + at, N);
              std::fill(accB.begin() + at, accB.begin() + at + N, V{});
              std::fill(accC.begin() + at, accC.begin() + at + N, V{});
            }
          }
        }
      });
    });
  });
  return {gu, gdelta, gA, gB_parts.sum(0), gC_parts.sum(0), gD, gbias, gz, gh0};
}

namespace {

// Output t of direction dir reads x[t - (K-1-k)] (dir 0, causal) or x[t + (K-1-k)] (dir 1, the
// reversed branch's conv: anti-causal, its kernel read backwards) through weight k.
inline int64_t conv_source(int64_t dir, int64_t t, int64_t K, int64_t k) {
  return dir == 1 ? t + (K - 1 - k) : t - (K - 1 - k);
}

// pre[c] = bias[c] + sum over k of w[k][c] x[src_k][c]: one output row of direction dir
template <typename T>
inline void conv_row(const T* xb, int64_t sl, const T* w, const T* bias, int64_t dir, int64_t t, int64_t L,
                     int64_t d, int64_t K, T* pre) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) pre[c] = bias[c];
  for (int64_t k = 0; k < K; ++k) {
    const int64_t src = conv_source(dir, t, K, k);
    if (src < 0 || src >= L) continue;
    const T* xs = xb + src * sl;
    const T* wk = w + k * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) pre[c] += wk[c] * xs[c];
  }
}

// row[c] = silu(row[c]); with grad, row becomes grad * silu'(row) instead
template <typename T>
inline void silu_row(T* row, const T* grad, int64_t d) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  for (int64_t c = 0; c < d; c += W) {
    const int valid = static_cast<int>(std::min<int64_t>(W, d - c));
    const V x = loadv(row + c, valid);
    const V s = sigmoid(x);
    storev(row + c, grad ? loadv(grad + c, valid) * s * (1 + x * (1 - s)) : x * s, valid);
  }
}

// Given the gradient g (L, d) of one direction's conv output for one batch element: adds the
// gradient of its input to gx (L, d) and those of its weights and bias to gw ((K + 1, d), row K
// the bias)
template <typename T>
void conv_backward_rows(const T* xb, int64_t sl, const T* w, const T* g_all, int64_t dir, int64_t L, int64_t d,
                        int64_t K, T* gx, T* gw) {
  for (int64_t t = 0; t < L; ++t) {
    const T* g = g_all + t * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) gw[K * d + c] += g[c];
    for (int64_t k = 0; k < K; ++k) {
      // output t read x[src] through weight k: x[src] gets w[k] g[t], weight k gets g[t] x[src]
      const int64_t src = conv_source(dir, t, K, k);
      if (src < 0 || src >= L) continue;
      const T* xs = xb + src * sl;
      const T* wk = w + k * d;
      T* gxs = gx + src * d;
      T* gwk = gw + k * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        gxs[c] += wk[c] * g[c];
        gwk[c] += g[c] * xs[c];
      }
    }
  }
}

}  // namespace

// The mixer's two depthwise convs over the sequence, each followed by SiLU, channels last: x
// (b, L, d) with unit channel stride, weight (2, d, K), bias (2, d); direction 0 causal (output t
// sees x[t-K+1 .. t]), direction 1 the causal conv of the reversed sequence reversed back (output
// t sees x[t .. t+K-1], weight[K-1] on x[t]). Returns silu(conv) of both, stacked: (2, b, L, d),
// the scan's u.
torch::Tensor conv_silu_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "conv_cpu: x must be (b, L, d) with unit channel stride");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 2 && bias.dim() == 2, "conv_cpu: weight (2, d, K), bias (2, d)");
  const int64_t batch = x.size(0), L = x.size(1), d = x.size(2), K = weight.size(2);
  auto wt = weight.transpose(1, 2).contiguous();  // (2, K, d)
  auto bc = bias.contiguous();
  auto out = torch::empty({2, batch, L, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_silu_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, 2 * batch * L, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t dir = i / (batch * L), b = i / L % batch, t = i % L;
        scalar_t* o = op + i * d;
        conv_row(xp + b * x.stride(0), x.stride(1), wp + dir * K * d, bp + dir * d, dir, t, L, d, K, o);
        silu_row<scalar_t>(o, nullptr, d);
      }
    });
  });
  return out;
}

// Gradients of conv_silu_forward given the gradient of its output (2, b, L, d): (gx (b, L, d),
// gweight (2, d, K), gbias (2, d)). The convs' outputs before SiLU are recomputed, not saved.
std::vector<torch::Tensor> conv_silu_backward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                              torch::Tensor gout) {
  TORCH_CHECK(x.stride(2) == 1 && gout.is_contiguous(), "conv_cpu: unit channel stride expected");
  const int64_t batch = x.size(0), L = x.size(1), d = x.size(2), K = weight.size(2);
  auto wt = weight.transpose(1, 2).contiguous();  // (2, K, d)
  auto bc = bias.contiguous();
  auto gx = torch::empty({batch, L, d}, x.options());
  const int64_t nthreads = at::get_num_threads();
  auto gw_parts = torch::zeros({nthreads, 2, K + 1, d}, x.options());  // row K: the bias
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_silu_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    const scalar_t* gp = gout.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
      std::vector<scalar_t> gpre(L * d);  // the gradient of one direction's conv output
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* xb = xp + b * x.stride(0);
        scalar_t* gxb = gx.data_ptr<scalar_t>() + b * L * d;
        std::fill(gxb, gxb + L * d, scalar_t(0));
        for (int64_t dir = 0; dir < 2; ++dir) {
          const scalar_t* w = wp + dir * K * d;
          scalar_t* gw = gw_parts.data_ptr<scalar_t>() + (tid * 2 + dir) * (K + 1) * d;
          for (int64_t t = 0; t < L; ++t) {
            scalar_t* g = gpre.data() + t * d;
            conv_row(xb, x.stride(1), w, bp + dir * d, dir, t, L, d, K, g);
            silu_row(g, gp + ((dir * batch + b) * L + t) * d, d);
          }
          conv_backward_rows(xb, x.stride(1), w, gpre.data(), dir, L, d, K, gxb, gw);
        }
      }
    });
  });
  auto gsum = gw_parts.sum(0);  // (2, K + 1, d)
  return {gx, gsum.slice(1, 0, K).transpose(1, 2).contiguous(), gsum.select(1, K).contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_forward", &scan_forward, "selective scan forward (channels last)");
  m.def("scan_backward", &scan_backward, "selective scan backward (channels last)");
  m.def("conv_silu_forward", &conv_silu_forward, "the mixer's two depthwise convs + SiLU (channels last)");
  m.def("conv_silu_backward", &conv_silu_backward, "gradients of conv_silu_forward");
}
