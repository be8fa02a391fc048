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
// Loop order: threads claim chunks of word rows (blocks of L rows of the matrix) from a
// counter, so each streams contiguous runs of memory; within a word row, columns go 16 at a
// time and y holds the running sums (a thread other than the caller sums into its own
// buffer, added at the end). The caller never waits for a helper that has not started.
// Grouped scales apply per word row; one scale per column (group = K) at the end.
//
// ISA: AVX-512 (F, BW, VL) where the CPU has it, else a portable loop the compiler
// vectorises for the baseline ISA. Tuning knobs (environment, read once): CIRRUS_QMATMUL_ISA
// =scalar forces the portable path; CIRRUS_QMATMUL_THREADS caps the threads;
// CIRRUS_QMATMUL_PARALLEL_BYTES (16 KB) is the smallest matrix split over threads;
// CIRRUS_QMATMUL_PREFETCH (4096) is the prefetch distance in bytes.

#include <algorithm>
#include <atomic>
#include <memory>
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
  bool grouped;  // Scales applied per block of rows (int4, grouped int8), else once per column.
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
        yr[c] += p.grouped ? acc * s[c] : acc;
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

// GROUPED: a scale per block of rows, applied per word row; else one per column, at the end.
template <int BITS, bool GROUPED>
AVX512 void RowsAvx512(const Problem& p, int64_t w0, int64_t w1, float* __restrict y) {
  constexpr int L = BITS == 8 ? 4 : 8;
  // The 16 int4 levels as floats: nibble u stands for u - 8.
  const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t k0 = w * L;
    const uint8_t* __restrict words = p.q + 4 * w * p.n;
    const float* __restrict s = p.scale + (k0 / p.group) * p.n;
    for (int64_t r = 0; r < p.m; ++r) {
      // This row's L inputs, broadcast once for the whole word row.
      __m512 xb[L];
      for (int j = 0; j < L; ++j) xb[j] = _mm512_set1_ps(p.x[r * p.k + k0 + j]);
      float* __restrict yr = y + r * p.n;
      for (int64_t col = 0; col < p.n; col += 16) {
        const __mmask16 mask =
            static_cast<__mmask16>((1u << std::min<int64_t>(16, p.n - col)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi32(mask, words + 4 * col);
        // The stream is contiguous across word rows; hardware prefetch alone kept one core
        // at ~7 GB/s from DRAM on these VMs.
        _mm_prefetch(reinterpret_cast<const char*>(words + 4 * col) + PrefetchBytes(), _MM_HINT_T0);
        if (GROUPED) {  // The next group's scales, a stream of their own.
          _mm_prefetch(reinterpret_cast<const char*>(s + p.n + col), _MM_HINT_T0);
        }
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < L; ++j) {
          __m512 wj;
          if (BITS == 8) {
            wj = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24));
          } else {  // vpermps reads the low 4 bits of each lane: the nibble picks its value.
            wj = _mm512_permutexvar_ps(j ? _mm512_srli_epi32(v, 4 * j) : v, levels);
          }
          acc = _mm512_fmadd_ps(xb[j], wj, acc);
        }
        const __m512 prev = _mm512_maskz_loadu_ps(mask, yr + col);
        _mm512_mask_storeu_ps(yr + col, mask,
                              GROUPED ? _mm512_fmadd_ps(acc, _mm512_maskz_loadu_ps(mask, s + col), prev)
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

// Word rows [w0, w1) added into y.
void Rows(const Problem& p, int64_t w0, int64_t w1, float* y) {
#ifdef CIRRUS_X86
  if (ChosenIsa() == Isa::kAvx512) {
    if (p.bits == 4) return RowsAvx512<4, true>(p, w0, w1, y);
    return p.grouped ? RowsAvx512<8, true>(p, w0, w1, y) : RowsAvx512<8, false>(p, w0, w1, y);
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
  p.grouped = bits == 4 || group < xd[1];
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
  std::fill(out, out + p.m * p.n, 0.0f);
  if (parts == 1) {
    Rows(p, 0, word_rows, out);
  } else {
    // Chunks of word rows are claimed from a counter by the caller and by the helpers it
    // schedules, each summing into its own buffer (the caller's is y). A helper the OS does
    // not run (a busy machine) claims nothing: the caller does the work instead of waiting
    // for it; the caller waits only for chunks already claimed. Late helpers find nothing
    // left, and the shared state outlives them.
    struct Shared {
      Problem p;
      int64_t chunks, per_chunk, word_rows;
      std::atomic<int64_t> next{0}, done{0};
      std::vector<float> partial;  // (parts - 1) buffers of M x N.
    };
    auto shared = std::make_shared<Shared>();
    shared->p = p;
    shared->chunks = std::min<int64_t>(word_rows, parts * 4);
    shared->per_chunk = (word_rows + shared->chunks - 1) / shared->chunks;
    shared->word_rows = word_rows;
    shared->partial.assign((parts - 1) * p.m * p.n, 0.0f);
    auto work = [](Shared& st, float* y) {
      for (int64_t c; (c = st.next.fetch_add(1, std::memory_order_relaxed)) < st.chunks;) {
        const int64_t w0 = std::min(c * st.per_chunk, st.word_rows);
        Rows(st.p, w0, std::min(w0 + st.per_chunk, st.word_rows), y);
        st.done.fetch_add(1, std::memory_order_release);
      }
    };
    for (int64_t i = 1; i < parts; ++i) {
      pool.Schedule([shared, i, work] {
        work(*shared, shared->partial.data() + (i - 1) * shared->p.m * shared->p.n);
      });
    }
    work(*shared, out);
    for (int spins = 0; shared->done.load(std::memory_order_acquire) < shared->chunks; ++spins) {
      if (spins < 2000) {
#ifdef CIRRUS_X86
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    for (int64_t i = 1; i < parts; ++i) {
      const float* part = shared->partial.data() + (i - 1) * p.m * p.n;
      for (int64_t e = 0; e < p.m * p.n; ++e) out[e] += part[e];
    }
  }
  if (!p.grouped) {  // One scale per column: applied once.
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
