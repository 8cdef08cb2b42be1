// Helpers shared by lowbit's native operator sources: bf16 <-> float32 as torch rounds them.
#pragma once

#include <cstdint>
#include <cstring>

namespace lowbit {

inline float load(const float* p, int64_t k) { return p[k]; }
inline float load(const uint16_t* p, int64_t k) {  // bf16 -> float32: exact
  uint32_t u = uint32_t(p[k]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void store(float* p, int64_t k, float f) { p[k] = f; }
inline void store(uint16_t* p, int64_t k, float f) {  // float32 -> bf16, nearest even (as c10::BFloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[k] = f != f ? uint16_t(0x7FC0) : uint16_t(rounded);
}

}  // namespace lowbit
