// Weight-only quantized matmul for XLA:CPU, called through jax.ffi (research/compression/kernel.py).
//
//   y[m, n] = sum_k x[m, k] * q[k, n] * scale[k / group, n]                 (cirrus_qmatmul)
//   y[m, n] = sum_g scale[g, n] * sum_{k in g} x[m, k] * q[k, n]
//                 + min[g, n] * sum_{k in g} x[m, k]                         (cirrus_qmatmul_asym)
//
// x f32 [M, K]; y f32 [M, N]; scale f32 [K / group, N] (asym: scale and min f16). q is stored
// k-interleaved as research/compression/quantize.py describes: 32-bit words [K / L, N], each
// holding L consecutive k of one column: L = 4 int8 values (byte j = row j), or L = 8 int4
// nibbles (nibble j at bits 4j: value + 8, or for asym q in [0, 15] itself).
//
// Asym's min term needs only the per-group sums of x (M x K / group, computed once per
// call): it is added at the first word row of each group, so the weight loop is the int4
// one with another level table and float16 scales widened in registers (vcvtph2ps).
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

struct Problem {
  const float* x;
  const uint8_t* q;  // [K / L, N] words.
  const float* scale = nullptr;  // f32 [K / group, N]; symmetric forms.
  const uint16_t* scale_h = nullptr;  // f16 [K / group, N]; asym.
  const uint16_t* min_h = nullptr;  // f16 [K / group, N]; asym.
  const float* xsum = nullptr;  // [M, K / group]: x summed over each group; asym.
  int64_t m, k, n, group, groups;
  int bits;
  int64_t per_word;  // L.
  bool grouped;  // Scales applied per block of rows (int4, grouped int8), else once per column.
  bool asym = false;  // int4 q in [0, 15] with a min per group.
};

// ---- Portable path --------------------------------------------------------------------------

// IEEE half -> float without F16C (the portable path runs on any CPU).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {  // Inf / NaN.
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {  // Normal: rebias 15 -> 127.
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // Zero or subnormal: mantissa * 2^-24.
    const float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -value : value;
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float Weight(const Problem& p, int64_t word_row, int64_t col, int j) {
  const uint8_t* word = p.q + 4 * (word_row * p.n + col);
  if (p.bits == 8) return static_cast<float>(static_cast<int8_t>(word[j]));
  const uint8_t byte = word[j / 2];
  const int nibble = (j & 1) ? (byte >> 4) : (byte & 0xF);
  return static_cast<float>(p.asym ? nibble : nibble - 8);
}

// Word rows [w0, w1) into y (M x N, zeroed by the caller).
void RowsPortable(const Problem& p, int64_t w0, int64_t w1, float* y) {
  // Asym: the current group's float16 scales and mins, widened once per group.
  std::vector<float> group_scale(p.asym ? p.n : 0), group_min(p.asym ? p.n : 0);
  int64_t widened = -1;
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t k0 = w * p.per_word;
    const int64_t g = k0 / p.group;
    const float* s = p.scale ? p.scale + g * p.n : group_scale.data();
    if (p.asym && g != widened) {
      for (int64_t c = 0; c < p.n; ++c) {
        group_scale[c] = HalfToFloat(p.scale_h[g * p.n + c]);
        group_min[c] = HalfToFloat(p.min_h[g * p.n + c]);
      }
      widened = g;
    }
    const bool group_start = p.asym && k0 % p.group == 0;
    for (int64_t row = 0; row < p.m; ++row) {
      const float* x = p.x + row * p.k + k0;
      float* yr = y + row * p.n;
      for (int64_t c = 0; c < p.n; ++c) {
        float acc = 0.0f;
        for (int j = 0; j < p.per_word; ++j) acc += x[j] * Weight(p, w, c, j);
        yr[c] += p.grouped ? acc * s[c] : acc;
      }
      if (group_start) {  // The group's min term, once: min * (sum of x over the group).
        const float xs = p.xsum[row * p.groups + g];
        for (int64_t c = 0; c < p.n; ++c) yr[c] += group_min[c] * xs;
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
// ASYM (int4 only): float16 scales, levels 0..15, and the min term at each group's first row.
template <int BITS, bool GROUPED, bool ASYM>
AVX512 void RowsAvx512(const Problem& p, int64_t w0, int64_t w1, float* __restrict y) {
  constexpr int L = BITS == 8 ? 4 : 8;
  // The 16 int4 levels as floats: nibble u stands for u - 8 (asym: u).
  const __m512 levels =
      ASYM ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
           : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t k0 = w * L;
    const int64_t g = k0 / p.group;
    const uint8_t* __restrict words = p.q + 4 * w * p.n;
    const float* __restrict s = ASYM ? nullptr : p.scale + g * p.n;
    const uint16_t* __restrict sh = ASYM ? p.scale_h + g * p.n : nullptr;
    const uint16_t* __restrict mh = ASYM ? p.min_h + g * p.n : nullptr;
    const bool group_start = ASYM && k0 % p.group == 0;
    for (int64_t r = 0; r < p.m; ++r) {
      // This row's L inputs, broadcast once for the whole word row.
      __m512 xb[L];
      for (int j = 0; j < L; ++j) xb[j] = _mm512_set1_ps(p.x[r * p.k + k0 + j]);
      const __m512 xs = group_start ? _mm512_set1_ps(p.xsum[r * p.groups + g]) : _mm512_setzero_ps();
      float* __restrict yr = y + r * p.n;
      for (int64_t col = 0; col < p.n; col += 16) {
        const __mmask16 mask =
            static_cast<__mmask16>((1u << std::min<int64_t>(16, p.n - col)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi32(mask, words + 4 * col);
        // The stream is contiguous across word rows; hardware prefetch alone kept one core
        // at ~7 GB/s from DRAM on these VMs.
        _mm_prefetch(reinterpret_cast<const char*>(words + 4 * col) + PrefetchBytes(), _MM_HINT_T0);
        if (ASYM) {  // The next group's scales and mins, streams of their own.
          _mm_prefetch(reinterpret_cast<const char*>(sh + p.n + col), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(mh + p.n + col), _MM_HINT_T0);
        } else if (GROUPED) {
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
        if (ASYM) {
          const __m512 scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, sh + col));
          __m512 out = _mm512_fmadd_ps(acc, scale, prev);
          if (group_start) {
            out = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mh + col)), xs, out);
          }
          _mm512_mask_storeu_ps(yr + col, mask, out);
        } else {
          _mm512_mask_storeu_ps(yr + col, mask,
                                GROUPED ? _mm512_fmadd_ps(acc, _mm512_maskz_loadu_ps(mask, s + col), prev)
                                        : _mm512_add_ps(acc, prev));
        }
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
    if (p.asym) return RowsAvx512<4, true, true>(p, w0, w1, y);
    if (p.bits == 4) return RowsAvx512<4, true, false>(p, w0, w1, y);
    return p.grouped ? RowsAvx512<8, true, false>(p, w0, w1, y)
                     : RowsAvx512<8, false, false>(p, w0, w1, y);
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

// The matmul of a checked Problem into out (M x N).
void Run(ffi::ThreadPool& pool, const Problem& p, float* out) {
  const int64_t word_rows = p.k / p.per_word;
  std::fill(out, out + p.m * p.n, 0.0f);
  if (p.m == 0 || p.n == 0 || word_rows == 0) return;
  static const int64_t max_threads = [] {
    const char* forced = std::getenv("CIRRUS_QMATMUL_THREADS");
    return forced ? std::max(1, std::atoi(forced)) : 1 << 20;
  }();
  const int64_t bytes = word_rows * p.n * 4;
  int64_t parts = bytes < ParallelBytes() ? 1 : std::max<int64_t>(1, pool.num_threads());
  parts = std::min({parts, max_threads, word_rows});
  if (parts == 1) {
    Rows(p, 0, word_rows, out);
  } else {
    // Chunks of word rows (research/ffi_parallel.h); each worker sums into its own buffer
    // (the caller's is y), added at the end.
    const int64_t chunks = std::min<int64_t>(word_rows, parts * 4);
    const int64_t per_chunk = (word_rows + chunks - 1) / chunks;
    std::vector<float> partial((parts - 1) * p.m * p.n, 0.0f);
    cirrus::ParallelChunks(pool, parts, chunks, [&p, out, &partial, per_chunk,
                                                  word_rows](int64_t worker, int64_t c) {
      const int64_t w0 = std::min(c * per_chunk, word_rows);
      float* y = worker == 0 ? out : partial.data() + (worker - 1) * p.m * p.n;
      Rows(p, w0, std::min(w0 + per_chunk, word_rows), y);
    });
    for (int64_t i = 1; i < parts; ++i) {
      const float* part = partial.data() + (i - 1) * p.m * p.n;
      for (int64_t e = 0; e < p.m * p.n; ++e) out[e] += part[e];
    }
  }
  if (!p.grouped) {  // One scale per column: applied once.
    for (int64_t r = 0; r < p.m; ++r) {
      for (int64_t c = 0; c < p.n; ++c) out[r * p.n + c] *= p.scale[c];
    }
  }
}

// The shapes both handlers share; sets p.m, k, n, group, groups, bits, per_word.
ffi::Error Shape(Problem& p, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> sd,
                 size_t q_bytes, int64_t bits, int64_t group) {
  if (xd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("qmatmul: x and scale must be 2-D");
  }
  p.m = xd[0];
  p.k = xd[1];
  p.n = sd[1];
  p.group = group;
  p.groups = sd[0];
  p.bits = static_cast<int>(bits);
  p.per_word = 32 / std::max<int64_t>(bits, 1);
  p.grouped = bits == 4 || group < xd[1];
  if ((bits != 8 && bits != 4) || group <= 0 || p.k % group || sd[0] != p.k / group ||
      group % p.per_word) {
    return ffi::Error::InvalidArgument("qmatmul: bad bits / group / scale shape");
  }
  if (static_cast<int64_t>(q_bytes) != p.k / p.per_word * p.n * 4) {
    return ffi::Error::InvalidArgument("qmatmul: q has the wrong size");
  }
  return ffi::Error::Success();
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits,
                       int64_t group) {
  Problem p;
  ffi::Error error = Shape(p, x.dimensions(), scale.dimensions(), q.size_bytes(), bits, group);
  if (error.failure()) return error;
  p.x = x.typed_data();
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.scale = scale.typed_data();
  Run(pool, p, y->typed_data());
  return ffi::Error::Success();
}

ffi::Error QMatmulAsymImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                           ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> min,
                           ffi::ResultBuffer<ffi::F32> y, int64_t group) {
  Problem p;
  ffi::Error error = Shape(p, x.dimensions(), scale.dimensions(), q.size_bytes(), 4, group);
  if (error.failure()) return error;
  const auto md = min.dimensions();
  if (md.size() != 2 || md[0] != p.groups || md[1] != p.n) {
    return ffi::Error::InvalidArgument("qmatmul_asym: min must have scale's shape");
  }
  p.x = x.typed_data();
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.scale_h = scale.typed_data();
  p.min_h = min.typed_data();
  p.asym = true;
  // x summed over each group, once per call: M x K adds against K x N weights.
  std::vector<float> xsum(p.m * p.groups, 0.0f);
  for (int64_t r = 0; r < p.m; ++r) {
    for (int64_t k = 0; k < p.k; ++k) xsum[r * p.groups + k / p.group] += p.x[r * p.k + k];
  }
  p.xsum = xsum.data();
  Run(pool, p, y->typed_data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(CirrusQMatmulAsym, QMatmulAsymImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));

extern "C" int cirrus_qmatmul_isa() { return ChosenIsa() == Isa::kAvx512 ? 512 : 0; }
