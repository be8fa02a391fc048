// Weight-only quantized matmul for XLA:CPU, called through jax.ffi (research/compression/kernel.py).
//
//   y[m, n] = sum_k x[m, k] * q[k, n] * scale[k / group, n]
//
// x f32 [M, K]; y f32 [M, N]; scale f32 [K / group, N]. q is stored k-interleaved as
// research/compression/quantize.py describes: 32-bit words [K / L, N], each holding L
// consecutive k of one column: L = 4 int8 values (byte j = row j), or L = 8 int4 nibbles
// (value + 8, nibble j at bits 4j).
//
// Why a kernel: XLA:CPU converts an int8 weight to a full f32 copy before a dot, so decode
// would read 5 bytes per weight instead of 1. Here weights are widened in registers.
//
// Loop order: threads take contiguous ranges of word rows (blocks of L rows of the matrix),
// so each streams one contiguous run of memory; within a block, columns go 64 at a time and
// y holds the running sums (a thread other than the caller sums into its own buffer, added
// at the end). int4 applies each group's scale per block; int8 scales once at the end.
//
// ISA: AVX-512 (F, BW, VL) where the CPU has it, else a portable loop the compiler
// vectorises for the baseline ISA. CIRRUS_QMATMUL_ISA=scalar forces the portable path;
// CIRRUS_QMATMUL_THREADS caps the threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define CIRRUS_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const uint8_t* q;  // [K / L, N] words.
  const float* scale;
  int64_t m, k, n, group;
  int bits;
  int64_t per_word;  // L.
};

// ---- Portable path --------------------------------------------------------------------------

inline float Weight(const Problem& p, int64_t word_row, int64_t col, int j) {
  const uint8_t* word = p.q + 4 * (word_row * p.n + col);
  if (p.bits == 8) return static_cast<float>(static_cast<int8_t>(word[j]));
  const uint8_t byte = word[j / 2];
  return static_cast<float>((j & 1) ? (byte >> 4) : (byte & 0xF)) - 8.0f;
}

// Word rows [w0, w1) into y (M x N, zeroed by the caller).
void RowsPortable(const Problem& p, int64_t w0, int64_t w1, float* y) {
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t k0 = w * p.per_word;
    const float* s = p.scale + (k0 / p.group) * p.n;
    for (int64_t row = 0; row < p.m; ++row) {
      const float* x = p.x + row * p.k + k0;
      float* yr = y + row * p.n;
      for (int64_t c = 0; c < p.n; ++c) {
        float acc = 0.0f;
        for (int j = 0; j < p.per_word; ++j) acc += x[j] * Weight(p, w, c, j);
        yr[c] += p.bits == 4 ? acc * s[c] : acc;
      }
    }
  }
}

// ---- AVX-512 path ---------------------------------------------------------------------------
#ifdef CIRRUS_X86

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

static int64_t PrefetchBytes() {
  static const int64_t bytes = [] {
    const char* forced = std::getenv("CIRRUS_QMATMUL_PREFETCH");
    return forced ? std::atoll(forced) : int64_t{4096};
  }();
  return bytes;
}

template <int BITS>
AVX512 void RowsAvx512(const Problem& p, int64_t w0, int64_t w1, float* __restrict y) {
  constexpr int L = BITS == 8 ? 4 : 8;
  const __m512i nibble = _mm512_set1_epi32(0xF);
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t k0 = w * L;
    const uint8_t* __restrict words = p.q + 4 * w * p.n;
    const float* __restrict s = p.scale + (k0 / p.group) * p.n;
    for (int64_t r = 0; r < p.m; ++r) {
      // This row's L inputs, broadcast once for the whole word row.
      __m512 xb[L];
      float sum = 0.0f;
      for (int j = 0; j < L; ++j) {
        const float xj = p.x[r * p.k + k0 + j];
        xb[j] = _mm512_set1_ps(xj);
        sum += xj;
      }
      // Nibbles hold value + 8: start from -8 * sum of x.
      const __m512 start = _mm512_set1_ps(BITS == 4 ? -8.0f * sum : 0.0f);
      float* __restrict yr = y + r * p.n;
      for (int64_t col = 0; col < p.n; col += 16) {
        const __mmask16 mask =
            static_cast<__mmask16>((1u << std::min<int64_t>(16, p.n - col)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi32(mask, words + 4 * col);
        // The stream is contiguous across word rows; hardware prefetch alone kept one core
        // at ~7 GB/s from DRAM on these VMs.
        _mm_prefetch(reinterpret_cast<const char*>(words + 4 * col) + PrefetchBytes(), _MM_HINT_T0);
        __m512 acc = start;
        for (int j = 0; j < L; ++j) {
          const __m512i lane =
              BITS == 8 ? _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24)
                        : _mm512_and_si512(_mm512_srli_epi32(v, 4 * j), nibble);
          acc = _mm512_fmadd_ps(xb[j], _mm512_cvtepi32_ps(lane), acc);
        }
        const __m512 prev = _mm512_maskz_loadu_ps(mask, yr + col);
        _mm512_mask_storeu_ps(yr + col, mask,
                              BITS == 4 ? _mm512_fmadd_ps(acc, _mm512_maskz_loadu_ps(mask, s + col), prev)
                                        : _mm512_add_ps(acc, prev));
      }
    }
  }
}

#endif  // CIRRUS_X86

// ---- Dispatch -------------------------------------------------------------------------------

enum class Isa { kPortable, kAvx512 };

Isa ChosenIsa() {
  static const Isa isa = [] {
    const char* forced = std::getenv("CIRRUS_QMATMUL_ISA");
    if (forced && std::strcmp(forced, "scalar") == 0) return Isa::kPortable;
#ifdef CIRRUS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
#endif
    return Isa::kPortable;
  }();
  return isa;
}

// Word rows [w0, w1) summed into y (zeroed first).
void Rows(const Problem& p, int64_t w0, int64_t w1, float* y) {
  std::fill(y, y + p.m * p.n, 0.0f);
#ifdef CIRRUS_X86
  if (ChosenIsa() == Isa::kAvx512) {
    return p.bits == 8 ? RowsAvx512<8>(p, w0, w1, y) : RowsAvx512<4>(p, w0, w1, y);
  }
#endif
  RowsPortable(p, w0, w1, y);
}

// Below this many weight bytes a matrix runs on the calling thread alone: waking another
// thread costs more than it saves (bench/qmatmul.py).
static int64_t ParallelBytes() {
  static const int64_t bytes = [] {
    const char* forced = std::getenv("CIRRUS_QMATMUL_PARALLEL_BYTES");
    return forced ? std::atoll(forced) : int64_t{16 * 1024};
  }();
  return bytes;
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits,
                       int64_t group) {
  const auto xd = x.dimensions();
  const auto sd = scale.dimensions();
  if (xd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("qmatmul: x and scale must be 2-D");
  }
  Problem p;
  p.m = xd[0];
  p.k = xd[1];
  p.n = sd[1];
  p.group = group;
  p.bits = static_cast<int>(bits);
  p.per_word = 32 / std::max<int64_t>(bits, 1);
  if ((bits != 8 && bits != 4) || group <= 0 || p.k % group || sd[0] != p.k / group ||
      group % p.per_word) {
    return ffi::Error::InvalidArgument("qmatmul: bad bits / group / scale shape");
  }
  const int64_t word_rows = p.k / p.per_word;
  if (static_cast<int64_t>(q.size_bytes()) != word_rows * p.n * 4) {
    return ffi::Error::InvalidArgument("qmatmul: q has the wrong size");
  }
  p.x = x.typed_data();
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.scale = scale.typed_data();
  float* out = y->typed_data();
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();

  static const int64_t max_threads = [] {
    const char* forced = std::getenv("CIRRUS_QMATMUL_THREADS");
    return forced ? std::max(1, std::atoi(forced)) : 1 << 20;
  }();
  const int64_t bytes = word_rows * p.n * 4;
  int64_t parts = bytes < ParallelBytes() ? 1 : std::max<int64_t>(1, pool.num_threads());
  parts = std::min({parts, max_threads, word_rows});
  const int64_t per = (word_rows + parts - 1) / parts;
  // Part 0 sums into y; part i > 0 into its own slice of `partial`, added at the end.
  std::vector<float> partial((parts - 1) * p.m * p.n);
  std::atomic<int64_t> pending(parts - 1);
  for (int64_t i = 1; i < parts; ++i) {
    pool.Schedule([&, i] {
      Rows(p, std::min(i * per, word_rows), std::min((i + 1) * per, word_rows),
           partial.data() + (i - 1) * p.m * p.n);
      pending.fetch_sub(1, std::memory_order_release);
    });
  }
  Rows(p, 0, std::min(per, word_rows), out);
  while (pending.load(std::memory_order_acquire) > 0) {
#ifdef CIRRUS_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  for (int64_t i = 1; i < parts; ++i) {
    const float* part = partial.data() + (i - 1) * p.m * p.n;
    for (int64_t e = 0; e < p.m * p.n; ++e) out[e] += part[e];
  }
  if (p.bits == 8) {  // One scale per column: applied once.
    for (int64_t r = 0; r < p.m; ++r) {
      for (int64_t c = 0; c < p.n; ++c) out[r * p.n + c] *= p.scale[c];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CirrusQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group"));

extern "C" int cirrus_qmatmul_isa() { return ChosenIsa() == Isa::kAvx512 ? 512 : 0; }
