// lowbit::int4_rows: a few input rows (decode) times a whole 4-bit weight with a scale (and a zero) per group, in a
// layout of lowbit's own that decodes with one shift and one table lookup per 32 codes.
//
// Layout ("planes"): each weight row's K columns, zero padded to a multiple of 64, in chunks of 128 columns (64
// bytes: 32 little-endian 16-bit words, word j holding the codes of columns j, 32 + j, 64 + j and 96 + j in its
// four nibbles, lowest first) and, where K leaves 64 over, a last half chunk (32 bytes, byte j holding columns j and
// 32 + j). Nibble p of every word is then 32 consecutive columns (a "plane"): a shift by 4p and a 32-entry table
// lookup (vpermw, which reads an index's low five bits: the table repeats q - 8 for both values of the next
// nibble's lowest bit) give the 32 bf16 numbers q - 8, in the input's own column order. AVX-512 BF16's dot
// product (vdpbf16ps) multiplies them with the input rounded to bf16: exact products, summed in float32. With
// w = s (q - 8) + z per group (float32 s and z),
//     sum_k w_k x_k = s * sum_k (q_k - 8) x_k + z * sum_k x_k     over the group's columns,
// the second term only where some zero is not 0 (symmetric codecs have none).
// The weight is read once per call for up to four input rows, two weight rows at a time (measured: one, four or
// eight streams of rows read this machine's memory slower): a decode step's time is the weight's memory traffic,
// 0.5 byte a weight and 4 (or 8) bytes a group, at about 50 GB/s here.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "native_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOWBIT_INT4_BF16 1
#endif

namespace {

using lowbit::load;
using lowbit::store;

constexpr int64_t kChunk = 128;  // columns per 64 bytes of codes
// rows ahead whose codes each read asks the CPU to fetch: a decode step's linears are short reads of memory that the
// hardware prefetcher alone meets late (measured here: 16 rows ahead, 1.8 against 2.1 ms for SmolLM2's 210 int4 linears)
constexpr int64_t kPrefetchRows = 16;

// The code of column k of a weight row in the planes layout (Kp: the row's padded width)
inline int code_at(const uint8_t* row, int64_t k, int64_t Kp) {
  const int64_t c = k / kChunk, in = k % kChunk;
  if ((c + 1) * kChunk > Kp) return (row[c * 64 + in % 32] >> (4 * (in / 32))) & 15;  // the half chunk
  const int64_t j = in % 32, p = in / 32;
  const int word = row[c * 64 + 2 * j] | (row[c * 64 + 2 * j + 1] << 8);
  return (word >> (4 * p)) & 15;
}

// The input rows rounded to bf16 (stride Kp, zero padded: x itself where it is bf16 already and K = Kp) and, where
// the weight has zeros, each row's sum over every group of those bf16 values
struct Int4Inputs {
  int64_t M, K, Kp, G, gs;
  const uint16_t* xb;        // (M, Kp)
  std::vector<uint16_t> own; // xb's storage where x is not used as it is
  std::vector<float> sums;   // (M, G), empty without zeros
  Int4Inputs(const at::Tensor& x, int64_t Kp_, int64_t G_, int64_t gs_, bool with_sums)
      : M(x.size(0)), K(x.size(1)), Kp(Kp_), G(G_), gs(gs_) {
    if (x.scalar_type() == at::kBFloat16 && K == Kp) {
      xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    } else {
      own.assign(static_cast<size_t>(M * Kp), 0);
      for (int64_t m = 0; m < M; ++m) {
        uint16_t* row = own.data() + m * Kp;
        if (x.scalar_type() == at::kBFloat16) {
          std::copy_n(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * K, K, row);
        } else {
          const float* xf = x.data_ptr<float>() + m * K;
          for (int64_t k = 0; k < K; ++k) store(row, k, xf[k]);
        }
      }
      xb = own.data();
    }
    if (with_sums) {
      sums.assign(static_cast<size_t>(M * G), 0.f);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) sums[m * G + k / gs] += load(xb + m * Kp, k);
    }
  }
};

struct Int4Weight {
  const uint8_t* codes;  // (N, Kp / 2)
  const float* scale;    // (N, G)
  const float* zero;     // (N, G) or null
  int64_t row_bytes, G;
};

// out[r * T + t] = dot(weight row n0 + r, input row m0 + t) for R weight rows and T input rows
template <int64_t GS, int R, int T>
void int4_dot(const Int4Weight& w, int64_t n0, const Int4Inputs& in, int64_t m0, float* out) {
#ifdef LOWBIT_INT4_BF16
  // bf16 of (i & 15) - 8 for i = 0 .. 31
  alignas(64) static const uint16_t table_bits[32] = {
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080,
      0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80,
      0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
  const __m512i table = _mm512_load_si512(table_bits);
  auto plane = [&](__m512i v, int p) { return (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4 * p), table); };
  const int64_t full = in.Kp / kChunk, Kp = in.Kp;
  const uint16_t* x0 = in.xb + m0 * Kp;
  __m512 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  // adds the dot products of P planes (32 columns each, from column k0) scaled by their groups' scales
  auto accumulate = [&](int r, const __m512bh* planes, int P, int64_t k0) {
    const float* s = w.scale + (n0 + r) * w.G;
    for (int t = 0; t < T; ++t) {
      const uint16_t* xr = x0 + t * Kp + k0;
      auto part = [&](__m512 acc, int p) {
        return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(xr + 32 * p), planes[p]);
      };
      if constexpr (GS >= 128) {  // all P planes in one group
        __m512 a = part(_mm512_setzero_ps(), 0);
        for (int p = 1; p < P; ++p) a = part(a, p);
        total[r][t] = _mm512_fmadd_ps(a, _mm512_set1_ps(s[k0 / GS]), total[r][t]);
      } else {
        for (int p = 0; p < P; p += static_cast<int>(GS / 32)) {
          __m512 a = part(_mm512_setzero_ps(), p);
          if (GS == 64) a = part(a, p + 1);
          total[r][t] = _mm512_fmadd_ps(a, _mm512_set1_ps(s[(k0 + 32 * p) / GS]), total[r][t]);
        }
      }
    }
  };
  for (int64_t c = 0; c < full; ++c) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* src = w.codes + (n0 + r) * w.row_bytes + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * w.row_bytes), _MM_HINT_T0);  // never faults
      const __m512i v = _mm512_loadu_si512(src);
      const __m512bh planes[4] = {plane(v, 0), plane(v, 1), plane(v, 2), plane(v, 3)};
      accumulate(r, planes, 4, c * kChunk);
    }
  }
  if (full * kChunk < Kp) {  // the half chunk: 32 bytes, widened to words
    for (int r = 0; r < R; ++r) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + (n0 + r) * w.row_bytes + full * 64));
      const __m512i v = _mm512_cvtepu8_epi16(b);
      const __m512bh planes[2] = {plane(v, 0), plane(v, 1)};
      accumulate(r, planes, 2, full * kChunk);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float y = _mm512_reduce_add_ps(total[r][t]);
      if (w.zero) {
        const float* z = w.zero + (n0 + r) * w.G;
        const float* xs = in.sums.data() + (m0 + t) * in.G;
        for (int64_t g = 0; g < in.G; ++g) y += z[g] * xs[g];
      }
      out[r * T + t] = y;
    }
  }
#else  // plain loops
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = w.codes + (n0 + r) * w.row_bytes;
    const float* s = w.scale + (n0 + r) * w.G;
    const float* z = w.zero ? w.zero + (n0 + r) * w.G : nullptr;
    for (int t = 0; t < T; ++t) {
      const uint16_t* xr = in.xb + (m0 + t) * in.Kp;
      float y = 0.f;
      for (int64_t k = 0; k < in.K; ++k) {
        const int64_t g = k / GS;
        y += (s[g] * static_cast<float>(code_at(row, k, in.Kp) - 8) + (z ? z[g] : 0.f)) * load(xr, k);
      }
      out[r * T + t] = y;
    }
  }
#endif
}

// two weight rows x T input rows at a time, then a last odd row
template <int64_t GS, int T, typename Put>
void int4_rows_of(const Int4Weight& w, int64_t begin, int64_t end, const Int4Inputs& in, int64_t m, float* sums,
                  const Put& put) {
  constexpr int R = 2;  // see the top of this file
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    int4_dot<GS, R, T>(w, n, in, m, sums);
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) put(m + t, n + r, sums[r * T + t]);
  }
  for (; n < end; ++n) {
    int4_dot<GS, 1, T>(w, n, in, m, sums);
    for (int t = 0; t < T; ++t) put(m + t, n, sums[t]);
  }
}

template <int64_t GS, typename Out>
void int4_product(const Int4Weight& w, const Int4Inputs& in, int64_t N, Out* o) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float sums[16];
    auto put = [&](int64_t m, int64_t n, float v) { store(o, m * N + n, v); };
    for (int64_t m = 0; m < in.M; m += 4) {
      switch (std::min<int64_t>(4, in.M - m)) {
        case 4: int4_rows_of<GS, 4>(w, begin, end, in, m, sums, put); break;
        case 3: int4_rows_of<GS, 3>(w, begin, end, in, m, sums, put); break;
        case 2: int4_rows_of<GS, 2>(w, begin, end, in, m, sums, put); break;
        default: int4_rows_of<GS, 1>(w, begin, end, in, m, sums, put); break;
      }
    }
  });
}

// (M, N) = x (M, K) @ W.T in x's dtype (float32 or bf16; computed from x rounded to bf16, float32 sums):
// codes (N, Kp / 2) uint8 in the planes layout (Kp: K rounded up to 64); scale and zero (N, G) float32 with
// G = ceil(Kp / group_size) (groups past K: any value), zero optional; group_size 32, 64, 128 or 256
at::Tensor int4_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& zero, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int4_rows: x must be a contiguous 2-D float32 or bfloat16 CPU tensor");
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256,
              "int4_rows: group_size must be 32, 64, 128 or 256");
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 63) / 64 * 64, N = codes.size(0);
  const int64_t G = (Kp + group_size - 1) / group_size;
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte && codes.size(1) == Kp / 2,
              "int4_rows: codes must be contiguous (N, Kp / 2) uint8, Kp = x's columns rounded up to 64");
  auto check_groups = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kFloat && t.size(0) == N && t.size(1) == G,
                "int4_rows: ", what, " must be contiguous (N, ceil(Kp / group_size)) float32");
  };
  check_groups(scale, "scale");
  const bool has_zero = zero.has_value() && zero->defined();
  if (has_zero) check_groups(*zero, "zero");
  const Int4Inputs in(x, Kp, G, group_size, has_zero);
  const Int4Weight w{codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), has_zero ? zero->data_ptr<float>() : nullptr,
                     Kp / 2, G};
  auto out = at::empty({M, N}, x.options());
  auto run = [&](auto* o) {
    switch (group_size) {
      case 32: int4_product<32>(w, in, N, o); break;
      case 64: int4_product<64>(w, in, N, o); break;
      case 128: int4_product<128>(w, in, N, o); break;
      default: int4_product<256>(w, in, N, o); break;
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else {
    run(out.data_ptr<float>());
  }
  return out;
}

// The (N, K) weight s (q - 8) + z of int4_rows' arguments in dtype (float32 or bf16; float32 arithmetic, one
// rounding): what a product of many input rows (prefill) multiplies with a dense matmul
at::Tensor int4_dense(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                      int64_t group_size, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4_dense: dtype must be float32 or bfloat16");
  const int64_t Kp = (K + 63) / 64 * 64, N = codes.size(0), G = (Kp + group_size - 1) / group_size;
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte && codes.size(1) == Kp / 2,
              "int4_dense: codes must be contiguous (N, Kp / 2) uint8, Kp = K rounded up to 64");
  const bool has_zero = zero.has_value() && zero->defined();
  for (const at::Tensor* t : {&scale, has_zero ? &*zero : &scale})
    TORCH_CHECK(t->dim() == 2 && t->is_contiguous() && t->scalar_type() == at::kFloat && t->size(0) == N &&
                    t->size(1) == G, "int4_dense: scale and zero must be contiguous (N, ceil(Kp / group_size)) float32");
  auto out = at::empty({N, K}, codes.options().dtype(dtype));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = has_zero ? zero->data_ptr<float>() : nullptr;
  auto run = [&](auto* o) {
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const uint8_t* row = cp + n * (Kp / 2);
        auto value = [&](int64_t k, float q) {
          const int64_t g = n * G + k / group_size;
          return sp[g] * q + (zp ? zp[g] : 0.f);
        };
#ifdef LOWBIT_INT4_BF16
        // 16 columns from k0 of a plane's words (code in the low nibble), masked at K
        auto put16 = [&](__m256i words, int64_t k0) {
          if (k0 >= K) return;
          const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(
              _mm512_and_si512(_mm512_cvtepu16_epi32(words), _mm512_set1_epi32(15)), _mm512_set1_epi32(8)));
          const int64_t g = n * G + k0 / group_size;  // 16 columns never straddle a group
          __m512 v = _mm512_mul_ps(q, _mm512_set1_ps(sp[g]));
          if (zp) v = _mm512_add_ps(v, _mm512_set1_ps(zp[g]));
          const __mmask16 m = K - k0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k0)) - 1);
          if constexpr (std::is_same_v<std::remove_pointer_t<decltype(o)>, float>) {
            _mm512_mask_storeu_ps(o + n * K + k0, m, v);
          } else {
            _mm256_mask_storeu_epi16(o + n * K + k0, m, (__m256i)_mm512_cvtneps_pbh(v));
          }
        };
        auto put_plane = [&](__m512i words, int64_t k0) {
          put16(_mm512_castsi512_si256(words), k0);
          put16(_mm512_extracti64x4_epi64(words, 1), k0 + 16);
        };
        const int64_t full = Kp / kChunk;
        for (int64_t c = 0; c < full; ++c) {
          const __m512i v = _mm512_loadu_si512(row + c * 64);
          for (int p = 0; p < 4; ++p) put_plane(_mm512_srli_epi16(v, 4 * p), c * kChunk + 32 * p);
        }
        if (full * kChunk < Kp) {
          const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + full * 64)));
          for (int p = 0; p < 2; ++p) put_plane(_mm512_srli_epi16(v, 4 * p), full * kChunk + 32 * p);
        }
#else
        for (int64_t k = 0; k < K; ++k) store(o, n * K + k, value(k, static_cast<float>(code_at(row, k, Kp) - 8)));
#endif
        (void)value;
      }
    });
  };
  if (dtype == at::kBFloat16) {
    run(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else {
    run(out.data_ptr<float>());
  }
  return out;
}

}  // namespace

// Whether lowbit::int4_rows was built with AVX-512 BF16 (else it is a plain loop: right, not fast).
bool int4_rows_vectorized() {
#ifdef LOWBIT_INT4_BF16
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("int4_rows(Tensor x, Tensor codes, Tensor scale, Tensor? zero, int group_size) -> Tensor");
  m.def("int4_dense(Tensor codes, Tensor scale, Tensor? zero, int group_size, int K, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int4_rows", &int4_rows);
  m.impl("int4_dense", &int4_dense);
}
