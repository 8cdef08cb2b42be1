// lowbit::causal_attention: float32 causal self-attention of whole sequences (evaluation windows, prompts), query i
// attending keys 0..i, every head. torch's CPU flash-attention kernel reaches about 38 GFLOPS of useful causal work
// on this machine at 512 tokens (4 ms a layer of SmolLM2); this one computes each query's scores 16 keys at a time
// from the keys transposed once per key/value head (no horizontal sums), only up to the query's own position, two
// queries of a head at a time so that each key and value row is loaded once for both (1.3 against 2.3 ms a layer).
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
  // queries two at a time (i, i + 1 of one head): each key row and value row loaded once for both
  const int64_t pairs = (L + 1) / 2;
  at::parallel_for(0, B * H * pairs, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> p0(static_cast<size_t>(Lp)), p1(static_cast<size_t>(Lp));
    std::vector<float> acc0(static_cast<size_t>((D + 15) / 16 * 16)), acc1(acc0.size());
    for (int64_t pr = begin; pr < end; ++pr) {
      const int64_t bh = pr / pairs, i0 = 2 * (pr % pairs), b = bh / H, h = bh % H, kvh = h / groups;
      const bool two = i0 + 1 < L;
      const int64_t i1 = two ? i0 + 1 : i0;
      const float* q0 = qp + b * qs[0] + h * qs[1] + i0 * qs[2];
      const float* q1 = qp + b * qs[0] + h * qs[1] + i1 * qs[2];
      const float* ktr = kt.data() + (b * Hkv + kvh) * D * Lp;
      const float* vb = vp + b * vs[0] + kvh * vs[1];
      const int64_t n0 = i0 + 1, n = i1 + 1;  // keys 0..i0 for the first query, 0..i1 for the second
      float sum0, sum1;
#ifdef LOWBIT_CAUSAL_AVX512
      float top0 = -std::numeric_limits<float>::infinity(), top1 = top0;
      for (int64_t j = 0; j < n; j += 16) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, c0 = a0, c1 = a0;  // two chains of FMAs per query
        int64_t d = 0;
        for (; d + 2 <= D; d += 2) {
          const __m512 k0 = _mm512_loadu_ps(ktr + d * Lp + j), k1 = _mm512_loadu_ps(ktr + (d + 1) * Lp + j);
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), k0, a0);
          c0 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d]), k0, c0);
          a1 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d + 1]), k1, a1);
          c1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d + 1]), k1, c1);
        }
        if (d < D) {
          const __m512 k0 = _mm512_loadu_ps(ktr + d * Lp + j);
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), k0, a0);
          c0 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d]), k0, c0);
        }
        const __m512 s0 = _mm512_mul_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scale));
        const __m512 s1 = _mm512_mul_ps(_mm512_add_ps(c0, c1), _mm512_set1_ps(scale));
        const __mmask16 m0 = n0 - j >= 16 ? __mmask16(0xFFFF) : n0 > j ? __mmask16((1u << (n0 - j)) - 1) : __mmask16(0);
        const __mmask16 m1 = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
        _mm512_storeu_ps(p0.data() + j, s0);
        _mm512_storeu_ps(p1.data() + j, s1);
        if (m0) top0 = std::max(top0, _mm512_mask_reduce_max_ps(m0, s0));
        top1 = std::max(top1, _mm512_mask_reduce_max_ps(m1, s1));
      }
      __m512 t0 = _mm512_setzero_ps(), t1 = t0;
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m0 = n0 - j >= 16 ? __mmask16(0xFFFF) : n0 > j ? __mmask16((1u << (n0 - j)) - 1) : __mmask16(0);
        const __mmask16 m1 = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
        // a key beyond a query's own position weighs 0 (the first query's last key when the second has one more)
        const __m512 e0 = _mm512_maskz_mov_ps(m0, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p0.data() + j), _mm512_set1_ps(top0))));
        const __m512 e1 = _mm512_maskz_mov_ps(m1, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p1.data() + j), _mm512_set1_ps(top1))));
        _mm512_storeu_ps(p0.data() + j, e0);
        _mm512_storeu_ps(p1.data() + j, e1);
        t0 = _mm512_add_ps(t0, e0);
        t1 = _mm512_add_ps(t1, e1);
      }
      sum0 = _mm512_reduce_add_ps(t0);
      sum1 = _mm512_reduce_add_ps(t1);
      if (D == 64) {  // the common head size: both queries' sums in registers
        __m512 x0 = _mm512_setzero_ps(), x1 = x0, x2 = x0, x3 = x0, y0 = x0, y1 = x0, y2 = x0, y3 = x0;
        for (int64_t j = 0; j < n; ++j) {
          const __m512 w0 = _mm512_set1_ps(p0[j]), w1 = _mm512_set1_ps(p1[j]);
          const float* vr = vb + j * vs[2];
          const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                       v3 = _mm512_loadu_ps(vr + 48);
          x0 = _mm512_fmadd_ps(w0, v0, x0);
          x1 = _mm512_fmadd_ps(w0, v1, x1);
          x2 = _mm512_fmadd_ps(w0, v2, x2);
          x3 = _mm512_fmadd_ps(w0, v3, x3);
          y0 = _mm512_fmadd_ps(w1, v0, y0);
          y1 = _mm512_fmadd_ps(w1, v1, y1);
          y2 = _mm512_fmadd_ps(w1, v2, y2);
          y3 = _mm512_fmadd_ps(w1, v3, y3);
        }
        _mm512_storeu_ps(acc0.data(), x0);
        _mm512_storeu_ps(acc0.data() + 16, x1);
        _mm512_storeu_ps(acc0.data() + 32, x2);
        _mm512_storeu_ps(acc0.data() + 48, x3);
        _mm512_storeu_ps(acc1.data(), y0);
        _mm512_storeu_ps(acc1.data() + 16, y1);
        _mm512_storeu_ps(acc1.data() + 32, y2);
        _mm512_storeu_ps(acc1.data() + 48, y3);
      } else {
        std::fill(acc0.begin(), acc0.end(), 0.f);
        std::fill(acc1.begin(), acc1.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const __m512 w0 = _mm512_set1_ps(p0[j]), w1 = _mm512_set1_ps(p1[j]);
          const float* vr = vb + j * vs[2];
          for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = D - d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (D - d)) - 1);
            const __m512 vv = _mm512_maskz_loadu_ps(m, vr + d);
            _mm512_storeu_ps(acc0.data() + d, _mm512_fmadd_ps(w0, vv, _mm512_loadu_ps(acc0.data() + d)));
            _mm512_storeu_ps(acc1.data() + d, _mm512_fmadd_ps(w1, vv, _mm512_loadu_ps(acc1.data() + d)));
          }
        }
      }
#else
      const float* qrs[2] = {q0, q1};
      float* ps[2] = {p0.data(), p1.data()};
      float* accs[2] = {acc0.data(), acc1.data()};
      float sums[2];
      for (int r = 0; r < 2; ++r) {
        const int64_t nr = r == 0 ? n0 : n;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < nr; ++j) {
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qrs[r][d] * ktr[d * Lp + j];
          ps[r][j] = s * scale;
          top = std::max(top, ps[r][j]);
        }
        sums[r] = 0.f;
        for (int64_t j = 0; j < nr; ++j) {
          ps[r][j] = std::exp(ps[r][j] - top);
          sums[r] += ps[r][j];
        }
        std::fill(accs[r], accs[r] + D, 0.f);
        for (int64_t j = 0; j < nr; ++j)
          for (int64_t d = 0; d < D; ++d) accs[r][d] += ps[r][j] * vb[j * vs[2] + d];
      }
      sum0 = sums[0];
      sum1 = sums[1];
#endif
      float* o0 = op + ((b * L + i0) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o0[d] = acc0[d] / sum0;
      if (two) {
        float* o1 = op + ((b * L + i1) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o1[d] = acc1[d] / sum1;
      }
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
