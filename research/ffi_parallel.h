// The work split of Cirrus's jax.ffi CPU kernels (research/compression/qmatmul.cc,
// research/serving/core/decode_attention.cc): `chunks` items are claimed from a counter by
// the caller and by up to `parts - 1` helpers scheduled on XLA's thread pool.
//
// The caller never waits for a helper that has not started (on a busy machine the OS may not
// run it for a while): it claims whatever is left itself, then waits only for the items
// already claimed. A helper that starts late finds nothing left and never calls `work`; the
// shared state it touches lives as long as the last helper.

#ifndef CIRRUS_FFI_PARALLEL_H_
#define CIRRUS_FFI_PARALLEL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace cirrus {

// work(worker, item) for every item in [0, chunks): worker 0 is the caller, 1.. the helpers.
template <typename Work>
void ParallelChunks(xla::ffi::ThreadPool& pool, int64_t parts, int64_t chunks, Work work) {
  struct Shared {
    explicit Shared(Work w, int64_t n) : work(std::move(w)), chunks(n) {}
    Work work;
    int64_t chunks;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>(std::move(work), chunks);
  auto run = [](Shared& st, int64_t worker) {
    for (int64_t c; (c = st.next.fetch_add(1, std::memory_order_relaxed)) < st.chunks;) {
      st.work(worker, c);
      st.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([shared, i, run] { run(*shared, i); });
  run(*shared, 0);
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins < 2000) {
#if defined(__x86_64__)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace cirrus

#endif  // CIRRUS_FFI_PARALLEL_H_
