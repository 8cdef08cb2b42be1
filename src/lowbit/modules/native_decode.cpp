// lowbit's operators for a decode step (one token per sequence).
//
// Row products (lowbit::dense_rows, lowbit::int8_rows; lowbit::int8_int8_rows, W8A8's exact int32 sums;
// lowbit::llm_int8_rows, LLM.int8()'s outlier split, int8 product and 16-bit columns in one call): a few input rows with a whole weight matrix, where
// one token's row meets every weight once and the time is the weight's memory traffic. torch's CPU
// paths for such shapes (a one-row GEMM, the packed int8 operator) reach about 12 GB/s here; these
// stream the weight once for up to four rows at a time (about 28 GB/s on this machine), in float32
// accumulators: the same sums as torch's up to the order of the additions (float32 rounding).
//
// One-query attention (lowbit::one_query_attention): a token's query against its sequence's cached keys
// and values, every head in float32 (scores, softmax, weighted sum; the output rounded once to the
// query's dtype). torch's fused SDPA kernel costs about 0.13 ms per call at this size, mostly fixed
// cost; this one streams the cache once.
//
// All are registered as torch operators, so torch.compile graphs call them without a break (their
// output shapes are declared in lowbit/modules/native.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "native_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LOWBIT_ROWS_AVX512 1
#endif

namespace {

using lowbit::load;
using lowbit::store;

constexpr int64_t kTile = 4;  // input rows per pass over a weight row

// One weight row, read 16 values at a time as float32 (a masked read at the ragged end).
struct F32Row {
  const float* r;
  float at1(int64_t k) const { return r[k]; }
#ifdef LOWBIT_ROWS_AVX512
  __m512 at(int64_t k) const { return _mm512_loadu_ps(r + k); }
  __m512 tail(int64_t k, __mmask16 m) const { return _mm512_maskz_loadu_ps(m, r + k); }
#endif
};
struct BF16Row {
  const uint16_t* r;
  float at1(int64_t k) const { return load(r, k); }
#ifdef LOWBIT_ROWS_AVX512
  static __m512 widen(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
  __m512 at(int64_t k) const { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k))); }
  __m512 tail(int64_t k, __mmask16 m) const { return widen(_mm256_maskz_loadu_epi16(m, r + k)); }
#endif
};
struct I8Row {
  const int8_t* r;
  float at1(int64_t k) const { return static_cast<float>(r[k]); }
#ifdef LOWBIT_ROWS_AVX512
  static __m512 widen(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
  __m512 at(int64_t k) const { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k))); }
  __m512 tail(int64_t k, __mmask16 m) const { return widen(_mm_maskz_loadu_epi8(m, r + k)); }
#endif
};

// sums[i] = dot(w, x row i) for T rows of x (float32, row stride ldx >= K rounded up to 16, zero padded)
template <int T, typename Row>
inline void dot_rows(const Row& w, const float* x, int64_t ldx, int64_t K, float* sums) {
#ifdef LOWBIT_ROWS_AVX512
  __m512 a0[T], a1[T];
  for (int i = 0; i < T; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = w.at(k), w1 = w.at(k + 16);
    for (int i = 0; i < T; ++i) {
      a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), a0[i]);
      a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * ldx + k + 16), a1[i]);
    }
  }
  for (; k < K; k += 16) {  // x's padding is zero, the weight's masked lanes too
    const __m512 w0 = K - k >= 16 ? w.at(k) : w.tail(k, static_cast<__mmask16>((1u << (K - k)) - 1));
    for (int i = 0; i < T; ++i) a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), a0[i]);
  }
  for (int i = 0; i < T; ++i) sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
#else
  for (int i = 0; i < T; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += w.at1(k) * x[i * ldx + k];
    sums[i] = s;
  }
#endif
}

// x (M, K) float32 or bf16 as float32 rows of a stride rounded up to 16, zero padded
std::vector<float> padded_rows(const at::Tensor& x, int64_t& ldx) {
  const int64_t M = x.size(0), K = x.size(1);
  ldx = (K + 15) / 16 * 16;
  std::vector<float> out(static_cast<size_t>(M * ldx), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    if (x.scalar_type() == at::kFloat) {
      std::copy_n(x.data_ptr<float>() + m * K, K, out.data() + m * ldx);
    } else {
      const auto* row = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * K;
      for (int64_t k = 0; k < K; ++k) out[m * ldx + k] = load(row, k);
    }
  }
  return out;
}

// out[m, n] = finish(m, n, dot(weight row n, x row m)) for every row n of the weight, rows split over threads
template <typename MakeRow, typename Finish>
void product(MakeRow make_row, int64_t N, int64_t K, const std::vector<float>& x, int64_t M, int64_t ldx,
             Finish finish) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float sums[kTile];
    for (int64_t n = begin; n < end; ++n) {
      const auto row = make_row(n);
      int64_t m = 0;
      for (; m + kTile <= M; m += kTile) {
        dot_rows<kTile>(row, x.data() + m * ldx, ldx, K, sums);
        for (int64_t i = 0; i < kTile; ++i) finish(m + i, n, sums[i]);
      }
      for (; m < M; ++m) {
        dot_rows<1>(row, x.data() + m * ldx, ldx, K, sums);
        finish(m, n, sums[0]);
      }
    }
  });
}

template <typename Out>
Out* out_ptr(at::Tensor& out) {
  if constexpr (std::is_same_v<Out, float>) {
    return out.data_ptr<float>();
  } else {
    return reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  }
}

void check_input(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), op, ": x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": x must be float32 or bfloat16");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1), op,
              ": weight must be contiguous (N, K) with x's K columns");
}

// (M, N) = x (M, K) @ weight (N, K).T + bias, in x's dtype, weight float32 or bf16
at::Tensor dense_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_input(x, weight, "dense_rows");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "dense_rows: weight must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || b.numel() == N, "dense_rows: bias must have one value per row of the weight");
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  int64_t ldx = 0;
  const std::vector<float> xs = padded_rows(x, ldx);
  auto out = at::empty({M, N}, x.options());
  auto run = [&](auto make_row, auto* o) {
    product(make_row, N, K, xs, M, ldx, [&](int64_t m, int64_t n, float s) { store(o, m * N + n, bp ? s + bp[n] : s); });
  };
  const bool bf16_out = x.scalar_type() == at::kBFloat16;
  if (weight.scalar_type() == at::kFloat) {
    const float* w = weight.data_ptr<float>();
    auto rows = [&](int64_t n) { return F32Row{w + n * K}; };
    bf16_out ? run(rows, out_ptr<uint16_t>(out)) : run(rows, out_ptr<float>(out));
  } else {
    const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
    auto rows = [&](int64_t n) { return BF16Row{w + n * K}; };
    bf16_out ? run(rows, out_ptr<uint16_t>(out)) : run(rows, out_ptr<float>(out));
  }
  return out;
}

// (M, N) = (x (M, K) @ weight (N, K).T) * scale (N,), in x's dtype, weight int8
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  check_input(x, weight, "int8_rows");
  TORCH_CHECK(weight.scalar_type() == at::kChar, "int8_rows: weight must be int8");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == N, "int8_rows: scale must have one value per row of the weight");
  const float* sp = s.data_ptr<float>();
  int64_t ldx = 0;
  const std::vector<float> xs = padded_rows(x, ldx);
  auto out = at::empty({M, N}, x.options());
  const int8_t* w = weight.data_ptr<int8_t>();
  auto rows = [&](int64_t n) { return I8Row{w + n * K}; };
  auto run = [&](auto* o) {
    product(rows, N, K, xs, M, ldx, [&](int64_t m, int64_t n, float v) { store(o, m * N + n, v * sp[n]); });
  };
  x.scalar_type() == at::kBFloat16 ? run(out_ptr<uint16_t>(out)) : run(out_ptr<float>(out));
  return out;
}

// int32 sums x (M, K) @ w (N, K).T of int8 codes, exactly torch._int_mm's: with VNNI, u8 x s8 dot products of
// x + 128 (unsigned) less 128 * the row's sum of w (w_sums, int32, precomputed)
struct Int8Inputs {
  int64_t M, K, Kp;
  std::vector<uint8_t> xu;  // (M, Kp): x + 128, padding 128 (128 - 128 = 0 against any weight)
  std::vector<int8_t> xs;   // (M, K): x as it is (the plain loops)
  Int8Inputs(const int8_t* x, int64_t M_, int64_t K_) : M(M_), K(K_), Kp((K_ + 63) / 64 * 64) {
#if defined(LOWBIT_ROWS_AVX512) && defined(__AVX512VNNI__)
    xu.assign(static_cast<size_t>(M * Kp), 128);
    for (int64_t i = 0; i < M * K; ++i) xu[(i / K) * Kp + i % K] = static_cast<uint8_t>(x[i] + 128);
#else
    xs.assign(x, x + M * K);
#endif
  }
  // the int32 sum of input row m with weight row r (w_sum: the sum of r's codes)
  int32_t dot(int64_t m, const int8_t* r, int32_t w_sum) const {
#if defined(LOWBIT_ROWS_AVX512) && defined(__AVX512VNNI__)
    const uint8_t* xr = xu.data() + m * Kp;
    __m512i acc = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
      acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xr + k), _mm512_loadu_si512(r + k));
    if (k < K) {  // the weight's ragged end masked to zero
      const __mmask64 mk = (~0ULL) >> (64 - (K - k));
      acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xr + k), _mm512_maskz_loadu_epi8(mk, r + k));
    }
    return _mm512_reduce_add_epi32(acc) - 128 * w_sum;
#else
    (void)w_sum;
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += int32_t(xs[m * K + k]) * int32_t(r[k]);
    return s;
#endif
  }
};

void check_int8_weight(const at::Tensor& weight, const at::Tensor& w_sums, int64_t K, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kChar && weight.size(1) == K, op,
              ": weight must be contiguous (N, K) int8 with x's K columns");
  TORCH_CHECK(w_sums.scalar_type() == at::kInt && w_sums.is_contiguous() && w_sums.numel() == weight.size(0), op,
              ": w_sums must be int32 with one value per row of the weight");
}

at::Tensor int8_int8_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_sums) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kChar, "int8_int8_rows: x must be contiguous 2-D int8");
  check_int8_weight(weight, w_sums, x.size(1), "int8_int8_rows");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto out = at::empty({M, N}, x.options().dtype(at::kInt));
  const Int8Inputs xi(x.data_ptr<int8_t>(), M, K);
  const int8_t* wp = weight.data_ptr<int8_t>();
  const int32_t* sums = w_sums.data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; ++m) o[m * N + n] = xi.dot(m, wp + n * K, sums[n]);
  });
  return out;
}

// LLM.int8() (Dettmers et al.) in one pass, as lowbit's eager LLMInt8Kernel computes it: the input columns where
// some row's |x| reaches the threshold are outlier columns; every other element is rounded to int8 with its row's
// scale (absmax over the row's non-outlier elements / 127), the int8 product gives exact int32 sums (as
// int8_int8_rows), and the outlier columns multiply the dequantized weight in float32.
// x (M, K) float32 or bf16; weight (N, K) int8 (symmetric codes), scale (N,) float32, w_sums as int8_int8_rows.
// Returns y (M, N) float32 and the number of outlier columns (int64, 0-d).
std::tuple<at::Tensor, at::Tensor> llm_int8_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                                 const at::Tensor& w_sums, double threshold) {
  check_input(x, weight, "llm_int8_rows");
  check_int8_weight(weight, w_sums, x.size(1), "llm_int8_rows");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "llm_int8_rows: scale must be float32 with one value per row of the weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const float thr = static_cast<float>(threshold);  // torch compares a float32 tensor with the scalar in float32
  int64_t ldx = 0;
  const std::vector<float> xf = padded_rows(x, ldx);
  std::vector<char> outlier(static_cast<size_t>(K), 0);
  std::vector<float> sx(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    float top = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(xf[m * ldx + k]);
      if (a >= thr) outlier[k] = 1; else top = std::max(top, a);
    }
    sx[m] = std::max(top, std::numeric_limits<float>::min()) / 127.f;
  }
  std::vector<int64_t> cols;
  for (int64_t k = 0; k < K; ++k)
    if (outlier[k]) cols.push_back(k);
  std::vector<int8_t> xq(static_cast<size_t>(M * K), 0);
  std::vector<float> xc(static_cast<size_t>(M) * cols.size());  // the outlier columns' values, row by row
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      if (outlier[k]) continue;
      const float q = std::nearbyint(xf[m * ldx + k] / sx[m]);  // nearest even, as torch.round
      xq[m * K + k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
    }
    for (size_t j = 0; j < cols.size(); ++j) xc[m * cols.size() + j] = xf[m * ldx + cols[j]];
  }
  const Int8Inputs xi(xq.data(), M, K);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* o = y.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const int32_t* sums = w_sums.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* r = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        float v = static_cast<float>(xi.dot(m, r, sums[n])) * sx[m] * sp[n];
        float extra = 0.f;
        for (size_t j = 0; j < cols.size(); ++j) extra += xc[m * cols.size() + j] * (static_cast<float>(r[cols[j]]) * sp[n]);
        o[m * N + n] = v + extra;
      }
    }
  });
  return {y, at::scalar_tensor(static_cast<int64_t>(cols.size()), x.options().dtype(at::kLong))};
}

// (B, 1, H, D) attention of q (B, H, D) over k, v (B, Hkv, L, D) (any strides but the last), query
// head h reading key/value head h / (H / Hkv); mask (Bm, L) bool (true: attend), Bm = 1 or B, or none
template <typename T, typename Row>
void attend(const T* q, const T* k, const T* v, std::array<int64_t, 3> ks, std::array<int64_t, 3> vs,
            const bool* mask, int64_t mask_rows, int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D,
            float scale, T* out) {
  const int64_t groups = H / Hkv;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(static_cast<size_t>(L)), qf(static_cast<size_t>((D + 15) / 16 * 16), 0.f), acc(qf.size());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, kvh = h / groups;
      for (int64_t d = 0; d < D; ++d) qf[d] = load(q + bh * D, d);
      const bool* mrow = mask ? mask + (mask_rows == 1 ? 0 : b) * L : nullptr;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < L; ++j) {
        float s = -std::numeric_limits<float>::infinity();
        if (!mrow || mrow[j]) {
          dot_rows<1>(Row{k + b * ks[0] + kvh * ks[1] + j * ks[2]}, qf.data(), 0, D, &s);
          s *= scale;
        }
        p[j] = s;
        top = std::max(top, s);
      }
      float total = 0.f;
      for (int64_t j = 0; j < L; ++j) {
        p[j] = p[j] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(p[j] - top);
        total += p[j];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < L; ++j) {
        if (p[j] == 0.f) continue;
        const Row row{v + b * vs[0] + kvh * vs[1] + j * vs[2]};
#ifdef LOWBIT_ROWS_AVX512
        const __m512 pj = _mm512_set1_ps(p[j]);
        int64_t d = 0;
        for (; d + 16 <= D; d += 16)
          _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(pj, row.at(d), _mm512_loadu_ps(acc.data() + d)));
        if (d < D) {  // acc is padded to a multiple of 16; the row's ragged end is read masked
          const __m512 tail = row.tail(d, static_cast<__mmask16>((1u << (D - d)) - 1));
          _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(pj, tail, _mm512_loadu_ps(acc.data() + d)));
        }
#else
        for (int64_t d = 0; d < D; ++d) acc[d] += p[j] * row.at1(d);
#endif
      }
      // every key masked: 0 / 0, NaN, as SDPA gives
      for (int64_t d = 0; d < D; ++d) store(out, bh * D + d, acc[d] / total);
    }
  });
}

at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "one_query_attention: q must be contiguous (B, H, D)");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "one_query_attention: k and v must be (B, Hkv, L, D) with contiguous rows");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "one_query_attention: k, v must match q's batch and head size, with H a multiple of their heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "one_query_attention: q, k, v must all be float32 or all bfloat16");
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(1) == L && (m.size(0) == 1 || m.size(0) == B),
                "one_query_attention: mask must be bool (1 or B, L)");
  }
  auto out = at::empty({B, 1, H, D}, q.options());
  const std::array<int64_t, 3> ks{k.stride(0), k.stride(1), k.stride(2)}, vs{v.stride(0), v.stride(1), v.stride(2)};
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const int64_t mrows = m.defined() ? m.size(0) : 1;
  if (q.scalar_type() == at::kFloat) {
    attend<float, F32Row>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), ks, vs, mp, mrows, B, H, Hkv,
                          L, D, static_cast<float>(scale), out.data_ptr<float>());
  } else {
    using U = uint16_t;
    attend<U, BF16Row>(reinterpret_cast<const U*>(q.data_ptr<at::BFloat16>()),
                       reinterpret_cast<const U*>(k.data_ptr<at::BFloat16>()),
                       reinterpret_cast<const U*>(v.data_ptr<at::BFloat16>()), ks, vs, mp, mrows, B, H, Hkv, L, D,
                       static_cast<float>(scale), reinterpret_cast<U*>(out.data_ptr<at::BFloat16>()));
  }
  return out;
}

}  // namespace

// Whether the row products were built with AVX-512 (else they are plain loops: right, not fast).
bool rows_vectorized() {
#ifdef LOWBIT_ROWS_AVX512
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(lowbit, m) {
  m.def("dense_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_rows(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("int8_int8_rows(Tensor x, Tensor weight, Tensor w_sums) -> Tensor");
  m.def("llm_int8_rows(Tensor x, Tensor weight, Tensor scale, Tensor w_sums, float threshold) -> (Tensor, Tensor)");
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("dense_rows", &dense_rows);
  m.impl("int8_rows", &int8_rows);
  m.impl("int8_int8_rows", &int8_int8_rows);
  m.impl("llm_int8_rows", &llm_int8_rows);
  m.impl("one_query_attention", &one_query_attention);
}
