// lowbit's fused CPU operators for W8A8 linears (compiled on first use by lowbit/modules/native.py).
//
// Each one computes, in one pass, exactly what a chain of eager torch operators computes (the same
// float32 operations in the same order, IEEE division, round half to even, bf16 round to nearest
// even), so that a model gives bit-identical results with or without them. What they save is the
// chain's intermediate tensors (allocations and memory passes) and its per-operator dispatch, which
// at one token per call cost more than the int8 matrix product itself.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "native_common.h"

namespace {

constexpr float kTiny = 1.17549435e-38f;  // torch.finfo(torch.float32).tiny

using lowbit::load;
using lowbit::store;

// round(v) (half to even) of v clamped to [-128, 127]: clamping first is the same as rounding first
// (the bounds are integers), and adding then subtracting 1.5 * 2^23 rounds a float of magnitude
// below 2^22 to an integer, half to even, in any vector width.
inline int8_t to_int8(float v) {
  v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
  v = (v + 12582912.f) - 12582912.f;
  return static_cast<int8_t>(static_cast<int32_t>(v));
}

// |x|'s largest value of a row: non-negative floats order as their bit patterns do, so the maximum
// is an integer one (which vectorizes; a float max reduction does not without -ffast-math)
inline float absmax(const uint16_t* __restrict row, int64_t cols) {
  uint16_t m = 0;
  for (int64_t k = 0; k < cols; ++k) {
    uint16_t a = row[k] & 0x7FFFu;
    m = a > m ? a : m;
  }
  return load(&m, 0);
}
inline float absmax(const float* __restrict row, int64_t cols) {
  uint32_t m = 0;
  for (int64_t k = 0; k < cols; ++k) {
    uint32_t a;
    std::memcpy(&a, row + k, 4);
    a &= 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  float f;
  std::memcpy(&f, &m, 4);
  return f;
}

template <typename In>
inline void quantize_row(const In* __restrict row, int64_t cols, float s, int8_t* __restrict out) {
  for (int64_t k = 0; k < cols; ++k) out[k] = to_int8(load(row, k) / s);
}

template <typename In>
void quantize(const In* x, int64_t rows, int64_t cols, float static_scale, int8_t* q, float* scale) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const In* row = x + i * cols;
      float s = static_scale;
      if (s <= 0.f) {  // dynamic: clamp(absmax, tiny) / 127
        float m = absmax(row, cols);
        s = (m > kTiny ? m : kTiny) / 127.f;
        scale[i] = s;
      }
      quantize_row(row, cols, s, q + i * cols);
    }
  });
}

template <typename Out>
inline void dequantize_row(const int32_t* __restrict a, int64_t j0, int64_t j1, float s, const float* __restrict col,
                           Out* __restrict o) {
  for (int64_t j = j0; j < j1; ++j) store(o, j, static_cast<float>(a[j]) * s * col[j]);
}

template <typename Out>
void dequantize(const int32_t* acc, int64_t rows, int64_t cols, const float* row_scale, bool one_row_scale,
                const float* col_scale, Out* out) {
  at::parallel_for(0, rows * cols, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin / cols; i * cols < end; ++i) {
      int64_t j0 = std::max(begin, i * cols) - i * cols, j1 = std::min(end, (i + 1) * cols) - i * cols;
      dequantize_row(acc + i * cols, j0, j1, row_scale[one_row_scale ? 0 : i], col_scale, out + i * cols);
    }
  });
}

}  // namespace

// Int8 codes (M, K) and float32 scales (M, 1) of x (M, K, float32 or bf16): symmetric per row,
// scale = clamp(absmax, tiny) / 127, codes = clamp(round(x / scale), -128, 127). With static_scale > 0
// every row uses it (the scale returned is then (1, 1), that value).
std::vector<at::Tensor> quantize_rows(const at::Tensor& x, double static_scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "quantize_rows: x must be a contiguous 2-D CPU tensor");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto q = at::empty({rows, cols}, x.options().dtype(at::kChar));
  const bool dynamic = static_scale <= 0;
  auto scale = dynamic ? at::empty({rows, 1}, x.options().dtype(at::kFloat))
                       : at::full({1, 1}, static_cast<float>(static_scale), x.options().dtype(at::kFloat));
  float* sp = scale.data_ptr<float>();
  const float s = dynamic ? 0.f : static_cast<float>(static_scale);
  if (x.scalar_type() == at::kBFloat16) {
    quantize(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), rows, cols, s, q.data_ptr<int8_t>(), sp);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "quantize_rows: x must be float32 or bfloat16");
    quantize(x.data_ptr<float>(), rows, cols, s, q.data_ptr<int8_t>(), sp);
  }
  return {q, scale};
}

// (acc * row_scale) * col_scale in float32, written as out_dtype (float32 or bf16): acc (M, N) int32,
// row_scale (M, 1) or (1, 1) float32, col_scale (N,) float32.
at::Tensor dequantize_rows(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& col_scale,
                           at::ScalarType out_dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == at::kInt, "dequantize_rows: acc must be contiguous 2-D int32");
  const int64_t rows = acc.size(0), cols = acc.size(1);
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.is_contiguous() &&
                  (row_scale.numel() == rows || row_scale.numel() == 1),
              "dequantize_rows: row_scale must be float32 with one value per row or one in all");
  TORCH_CHECK(col_scale.scalar_type() == at::kFloat && col_scale.is_contiguous() && col_scale.numel() == cols,
              "dequantize_rows: col_scale must be float32 with one value per column");
  auto out = at::empty({rows, cols}, acc.options().dtype(out_dtype));
  const bool one = row_scale.numel() == 1 && rows != 1;
  if (out_dtype == at::kBFloat16) {
    dequantize(acc.data_ptr<int32_t>(), rows, cols, row_scale.data_ptr<float>(), one, col_scale.data_ptr<float>(),
               reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else {
    TORCH_CHECK(out_dtype == at::kFloat, "dequantize_rows: out_dtype must be float32 or bfloat16");
    dequantize(acc.data_ptr<int32_t>(), rows, cols, row_scale.data_ptr<float>(), one, col_scale.data_ptr<float>(),
               out.data_ptr<float>());
  }
  return out;
}

bool rows_vectorized();       // native_decode.cpp
bool int4_rows_vectorized();  // native_int4.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "int8 codes and scales of rows (symmetric; dynamic or static scale)");
  m.def("dequantize_rows", &dequantize_rows, "int32 sums times row and column scales, as float32 or bf16");
  m.def("rows_vectorized", &rows_vectorized, "whether lowbit::dense_rows / int8_rows were built with AVX-512");
  m.def("int4_rows_vectorized", &int4_rows_vectorized, "whether lowbit::int4_rows was built with AVX-512 BF16");
}
