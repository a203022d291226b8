// The split of float32 blocks into two bfloat16 parts for precision="bf16x3" (bf16x3.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "bf16x3.h"
#include "clones.h"

namespace inmap {
namespace cpu {
namespace {

// Round to the nearest bfloat16 (ties to even), as a bit pattern. Finite inputs (the features
// are checked finite; the probabilities lie in [0, 1]); an infinity stays one.
INMAP_ALWAYS_INLINE uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

INMAP_ALWAYS_INLINE float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

INMAP_CLONES void split_row(const float* s, int64_t n, uint16_t* h, uint16_t* l) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t hb = bf16_bits(s[j]);
    h[j] = hb;
    l[j] = bf16_bits(s[j] - bf16_value(hb));
  }
}

}  // namespace

void split_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld, at::BFloat16* hi,
                at::BFloat16* lo) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      split_row(src + i * ld, cols, reinterpret_cast<uint16_t*>(hi + i * cols),
                reinterpret_cast<uint16_t*>(lo + i * cols));
  });
}

}  // namespace cpu
}  // namespace inmap
