// Decode attention for XLA:CPU, called through jax.ffi (research/serving/core/attention_kernel.py).
//
// One query token per row against one segment of a float32 KV cache, each row reading only
// its own filled keys:
//
//   logits[b, k, g, s] = q[b, k, g, :] . keys[b, k, s, :]            for s < lengths[b]
//   max[b, k, g]   = max_s logits                 (-3e38 when lengths[b] = 0)
//   sum[b, k, g]   = sum_s exp(logits - max)
//   acc[b, k, g, :] = sum_s exp(logits - max) * values[b, k, s, :]
//
// q f32 [B, K, G, H] (already scaled by 1 / sqrt(H)); keys, values f32 [C, K, S, H] with
// C >= B (rows b < B are read); lengths s32 [B], clipped to [0, S]. The caller merges the
// (max, sum, acc) of several segments and of the token's own key (online softmax, as in
// FlashAttention), so this kernel holds no mask and no segment logic.
//
// Why a kernel: XLA:CPU runs this batched [G, H] x [H, S] product as one small dot per
// (row, kv head), at 2-3 GB/s; at 16 rows it was a third of a SmolLM2 decode step
// (bench/RESULTS.md). Here each (row, kv head) streams its keys and values once, up to its
// own length, not the bucket's.
//
// Threads: (row, kv head) pairs are claimed from a counter by the caller and the pool's
// helpers (research/ffi_parallel.h).
// ISA: AVX-512 where the CPU has it, else a portable loop.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define CIRRUS_X86 1
#endif

#include "ffi_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kEmpty = -3.0e38f;  // The max of a row with no keys: exp(kEmpty - m) = 0.

struct Problem {
  const float* q;
  const float* keys;
  const float* values;
  const int32_t* lengths;
  float *max, *sum, *acc;
  int64_t b, c, k, g, s, h;
};

// One (row, kv head): logits into `scratch` (G x S floats), then softmax statistics and acc.
void PairPortable(const Problem& p, int64_t pair, float* scratch) {
  const int64_t row = pair / p.k, head = pair % p.k;
  const int64_t n = std::clamp<int64_t>(p.lengths[row], 0, p.s);
  const float* keys = p.keys + (row * p.k + head) * p.s * p.h;
  const float* values = p.values + (row * p.k + head) * p.s * p.h;
  for (int64_t g = 0; g < p.g; ++g) {
    const int64_t out = (row * p.k + head) * p.g + g;
    const float* q = p.q + out * p.h;
    float* logits = scratch + g * p.s;
    float m = kEmpty;
    for (int64_t s = 0; s < n; ++s) {
      float dot = 0.0f;
      for (int64_t i = 0; i < p.h; ++i) dot += q[i] * keys[s * p.h + i];
      logits[s] = dot;
      m = std::max(m, dot);
    }
    float total = 0.0f;
    float* acc = p.acc + out * p.h;
    std::fill(acc, acc + p.h, 0.0f);
    for (int64_t s = 0; s < n; ++s) {
      const float e = std::exp(logits[s] - m);
      total += e;
      for (int64_t i = 0; i < p.h; ++i) acc[i] += e * values[s * p.h + i];
    }
    p.max[out] = m;
    p.sum[out] = total;
  }
}

#ifdef CIRRUS_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// exp(x) for x <= 0 (x - max), float32: 2^(x log2 e) split into an integer power and a
// degree-6 polynomial on [-0.5, 0.5] (relative error ~2e-7); far below -87 it is 0.
AVX512 inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 poly = _mm512_set1_ps(1.0f / 720.0f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f / 120.0f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f / 24.0f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f / 6.0f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(poly, n);
}

// H up to 256 in 16-lane chunks (masked tail); G queries share each key and value read.
AVX512 void PairAvx512(const Problem& p, int64_t pair, float* scratch) {
  const int64_t row = pair / p.k, head = pair % p.k;
  const int64_t n = std::clamp<int64_t>(p.lengths[row], 0, p.s);
  const float* keys = p.keys + (row * p.k + head) * p.s * p.h;
  const float* values = p.values + (row * p.k + head) * p.s * p.h;
  const int64_t chunks = (p.h + 15) / 16;
  const __mmask16 tail =
      static_cast<__mmask16>((1u << (p.h - 16 * (chunks - 1))) - 1);
  auto mask = [&](int64_t c) { return c == chunks - 1 ? tail : static_cast<__mmask16>(0xFFFF); };
  const int64_t first = (row * p.k + head) * p.g;
  // Logits: one pass over the keys, every query at once.
  for (int64_t s = 0; s < n; ++s) {
    const float* key = keys + s * p.h;
    _mm_prefetch(reinterpret_cast<const char*>(key + 4 * p.h), _MM_HINT_T0);
    for (int64_t g = 0; g < p.g; ++g) {
      const float* q = p.q + (first + g) * p.h;
      __m512 dot = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask(c), q + 16 * c),
                              _mm512_maskz_loadu_ps(mask(c), key + 16 * c), dot);
      }
      scratch[g * p.s + s] = _mm512_reduce_add_ps(dot);
    }
  }
  // Softmax statistics per query, 16 logits at a time; the logits become weights.
  for (int64_t g = 0; g < p.g; ++g) {
    float* logits = scratch + g * p.s;
    __m512 mv = _mm512_set1_ps(kEmpty);
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(logits + s));
    float m = _mm512_reduce_max_ps(mv);
    for (; s < n; ++s) m = std::max(m, logits[s]);
    __m512 total = _mm512_setzero_ps();
    const __m512 mb = _mm512_set1_ps(m);
    for (s = 0; s < n; s += 16) {
      const __mmask16 live = static_cast<__mmask16>(n - s >= 16 ? 0xFFFF : (1u << (n - s)) - 1);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, logits + s), mb));
      _mm512_mask_storeu_ps(logits + s, live, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
    }
    p.max[first + g] = m;
    p.sum[first + g] = _mm512_reduce_add_ps(total);
  }
  // acc[g] = sum_s weight[g, s] * values[s]: one pass over the values, accumulators in
  // registers for up to 4 queries x 4 chunks (H <= 64) at a time.
  for (int64_t g0 = 0; g0 < p.g; g0 += 4) {
    const int64_t gs = std::min<int64_t>(4, p.g - g0);
    for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
      const int64_t cs = std::min<int64_t>(4, chunks - c0);
      __m512 acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
      for (int64_t s = 0; s < n; ++s) {
        const float* value = values + s * p.h;
        _mm_prefetch(reinterpret_cast<const char*>(value + 4 * p.h), _MM_HINT_T0);
        for (int64_t j = 0; j < cs; ++j) {
          const __m512 v = _mm512_maskz_loadu_ps(mask(c0 + j), value + 16 * (c0 + j));
          for (int64_t i = 0; i < gs; ++i) {
            acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(scratch[(g0 + i) * p.s + s]), v, acc[i][j]);
          }
        }
      }
      for (int64_t i = 0; i < gs; ++i) {
        float* out = p.acc + (first + g0 + i) * p.h;
        for (int64_t j = 0; j < cs; ++j) {
          _mm512_mask_storeu_ps(out + 16 * (c0 + j), mask(c0 + j), acc[i][j]);
        }
      }
    }
  }
}

bool HasAvx512() {
  static const bool has = [] {
    const char* forced = std::getenv("CIRRUS_ATTENTION_ISA");
    if (forced && std::string_view(forced) == "scalar") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
}
#endif  // CIRRUS_X86

void Pair(const Problem& p, int64_t pair, float* scratch) {
#ifdef CIRRUS_X86
  if (HasAvx512() && p.h <= 256) return PairAvx512(p, pair, scratch);
#endif
  PairPortable(p, pair, scratch);
}

// Below this many key and value floats in all, one thread: waking another costs more.
constexpr int64_t kParallelFloats = 64 * 1024;

void Run(ffi::ThreadPool& pool, const Problem& p) {
  const int64_t pairs = p.b * p.k;
  if (pairs == 0) return;
  int64_t floats = 0;
  for (int64_t row = 0; row < p.b; ++row) {
    floats += 2 * std::clamp<int64_t>(p.lengths[row], 0, p.s) * p.k * p.h;
  }
  int64_t parts = floats < kParallelFloats ? 1 : std::max<int64_t>(1, pool.num_threads());
  parts = std::min(parts, pairs);
  // One scratch buffer (G x S logits) per worker, made when it claims its first pair.
  std::vector<std::vector<float>> scratch(parts);
  cirrus::ParallelChunks(pool, parts, pairs, [&p, &scratch](int64_t worker, int64_t pair) {
    std::vector<float>& mine = scratch[worker];
    if (mine.empty()) mine.resize(p.g * p.s);
    Pair(p, pair, mine.data());
  });
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                               ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> max,
                               ffi::ResultBuffer<ffi::F32> sum, ffi::ResultBuffer<ffi::F32> acc) {
  const auto qd = q.dimensions(), kd = keys.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || values.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("decode_attention: q, keys, values must be 4-D");
  }
  Problem p;
  p.b = qd[0];
  p.k = qd[1];
  p.g = qd[2];
  p.h = qd[3];
  p.c = kd[0];
  p.s = kd[2];
  const auto vd = values.dimensions();
  if (kd[1] != p.k || kd[3] != p.h || p.c < p.b || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || vd[3] != kd[3] || lengths.element_count() != static_cast<size_t>(p.b)) {
    return ffi::Error::InvalidArgument("decode_attention: inconsistent shapes");
  }
  p.q = q.typed_data();
  p.keys = keys.typed_data();
  p.values = values.typed_data();
  p.lengths = lengths.typed_data();
  p.max = max->typed_data();
  p.sum = sum->typed_data();
  p.acc = acc->typed_data();
  Run(pool, p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CirrusDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int cirrus_attention_isa() {
#ifdef CIRRUS_X86
  return HasAvx512() ? 512 : 0;
#else
  return 0;
#endif
}
