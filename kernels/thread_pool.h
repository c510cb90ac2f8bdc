// A fixed set of threads that run one parallel loop at a time: the CPU fast forward's loops and
// the CUDA forward's host copies. The calling thread takes part, so a pool of N threads starts
// N - 1 workers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"

namespace mmdit {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(task, thread) for every task in [0, num_tasks), tasks taken in order by whichever
  // thread is free (`thread` in [0, num_threads) names the caller's scratch); returns when all
  // are done. Not reentrant: one loop at a time. FunctionRef, not std::function: a forward
  // runs 2N + 2 loops and none of them may allocate.
  void ParallelFor(int num_tasks, absl::FunctionRef<void(int task, int thread)> fn);

 private:
  void WorkerLoop(int thread);
  void RunTasks(int thread);

  const int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  std::atomic<uint64_t> generation_{0};  // written under mu_, spun on without it
  std::atomic<int> running_{0};          // workers still in the current loop
  bool stop_ = false;                    // guarded by mu_
  const absl::FunctionRef<void(int, int)>* fn_ = nullptr;  // published by generation_
  int num_tasks_ = 0;                                      // published by generation_
  std::atomic<int> next_task_{0};
};

}  // namespace mmdit
