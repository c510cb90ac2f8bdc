// The CPU forward timed on this machine's cores: the fast path at each batch size, and the
// reference at batch 1 in the same run for a ratio. Wall-clock median over repeated runs; the
// machine may be shared, so the table also prints the load average seen before timing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <sched.h>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/cpu/fast_forward.h"
#include "kernels/cpu/reference_forward.h"
#include "kernels/model_weights.h"
#include "tools/bench/bench_inputs.h"
#include "tools/bench/benchmarks.h"

namespace mmdit {
namespace {

struct Timing {
  double median_ms = 0, min_ms = 0;
  double cpu_ms = 0;  // median process CPU time per run: what the run cost the cores
  int runs = 0;
};

double ProcessCpuMs() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// Warm-up, then up to `iters` timed runs, stopping early once `budget_s` is spent (at least 3).
template <typename Fn>
absl::StatusOr<Timing> TimeIt(Fn&& fn, int warmup, int iters, double budget_s) {
  // Warm-up stops after 2 s once one run is done: at batch 512 one run takes seconds.
  const auto warm_start = std::chrono::steady_clock::now();
  for (int i = 0; i < warmup; ++i) {
    if (absl::Status st = fn(); !st.ok()) return st;
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - warm_start).count() > 2) {
      break;
    }
  }
  std::vector<double> ms, cpu;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < std::max(iters, 3); ++i) {
    const double c0 = ProcessCpuMs();
    const auto t0 = std::chrono::steady_clock::now();
    if (absl::Status st = fn(); !st.ok()) return st;
    const auto t1 = std::chrono::steady_clock::now();
    cpu.push_back(ProcessCpuMs() - c0);
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    if (i >= 2 && std::chrono::duration<double>(t1 - start).count() > budget_s) break;
  }
  std::sort(ms.begin(), ms.end());
  std::sort(cpu.begin(), cpu.end());
  return Timing{ms[ms.size() / 2], ms.front(), cpu[cpu.size() / 2], static_cast<int>(ms.size())};
}

}  // namespace

absl::Status RunCpuBenchmark(const BenchOptions& options) {
  const MmditConfig config = TargetConfig();
  const ModelWeights weights = ModelWeights::Deterministic(config, 1);
  std::vector<int> batches = options.batch_sizes;
  if (batches.empty()) batches = {1, 8, 32};
  cpu_set_t set;
  const int cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  const int threads = options.cpu_threads > 0 ? options.cpu_threads : cores;
  const double flops = FlopsPerSample(config, options.seq_len, options.context_len);
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);
  std::printf("CPU forward, fp32, L=%d C=%d D=%d H=%d F=%d N=%d, %d threads, %.3f GFLOP/sample\n",
              options.seq_len, options.context_len, config.dim, config.num_heads,
              config.dim_feedforward, config.num_layers, threads, flops * 1e-9);
  std::printf("load average before timing: %.2f %.2f %.2f; CPU: avx2 %d, avx512f %d\n", load[0],
              load[1], load[2], __builtin_cpu_supports("avx2"), __builtin_cpu_supports("avx512f"));
  std::printf("%-10s %6s %10s %10s %10s %10s %10s %5s\n", "path", "batch", "ms/batch",
              "min ms", "samples/s", "GFLOP/s", "cpu ms", "runs");

  double fast_b1_ms = 0;
  for (int b : batches) {
    CpuForwardOptions fo;
    fo.threads = threads;
    fo.max_batch_size = b;
    absl::StatusOr<std::unique_ptr<CpuFastForward>> fast = CpuFastForward::Create(weights, fo);
    if (!fast.ok()) return fast.status();
    BenchInputs in = MakeBenchInputs(config, b, options.seq_len,
                                     options.context_len, /*seed=*/1234);
    absl::StatusOr<Timing> t = TimeIt([&] { return (*fast)->Run(in.samples); },
                                      std::max(1, std::min(options.warmup_iters, 3)),
                                      options.timed_iters, 10.0);
    if (!t.ok()) return t.status();
    if (b == 1) fast_b1_ms = t->median_ms;
    std::printf("%-10s %6d %10.2f %10.2f %10.1f %10.1f %10.1f %5d\n", "fast", b, t->median_ms,
                t->min_ms, b * 1e3 / t->median_ms, b * flops / (t->median_ms * 1e6), t->cpu_ms,
                t->runs);
  }

  BenchInputs in = MakeBenchInputs(config, 1, options.seq_len,
                                   options.context_len, /*seed=*/1234);
  absl::StatusOr<Timing> ref =
      TimeIt([&] { return ReferenceForward(weights, in.samples); }, 0, 3, 5.0);
  if (!ref.ok()) return ref.status();
  std::printf("%-10s %6d %10.2f %10.2f %10.1f %10.1f %10.1f %5d\n", "reference", 1,
              ref->median_ms, ref->min_ms, 1e3 / ref->median_ms, flops / (ref->median_ms * 1e6),
              ref->cpu_ms, ref->runs);
  if (fast_b1_ms > 0) {
    std::printf("fast / reference at batch 1: %.1fx faster\n", ref->median_ms / fast_b1_ms);
  }
  return absl::OkStatus();
}

}  // namespace mmdit
