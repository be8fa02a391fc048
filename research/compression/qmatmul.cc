// Weight-only quantized matmul for XLA:CPU through jax.ffi (research/compression/kernel.py).
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
// Loop order. Threads split the columns (no partial sums to add up). A thread walks its
// columns in panels; a panel, word rows in chunks (never across a scale group); a chunk,
// blocks of columns; a block, up to 4 rows of x at a time. A block keeps its sums in
// registers over the chunk, so y is read and written once per chunk, and each weight is
// widened once per 4 rows of x. Each word row of a chunk is one stream across the panel;
// software prefetch runs 1 KB ahead in each (the hardware prefetcher alone kept a core at a
// third of DRAM bandwidth on these VMs), wrapping to the next chunk at the panel's end.
//
// ISA, chosen at run time (the .so is built without -march): AVX-512 (F, BW, VL), else
// AVX2 + FMA, else a portable loop; all agree to float rounding. CIRRUS_QMATMUL_ISA=scalar|
// avx2|avx512 forces one; CIRRUS_QMATMUL_THREADS caps the threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#define CIRRUS_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;  // [M, K]
  const int32_t* q;  // [K / L, N] words.
  const float* scale;  // [K / group, N]
  float* y;  // [M, N]
  int64_t m, k, n, group;
  int bits;
};

// One block's work: y[r0 : r0 + R, c : c + cols] += x[rows, k] @ w[k, cols] over the k of
// word rows [w0, w1), all in one scale group (s: its scale row, or null: applied later).
// cols <= the ISA's block width. ahead / s_ahead: offsets (in words / floats) to prefetch.
struct Block {
  int64_t w0, w1, r0, c, cols;
  const float* s;
  int64_t ahead, s_ahead;
};
using BlockFn = void (*)(const Problem& p, const Block& b);

constexpr int kMaxRows = 4;  // Rows of x per block: 4 x 4 zmm sums fit the registers.
constexpr int64_t kChunk = 16;  // Word rows per chunk (fewer passes over y; 8 was slower).
constexpr int64_t kPanel = 1024;  // Columns per panel: y's panel stays in L1 / L2.
constexpr int64_t kAhead = 256;  // Words (1 KB) prefetched ahead in each stream.
// Work (weights x blocks of 4 rows) below which the calling thread runs alone: handing half
// of a 576 x 192 matrix to a pool thread costs more than it saves; from 576 x 576 on, two
// threads win on a quiet machine (bench/qmatmul.py). A busy one loses little: the caller
// takes the parts no helper has started.
constexpr int64_t kParallelWork = 1 << 18;

// ---- Portable path --------------------------------------------------------------------------

// Plain loops over columns that compilers vectorise for the baseline ISA (SSE2, NEON).
template <int BITS, int R>
void BlockPortable(const Problem& p, const Block& b) {
  constexpr int L = 32 / BITS;
  constexpr int64_t kWidth = 64;
  float acc[R][kWidth] = {};
  float wj[kWidth];
  for (int64_t w = b.w0; w < b.w1; ++w) {
    const int32_t* words = p.q + w * p.n + b.c;
    const float* x = p.x + b.r0 * p.k + w * L;
    for (int j = 0; j < L; ++j) {
      for (int64_t c = 0; c < b.cols; ++c) {
        const uint32_t word = static_cast<uint32_t>(words[c]);
        wj[c] = BITS == 8 ? static_cast<float>(static_cast<int8_t>(word >> (8 * j)))
                          : static_cast<float>(static_cast<int>((word >> (4 * j)) & 0xF) - 8);
      }
      for (int r = 0; r < R; ++r) {
        const float xj = x[r * p.k + j];
        for (int64_t c = 0; c < b.cols; ++c) acc[r][c] += xj * wj[c];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* out = p.y + (b.r0 + r) * p.n + b.c;
    for (int64_t c = 0; c < b.cols; ++c) out[c] += b.s ? acc[r][c] * b.s[b.c + c] : acc[r][c];
  }
}

#ifdef CIRRUS_X86

// ---- AVX-512: blocks of 64 columns (4 zmm) ---------------------------------------------------

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

template <int BITS, int R>
AVX512 void BlockAvx512(const Problem& p, const Block& b) {
  constexpr int L = 32 / BITS, V = 4;
  // S sets of sums, alternating over k: at least 8 independent FMA chains (2 FMA units x
  // 4 cycles), else one row of x is bound by the chain's latency, not by memory.
  constexpr int S = std::max(1, 8 / (R * V));
  // The 16 int4 levels as floats: vpermps reads a lane's low 4 bits, so nibble u picks u - 8.
  const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __mmask16 mask[V];
  for (int v = 0; v < V; ++v) {
    mask[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(b.cols - 16 * v, 0, 16)) - 1);
  }
  __m512 acc[S][R][V];
  for (int i = 0; i < S; ++i) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) acc[i][r][v] = _mm512_setzero_ps();
    }
  }
  for (int64_t w = b.w0; w < b.w1; ++w) {
    const int32_t* words = p.q + w * p.n + b.c;
    const float* x = p.x + b.r0 * p.k + w * L;
    __m512i packed[V];
    for (int v = 0; v < V; ++v) {
      packed[v] = _mm512_maskz_loadu_epi32(mask[v], words + 16 * v);
      if (b.r0 == 0) _mm_prefetch(words + b.ahead + 16 * v, _MM_HINT_T0);
    }
    for (int j = 0; j < L; ++j) {
      __m512 wj[V];
      for (int v = 0; v < V; ++v) {
        wj[v] = BITS == 8 ? _mm512_cvtepi32_ps(_mm512_srai_epi32(
                                _mm512_slli_epi32(packed[v], 24 - 8 * j), 24))
                          : _mm512_permutexvar_ps(_mm512_srli_epi32(packed[v], 4 * j), levels);
      }
      for (int r = 0; r < R; ++r) {
        const __m512 xj = _mm512_set1_ps(x[r * p.k + j]);
        for (int v = 0; v < V; ++v) acc[j % S][r][v] = _mm512_fmadd_ps(xj, wj[v], acc[j % S][r][v]);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    __m512 sv = _mm512_set1_ps(1.0f);
    if (b.s) {
      sv = _mm512_maskz_loadu_ps(mask[v], b.s + b.c + 16 * v);
      if (b.r0 == 0) _mm_prefetch(b.s + b.c + b.s_ahead + 16 * v, _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      for (int i = 1; i < S; ++i) acc[0][r][v] = _mm512_add_ps(acc[0][r][v], acc[i][r][v]);
      float* out = p.y + (b.r0 + r) * p.n + b.c + 16 * v;
      const __m512 sum = _mm512_fmadd_ps(acc[0][r][v], sv, _mm512_maskz_loadu_ps(mask[v], out));
      _mm512_mask_storeu_ps(out, mask[v], sum);
    }
  }
}

// ---- AVX2 + FMA: blocks of 16 columns (2 ymm; 16 registers in all) --------------------------

#define AVX2 __attribute__((target("avx2,fma")))

template <int BITS, int R>
AVX2 void BlockAvx2(const Problem& p, const Block& b) {
  constexpr int L = 32 / BITS, V = 2;
  constexpr int S = std::max(1, 8 / (R * V));  // Independent FMA chains, as in BlockAvx512.
  const bool edge = b.cols < 8 * V;  // The ragged last block: masked loads, scalar stores.
  __m256i mask[V];
  for (int v = 0; v < V; ++v) {
    const int lanes = static_cast<int>(std::clamp<int64_t>(b.cols - 8 * v, 0, 8));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    mask[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), lane);
  }
  const __m256i nibble = _mm256_set1_epi32(0xF);
  __m256 acc[S][R][V];
  float x_sum[R] = {};  // int4 nibbles hold value + 8: 8 * sum of x comes off at the end.
  for (int i = 0; i < S; ++i) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) acc[i][r][v] = _mm256_setzero_ps();
    }
  }
  for (int64_t w = b.w0; w < b.w1; ++w) {
    const int32_t* words = p.q + w * p.n + b.c;
    const float* x = p.x + b.r0 * p.k + w * L;
    __m256i packed[V];
    for (int v = 0; v < V; ++v) {
      packed[v] = edge ? _mm256_maskload_epi32(words + 8 * v, mask[v])
                       : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + 8 * v));
    }
    if (b.r0 == 0) _mm_prefetch(words + b.ahead, _MM_HINT_T0);
    for (int j = 0; j < L; ++j) {
      __m256 wj[V];
      for (int v = 0; v < V; ++v) {
        wj[v] = _mm256_cvtepi32_ps(
            BITS == 8 ? _mm256_srai_epi32(_mm256_slli_epi32(packed[v], 24 - 8 * j), 24)
                      : _mm256_and_si256(_mm256_srli_epi32(packed[v], 4 * j), nibble));
      }
      for (int r = 0; r < R; ++r) {
        if (BITS == 4) x_sum[r] += x[r * p.k + j];
        const __m256 xj = _mm256_broadcast_ss(x + r * p.k + j);
        for (int v = 0; v < V; ++v) acc[j % S][r][v] = _mm256_fmadd_ps(xj, wj[v], acc[j % S][r][v]);
      }
    }
  }
  if (b.s && b.r0 == 0) _mm_prefetch(b.s + b.c + b.s_ahead, _MM_HINT_T0);
  for (int v = 0; v < V; ++v) {
    __m256 sv = _mm256_set1_ps(1.0f);
    if (b.s) {
      const float* s = b.s + b.c + 8 * v;
      sv = edge ? _mm256_maskload_ps(s, mask[v]) : _mm256_loadu_ps(s);
    }
    for (int r = 0; r < R; ++r) {
      for (int i = 1; i < S; ++i) acc[0][r][v] = _mm256_add_ps(acc[0][r][v], acc[i][r][v]);
      const __m256 sum = _mm256_mul_ps(
          BITS == 4 ? _mm256_sub_ps(acc[0][r][v], _mm256_set1_ps(8.0f * x_sum[r])) : acc[0][r][v],
          sv);
      float* out = p.y + (b.r0 + r) * p.n + b.c + 8 * v;
      if (!edge) {
        _mm256_storeu_ps(out, _mm256_add_ps(sum, _mm256_loadu_ps(out)));
        continue;
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, sum);
      for (int64_t i = 0; i < std::min<int64_t>(8, b.cols - 8 * v); ++i) out[i] += lanes[i];
    }
  }
}

#endif  // CIRRUS_X86

// ---- Dispatch -------------------------------------------------------------------------------

enum Isa { kScalar = 0, kAvx2 = 2, kAvx512 = 512 };

struct Kernels {
  BlockFn block[2][kMaxRows];  // [bits == 8][rows - 1]
  int64_t width;  // Columns of a block.
};

constexpr Kernels kPortable = {{{BlockPortable<4, 1>, BlockPortable<4, 2>, BlockPortable<4, 3>,
                                 BlockPortable<4, 4>},
                                {BlockPortable<8, 1>, BlockPortable<8, 2>, BlockPortable<8, 3>,
                                 BlockPortable<8, 4>}},
                               64};
#ifdef CIRRUS_X86
constexpr Kernels kAvx512Kernels = {
    {{BlockAvx512<4, 1>, BlockAvx512<4, 2>, BlockAvx512<4, 3>, BlockAvx512<4, 4>},
     {BlockAvx512<8, 1>, BlockAvx512<8, 2>, BlockAvx512<8, 3>, BlockAvx512<8, 4>}},
    64};
constexpr Kernels kAvx2Kernels = {
    {{BlockAvx2<4, 1>, BlockAvx2<4, 2>, BlockAvx2<4, 3>, BlockAvx2<4, 4>},
     {BlockAvx2<8, 1>, BlockAvx2<8, 2>, BlockAvx2<8, 3>, BlockAvx2<8, 4>}},
    16};
#endif

bool Supported(int isa) {
#ifdef CIRRUS_X86
  __builtin_cpu_init();
  if (isa == kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kScalar;
}

std::atomic<int>& ChosenIsa() {
  static std::atomic<int> isa([] {
    const char* forced = std::getenv("CIRRUS_QMATMUL_ISA");
    const std::pair<const char*, int> names[] = {
        {"scalar", kScalar}, {"avx2", kAvx2}, {"avx512", kAvx512}};
    for (const auto& [name, number] : names) {
      if (forced && std::strcmp(forced, name) == 0 && Supported(number)) return number;
    }
    for (int best : {kAvx512, kAvx2}) {
      if (Supported(best)) return best;
    }
    return int{kScalar};
  }());
  return isa;
}

const Kernels& KernelsFor(int isa) {
#ifdef CIRRUS_X86
  if (isa == kAvx512) return kAvx512Kernels;
  if (isa == kAvx2) return kAvx2Kernels;
#endif
  return kPortable;
}

// Columns [c0, c1) of y, all rows.
void Columns(const Problem& p, const Kernels& kernels, int64_t c0, int64_t c1) {
  const int per_word = 32 / p.bits;
  const int64_t word_rows = p.k / per_word, group_words = p.group / per_word;
  const bool grouped = p.group < p.k;
  for (int64_t r = 0; r < p.m; ++r) std::fill(p.y + r * p.n + c0, p.y + r * p.n + c1, 0.0f);
  for (int64_t panel = c0; panel < c1; panel += kPanel) {
    const int64_t panel_end = std::min(c1, panel + kPanel);
    for (int64_t w0 = 0; w0 < word_rows;) {
      // A chunk ends at kChunk word rows or at its scale group's end.
      const int64_t w1 = std::min({word_rows, w0 + kChunk, (w0 / group_words + 1) * group_words});
      const float* s = grouped ? p.scale + (w0 / group_words) * p.n : nullptr;
      for (int64_t c = panel; c < panel_end; c += kernels.width) {
        const int64_t cols = std::min(kernels.width, panel_end - c);
        // Prefetch kAhead further along this chunk's rows, or past the panel's end, as far
        // into the next chunk's rows (and the next group's scales).
        const int64_t wrap = c + kAhead < panel_end ? 0 : panel - panel_end;
        Block b{w0, w1, 0, c, cols, s, kAhead + wrap + (wrap ? (w1 - w0) * p.n : 0),
                kAhead + wrap + (wrap ? p.n : 0)};
        for (; b.r0 < p.m; b.r0 += kMaxRows) {
          kernels.block[p.bits == 8][std::min<int64_t>(kMaxRows, p.m - b.r0) - 1](p, b);
        }
      }
      w0 = w1;
    }
  }
  if (!grouped) {  // One scale per column: applied once.
    for (int64_t r = 0; r < p.m; ++r) {
      for (int64_t c = c0; c < c1; ++c) p.y[r * p.n + c] *= p.scale[c];
    }
  }
}

// The parts a call is split into; each runs Columns on a contiguous range.
struct Split {
  Problem p;
  const Kernels* kernels;
  int64_t parts, per_part;
  std::atomic<int64_t> next{0}, done{0};

  // Runs parts until none is left (any thread; a late one finds none).
  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < parts;) {
      Columns(p, *kernels, std::min(p.n, i * per_part), std::min(p.n, (i + 1) * per_part));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

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
  const int64_t per_word = bits == 8 ? 4 : 8;
  if ((bits != 8 && bits != 4) || group <= 0 || p.k % group || sd[0] != p.k / group ||
      group % per_word) {
    return ffi::Error::InvalidArgument("qmatmul: bad bits / group / scale shape");
  }
  if (static_cast<int64_t>(q.size_bytes()) != p.k / per_word * p.n * 4) {
    return ffi::Error::InvalidArgument("qmatmul: q has the wrong size");
  }
  p.x = x.typed_data();
  p.q = static_cast<const int32_t*>(q.untyped_data());
  p.scale = scale.typed_data();
  p.y = y->typed_data();
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  const Kernels& kernels = KernelsFor(ChosenIsa().load(std::memory_order_relaxed));

  static const int64_t max_threads = [] {
    const char* forced = std::getenv("CIRRUS_QMATMUL_THREADS");
    return forced ? std::max(1, std::atoi(forced)) : 1 << 20;
  }();
  const int64_t work = p.k * p.n * ((p.m + kMaxRows - 1) / kMaxRows);
  const int64_t blocks = (p.n + kernels.width - 1) / kernels.width;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = work < kParallelWork ? 1 : std::min({threads, max_threads, blocks});
  if (parts == 1) {
    Columns(p, kernels, 0, p.n);
    return ffi::Error::Success();
  }
  // Shared with the helpers, which may start after this call has returned (then find no part
  // left). The caller never waits for a part nobody has taken, so a busy pool cannot stall it.
  auto split = std::make_shared<Split>();
  split->p = p;
  split->kernels = &kernels;
  split->parts = parts;
  split->per_part = (blocks + parts - 1) / parts * kernels.width;
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([split] { split->Work(); });
  split->Work();
  while (split->done.load(std::memory_order_acquire) < parts) {
#ifdef CIRRUS_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
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

// The path in use: 512, 2 or 0 (scalar).
extern "C" int cirrus_qmatmul_isa() { return ChosenIsa().load(); }

// Switches the path for later calls (tests): 512, 2 or 0. Returns the path now in use (the
// old one when this CPU lacks the one asked for).
extern "C" int cirrus_qmatmul_set_isa(int isa) {
  if (Supported(isa)) ChosenIsa().store(isa);
  return ChosenIsa().load();
}
