// lowbit::causal_attention: float32 causal self-attention of whole sequences (evaluation windows, prompts), query i
// attending keys 0..i, every head. torch's CPU flash-attention kernel reaches about 38 GFLOPS of useful causal work
// on this machine at 512 tokens (4 ms a layer of SmolLM2); this one computes each query's scores 16 keys at a time
// from the keys transposed once per key/value head (no horizontal sums), only up to the query's own position.
//
// Numerics: scores, softmax and the weighted sum in float32, as torch's float32 path, the additions in another order;
// exp is a polynomial of a few float32 ulps (AVX-512's vscalefps for the power of two).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LOWBIT_CAUSAL_AVX512 1
#endif

namespace {

#ifdef LOWBIT_CAUSAL_AVX512
// exp(x) for x <= 0 (x below -87 gives about 1e-38, not 0; callers zero the lanes they mask)
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  // r = x - n ln 2 in two parts (Cody-Waite), |r| <= ln 2 / 2
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // exp(r): Taylor/minimax terms to r^6 (Cephes expf)
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// out (B, L, H, D) of q (B, H, L, D), k, v (B, Hkv, L, D) (rows contiguous, any other strides), query head h reading
// key/value head h / (H / Hkv)
void causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), groups = H / Hkv;
  // a row of the transposed keys: L rounded up to 16, plus 16 so that a block's D rows do not fall in the same few
  // cache sets (with 512 keys, rows 2 KB apart made every score a miss in L1)
  const int64_t Lp = (L + 15) / 16 * 16 + 16;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const std::array<int64_t, 3> qs{q.stride(0), q.stride(1), q.stride(2)}, ks{k.stride(0), k.stride(1), k.stride(2)},
      vs{v.stride(0), v.stride(1), v.stride(2)};
  // keys transposed per (b, key/value head): (D, Lp), zero padded
  std::vector<float> kt(static_cast<size_t>(B * Hkv * D * Lp), 0.f);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const float* src = kp + (bk / Hkv) * ks[0] + (bk % Hkv) * ks[1];
      float* dst = kt.data() + bk * D * Lp;
      for (int64_t j = 0; j < L; ++j)
        for (int64_t d = 0; d < D; ++d) dst[d * Lp + j] = src[j * ks[2] + d];
    }
  });
  at::parallel_for(0, B * H * L, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> p(static_cast<size_t>(Lp)), acc(static_cast<size_t>((D + 15) / 16 * 16));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % L, bh = row / L, b = bh / H, h = bh % H, kvh = h / groups;
      const float* qr = qp + b * qs[0] + h * qs[1] + i * qs[2];
      const float* ktr = kt.data() + (b * Hkv + kvh) * D * Lp;
      const float* vb = vp + b * vs[0] + kvh * vs[1];
      const int64_t n = i + 1;  // keys 0..i
      float top = -std::numeric_limits<float>::infinity();
#ifdef LOWBIT_CAUSAL_AVX512
      for (int64_t j = 0; j < n; j += 16) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;  // four chains of FMAs, not one
        int64_t d = 0;
        for (; d + 4 <= D; d += 4) {
          s0 = _mm512_fmadd_ps(_mm512_set1_ps(qr[d]), _mm512_loadu_ps(ktr + d * Lp + j), s0);
          s1 = _mm512_fmadd_ps(_mm512_set1_ps(qr[d + 1]), _mm512_loadu_ps(ktr + (d + 1) * Lp + j), s1);
          s2 = _mm512_fmadd_ps(_mm512_set1_ps(qr[d + 2]), _mm512_loadu_ps(ktr + (d + 2) * Lp + j), s2);
          s3 = _mm512_fmadd_ps(_mm512_set1_ps(qr[d + 3]), _mm512_loadu_ps(ktr + (d + 3) * Lp + j), s3);
        }
        for (; d < D; ++d) s0 = _mm512_fmadd_ps(_mm512_set1_ps(qr[d]), _mm512_loadu_ps(ktr + d * Lp + j), s0);
        const __m512 s = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)), _mm512_set1_ps(scale));
        const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
        _mm512_storeu_ps(p.data() + j, s);
        top = std::max(top, _mm512_mask_reduce_max_ps(m, s));
      }
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p.data() + j), _mm512_set1_ps(top))));
        _mm512_storeu_ps(p.data() + j, e);
        total = _mm512_add_ps(total, e);
      }
      const float sum = _mm512_reduce_add_ps(total);
      if (D == 64) {  // the common head size: the sums in registers
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < n; ++j) {
          const __m512 pj = _mm512_set1_ps(p[j]);
          const float* vr = vb + j * vs[2];
          a0 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr), a0);
          a1 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16), a1);
          a2 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 32), a2);
          a3 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 48), a3);
        }
        _mm512_storeu_ps(acc.data(), a0);
        _mm512_storeu_ps(acc.data() + 16, a1);
        _mm512_storeu_ps(acc.data() + 32, a2);
        _mm512_storeu_ps(acc.data() + 48, a3);
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const __m512 pj = _mm512_set1_ps(p[j]);
          const float* vr = vb + j * vs[2];
          int64_t d = 0;
          for (; d + 16 <= D; d += 16)
            _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + d), _mm512_loadu_ps(acc.data() + d)));
          if (d < D) {
            const __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1);
            _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m, vr + d), _mm512_loadu_ps(acc.data() + d)));
          }
        }
      }
#else
      for (int64_t j = 0; j < n; ++j) {
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qr[d] * ktr[d * Lp + j];
        p[j] = s * scale;
        top = std::max(top, p[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - top);
        sum += p[j];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) acc[d] += p[j] * vb[j * vs[2] + d];
#endif
      float* o = op + ((b * L + i) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] / sum;
    }
  });
}

// (B, L, H, D) causal attention of q (B, H, L, D) over k, v (B, Hkv, L, D), float32, scores times scale
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(),
              "causal_attention: q must be (B, H, L, D), k and v (B, Hkv, L, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "causal_attention: q, k, v must be float32");
  TORCH_CHECK(q.device().is_cpu() && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "causal_attention: CPU tensors with contiguous rows");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(2) == L && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "causal_attention: k, v must match q's batch, length and head size, with H a multiple of their heads");
  auto out = at::empty({B, L, H, D}, q.options());
  if (out.numel()) causal(q, k, v, static_cast<float>(scale), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit, m) { m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("causal_attention", &causal_attention); }
