// Float32 matmul against a weight packed in column panels, for decode steps on XLA:CPU,
// called through jax.ffi (research/serving/core/packed.py):
//
//   cirrus_packed_matmul:  y[m, b * 32 + j] = sum_k x[m, k] * w[b, k, j]
//
// x f32 [M, K]; w f32 [N / 32, K, 32] (a Dense kernel [K, N] packed once when the Sampler
// loads its parameters); y f32 [M, N].
//
// Why: XLA:CPU's dot with 2-16 rows ran at about 40% of this CPU's FMA rate (a 16-row
// SmolLM2 step spent ~35 ms in its layers' dots, one row ~15 ms), and an unpacked [K, N]
// weight read 32 columns at a time is a strided walk the prefetchers cannot follow. A packed
// panel is one contiguous run of K x 128 bytes: each is read from memory once, and every
// 8 rows of x reuse it from L1 / L2 (8 rows x 2 vectors of running sums in registers).
//
// Prefill chunks use it too: at 128 rows it matches XLA's dot on the unpacked kernel (each
// panel stays in L2 while every 8 rows of x pass over it).
//
// Threads take runs of panels (research/ffi_parallel.h). ISA: AVX-512F where the CPU has
// it, else a portable loop (CIRRUS_PACKED_ISA=scalar forces it).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define CIRRUS_X86 1
#endif

#include "ffi_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // Columns per panel (packed.py's PANEL).
constexpr int64_t kRows = 8;  // Rows of x per pass over a panel.
constexpr int64_t kSlice = 16;  // Rows of x transposed together (xt: [K, 16]).

struct Problem {
  const float* xt;  // x transposed, kSlice rows at a time: [ceil(M / 16), K, 16].
  const float* w;  // [N / 32, K, 32]
  float* y;  // [M, N]
  int64_t m, k, n;
};

void PortablePanel(const Problem& p, int64_t b) {
  const float* w = p.w + b * p.k * kPanel;
  for (int64_t r = 0; r < p.m; ++r) {
    const float* xt = p.xt + (r / kSlice) * p.k * kSlice + r % kSlice;
    float sums[kPanel] = {};
    for (int64_t k = 0; k < p.k; ++k) {
      const float a = xt[k * kSlice];
      for (int64_t j = 0; j < kPanel; ++j) sums[j] += a * w[k * kPanel + j];
    }
    std::memcpy(p.y + r * p.n + b * kPanel, sums, sizeof(sums));
  }
}

#if defined(CIRRUS_X86)
#define AVX512 __attribute__((target("avx512f")))

// Rows r0 .. r0 + R - 1 (within one 16-row slice) against panel b.
template <int R>
AVX512 void Block(const Problem& p, int64_t b, int64_t r0) {
  const float* w = p.w + b * p.k * kPanel;
  const float* xt = p.xt + (r0 / kSlice) * p.k * kSlice + r0 % kSlice;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.k; ++k) {
    const __m512 w0 = _mm512_loadu_ps(w + k * kPanel);
    const __m512 w1 = _mm512_loadu_ps(w + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(xt[k * kSlice + r]);
      acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* y = p.y + (r0 + r) * p.n + b * kPanel;
    _mm512_storeu_ps(y, acc[r][0]);
    _mm512_storeu_ps(y + 16, acc[r][1]);
  }
}

AVX512 void Avx512Panel(const Problem& p, int64_t b) {
  for (int64_t r0 = 0; r0 < p.m; r0 += kRows) {  // kRows divides kSlice: one slice each.
    switch (std::min(kRows, p.m - r0)) {
      case 1: Block<1>(p, b, r0); break;
      case 2: Block<2>(p, b, r0); break;
      case 3: Block<3>(p, b, r0); break;
      case 4: Block<4>(p, b, r0); break;
      case 5: Block<5>(p, b, r0); break;
      case 6: Block<6>(p, b, r0); break;
      case 7: Block<7>(p, b, r0); break;
      default: Block<8>(p, b, r0); break;
    }
  }
}
#endif  // CIRRUS_X86

enum class Isa { kPortable, kAvx512 };

Isa ChosenIsa() {
  static const Isa isa = [] {
    const char* forced = std::getenv("CIRRUS_PACKED_ISA");
    if (forced && std::strcmp(forced, "scalar") == 0) return Isa::kPortable;
#if defined(CIRRUS_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
#endif
    return Isa::kPortable;
  }();
  return isa;
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("packed_matmul: want x [M, K] and w [N / 32, K, 32]");
  }
  const int64_t m = xd[0], k = xd[1], panels = wd[0];
  if (m == 0 || panels == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  std::vector<float> xt(((m + kSlice - 1) / kSlice) * k * kSlice, 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    float* out = xt.data() + (r / kSlice) * k * kSlice + r % kSlice;
    for (int64_t i = 0; i < k; ++i) out[i * kSlice] = xp[r * k + i];
  }
  const Problem p{xt.data(), w.typed_data(), y->typed_data(), m, k, panels * kPanel};
  const bool wide = ChosenIsa() == Isa::kAvx512;
  auto run = [&p, wide](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
#if defined(CIRRUS_X86)
      if (wide) {
        Avx512Panel(p, b);
        continue;
      }
#endif
      PortablePanel(p, b);
    }
  };
  const int64_t bytes = panels * k * kPanel * 4;
  const int64_t parts = bytes < (64 << 10) ? 1 : std::min<int64_t>(pool.num_threads(), panels);
  if (parts <= 1) {
    run(0, panels);
    return ffi::Error::Success();
  }
  const int64_t chunks = std::min<int64_t>(panels, parts * 4);
  const int64_t per_chunk = (panels + chunks - 1) / chunks;
  cirrus::ParallelChunks(pool, parts, chunks, [&](int64_t, int64_t c) {
    const int64_t b0 = std::min(c * per_chunk, panels);
    run(b0, std::min(b0 + per_chunk, panels));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CirrusPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int cirrus_packed_isa() { return ChosenIsa() == Isa::kAvx512 ? 512 : 0; }
