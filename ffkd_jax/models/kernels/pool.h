// Work items shared by the calling thread and tasks on XLA's intra-op thread pool, for the FFI
// kernels of this directory. XLA's CPU runtime runs one custom call at a time, so a kernel that
// used one thread would leave the other cores idle.
//
// Every participant takes item numbers from one atomic counter until none is left, then adds
// how many it finished to `done` (acq_rel); `share` returns once `done` reaches the total
// (acquire), so every item's writes are visible to the caller. A task that starts late finds no
// item left and touches nothing but the shared state, which it keeps alive (a shared_ptr).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffkd_pool {

struct Items {
  explicit Items(int64_t total) : total(total) {}
  const int64_t total;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Calls f(item) for items taken from the counter until none is left.
  template <typename F>
  void take(F&& f) {
    int64_t finished = 0;
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
      f(item);
      ++finished;
    }
    done.fetch_add(finished, std::memory_order_acq_rel);
  }
};

// Runs participant(state.get()) on the calling thread and on up to (threads - 1) pool tasks,
// no more tasks than items; returns when every item of state->items is done.
template <typename State, typename Participant>
void share(xla::ffi::ThreadPool& pool, const std::shared_ptr<State>& state,
           Participant participant) {
  const int64_t total = state->items.total;
  const int64_t helpers = std::min(pool.num_threads(), total) - 1;
  for (int64_t i = 0; i < helpers; ++i)
    pool.Schedule([state, participant] { participant(state.get()); });
  participant(state.get());
  while (state->items.done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace ffkd_pool
