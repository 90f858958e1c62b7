// The CPU kernels' own worker threads (instead of OpenMP's).
//
// Why not at::parallel_for: libgomp gives every thread that opens a parallel region its own team,
// and once a process has more team threads than CPUs (a model loaded on the main thread, then
// served from an engine thread, as every tandem worker does), it stops spinning between regions
// and puts its workers to sleep after each one. A decode step opens ~250 regions; waking a
// sleeping worker for each cost 60 us a region, doubling a batch-1 step on two cores.
//
// Here one pool serves the whole process. Its workers spin on a job counter for a while after each
// job (TANDEM_KERNEL_SPIN_US, default 100: a step's kernels follow each other by microseconds),
// yielding the core to any other runnable thread as they spin, then sleep on a condition variable
// (an idle server burns no CPU). The calling thread takes chunks of its job like the workers. One
// job runs at a time: a second caller (another engine thread, or a kernel called from inside a
// job) runs its job inline on its own thread, with the same results, since every kernel here
// computes each output row the same way whatever the split (batch invariance does not depend on
// the threads).
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace tandem {

class ThreadPool {
 public:
  static ThreadPool& get() {
    static ThreadPool* pool = new ThreadPool();  // never destroyed: workers may outlive static teardown
    return *pool;
  }

  // Threads a job uses, the caller included (tandem.LLM's num_threads); 0 means the CPU count.
  void set_threads(int n) { threads_.store(std::max(0, n)); }
  int threads() const {
    const int n = threads_.load();
    return n > 0 ? n : std::max(1u, std::thread::hardware_concurrency());
  }

  // fn(begin, end) over contiguous chunks of [0, n), none smaller than grain, taken by the
  // threads in turn (about 4 a thread): a thread the OS preempts (a gRPC thread streaming tokens
  // on the same cores) holds up one chunk, not a quarter or half of the job. Exceptions from any
  // chunk reach the caller (the first one).
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    const int64_t pieces = (n + grain - 1) / grain, parts = std::min<int64_t>(threads(), pieces);
    bool expected = false;
    if (parts <= 1 || !busy_.compare_exchange_strong(expected, true)) {
      fn(0, n);
      return;
    }
    start_workers(parts - 1);
    fn_ = &fn;
    n_ = n;
    parts_ = parts;
    chunks_ = std::min<int64_t>(pieces, parts * kChunksPerThread);
    next_.store(0);
    error_ = nullptr;
    // every worker checks in, those without a share too: none can still be reading this job's
    // fields when the next one writes them
    pending_.store(num_workers_.load());
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    run_chunks();
    for (int spins = 1; pending_.load(std::memory_order_acquire) > 0; ++spins) {
      _mm_pause();
      if (spins % kYieldEvery == 0) sched_yield();  // a preempted worker may want this core
    }
    std::exception_ptr error = error_;
    fn_ = nullptr;
    busy_.store(false);
    if (error) std::rethrow_exception(error);
  }

 private:
  ThreadPool() {
    if (const char* spin = std::getenv("TANDEM_KERNEL_SPIN_US")) spin_us_ = std::max(0L, std::atol(spin));
    pthread_atfork(nullptr, nullptr, [] {  // a forked child has none of the parent's threads
      ThreadPool& pool = get();
      pool.num_workers_.store(0);
      pool.busy_.store(false);
      pool.sleepers_.store(0);
      new (&pool.mutex_) std::mutex();  // a parent's worker may have held it at the fork
      new (&pool.wake_) std::condition_variable();
    });
  }

  // Detached threads (a forked child forgets them without joining), started with the generation
  // before the job that needs them, so that they take that job.
  void start_workers(int wanted) {
    while (num_workers_.load() < wanted) {
      const int id = num_workers_.load() + 1;  // shares 1..: share 0 is the caller's
      std::thread([this, id, seen = generation_.load()] { work(id, seen); }).detach();
      num_workers_.fetch_add(1);
    }
  }

  void run_chunks() {
    for (int64_t c = next_.fetch_add(1); c < chunks_; c = next_.fetch_add(1)) {
      try {
        (*fn_)(n_ * c / chunks_, n_ * (c + 1) / chunks_);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void work(int id, uint64_t seen) {
    for (;;) {
      auto spin_start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (++spins % kYieldEvery != 0) continue;
        sched_yield();  // spinning, but any runnable thread (the gRPC ones) takes the core first
        if (std::chrono::steady_clock::now() - spin_start > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
          spin_start = std::chrono::steady_clock::now();
        }
      }
      seen = generation_.load();
      if (id < parts_) run_chunks();
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  static constexpr int64_t kChunksPerThread = 4;
  static constexpr int kYieldEvery = 64;  // pauses between sched_yield calls (a few microseconds)
  int64_t spin_us_ = 100;
  std::atomic<int> threads_{0};
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> num_workers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, parts_ = 0, chunks_ = 0;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

inline void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  ThreadPool::get().parallel_for(n, grain, fn);
}

}  // namespace tandem
