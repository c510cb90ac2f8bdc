// The CUDA forward timed on one GPU: for each precision and batch size, the forward launched on
// its stream and as a CUDA-graph replay, run by run in turn, each timed with CUDA events after
// warm-up (median of --timed_iters runs each), then the serving path (CudaForward::Run with its
// copies and cached graphs, host clock: run_ms), then a per-kernel breakdown from events recorded
// between launches.
// Inputs are staged on the device once; a run reads them and writes separate buffers, so every
// run computes the same thing. FLOPs are MODEL.md's count (1.56 GFLOP per sample at L=186, C=64).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_format.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_forward.h"
#include "kernels/model_weights.h"
#include "tools/bench/bench_inputs.h"
#include "tools/bench/benchmarks.h"

namespace mmdit {
namespace {

constexpr double kBf16PeakTflops = 990.0;  // dense bf16, H100 SXM

// PERF.md's best measured PyTorch on an H100 at L=186, C=64 (ms); 0 = not measured.
double AnchorMs(bool bf16, int batch) {
  if (bf16) {
    switch (batch) {
      case 1: return 0.895;   // torch.compile + CUDA graph
      case 8: return 1.76;    // CUDA graph (no compile figure)
      case 64: return 3.84;   // CUDA graph (no compile figure)
      case 256: return 5.85;  // lean torch.compile + CUDA graph
    }
  } else {
    switch (batch) {
      case 1: return 1.28;   // lean torch.compile + CUDA graph fp32
      case 8: return 2.69;   // CUDA graph fp32
      case 64: return 8.94;  // CUDA graph fp32
      case 256: return 24.7;
    }
  }
  return 0.0;
}

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Prints the spread of a measurement's runs where MMDIT_BENCH_QUANTILES=1: a median alone hides
// whether the runs cluster.
void PrintQuantiles(std::vector<float> ms, const std::string& label) {
  const char* v = std::getenv("MMDIT_BENCH_QUANTILES");
  if (v == nullptr || std::atoi(v) == 0 || ms.empty()) return;
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  absl::PrintF("%s, %zu runs: min %.4f p10 %.4f p25 %.4f p50 %.4f p75 %.4f p90 %.4f max %.4f ms\n",
               label, n, ms[0], ms[n / 10], ms[n / 4], ms[n / 2], ms[3 * n / 4], ms[9 * n / 10],
               ms[n - 1]);
}

// Times two ways of enqueueing one forward on `stream` (launches and a graph replay), `iters`
// runs each after `warmup` each, alternating run by run; their median ms. Alternating matters at
// large batches: the forward draws the card's power limit there, and the SM clock falls within
// a second of sustained runs (docs/BENCHMARKS.md), so a way timed after the other would be
// timed on a hotter card.
template <typename A, typename B>
absl::StatusOr<std::pair<double, double>> TimeAlternating(cudaStream_t stream, int warmup,
                                                          int iters, A launch_a, B launch_b,
                                                          const std::string& label_a,
                                                          const std::string& label_b) {
  struct Events {
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Events() {
      if (start) cudaEventDestroy(start);
      if (stop) cudaEventDestroy(stop);
    }
  } ev;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&ev.start));
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&ev.stop));
  for (int i = 0; i < warmup; ++i) {
    if (absl::Status s = launch_a(); !s.ok()) return s;
    if (absl::Status s = launch_b(); !s.ok()) return s;
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<float> ms[2];
  auto time_one = [&](auto& launch, std::vector<float>& out) -> absl::Status {
    CUDA_RETURN_IF_ERROR(cudaEventRecord(ev.start, stream));
    if (absl::Status s = launch(); !s.ok()) return s;
    CUDA_RETURN_IF_ERROR(cudaEventRecord(ev.stop, stream));
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ev.stop));
    float t = 0;
    CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&t, ev.start, ev.stop));
    out.push_back(t);
    return absl::OkStatus();
  };
  for (int i = 0; i < iters; ++i) {
    if (absl::Status s = time_one(launch_a, ms[0]); !s.ok()) return s;
    if (absl::Status s = time_one(launch_b, ms[1]); !s.ok()) return s;
  }
  PrintQuantiles(ms[0], label_a);
  PrintQuantiles(ms[1], label_b);
  return std::make_pair(Median(ms[0]), Median(ms[1]));
}

// The serving path's time for one forward: Run() (the inputs copied in, the forward, the outputs
// copied back and awaited) on the host's clock, median of `iters` runs after `warmup` (at least
// two: with CudaForwardOptions::graph_cache_size, the default, the batch's graph is captured on
// its second run, so that the timed runs replay it).
absl::StatusOr<double> TimeRun(CudaForward& f, ForwardBatch batch, int warmup, int iters) {
  std::vector<float> ms;
  const int untimed = std::max(warmup, 2);
  for (int i = 0; i < untimed + iters; ++i) {
    const auto start = std::chrono::steady_clock::now();
    if (absl::Status s = f.Run(batch); !s.ok()) return s;
    const std::chrono::duration<double, std::milli> took =
        std::chrono::steady_clock::now() - start;
    if (i >= untimed) ms.push_back(static_cast<float>(took.count()));
  }
  return Median(ms);
}

// Median time per kernel kind over `iters` runs, from events recorded after every launch.
absl::StatusOr<std::map<std::string, double>> Breakdown(CudaForward& fwd, int iters) {
  cudaStream_t stream = fwd.stream();
  std::vector<cudaEvent_t> events;
  std::vector<std::string> names;
  size_t next = 0;
  fwd.set_launch_hook([&](const char* what) {
    if (next == events.size()) {
      cudaEvent_t e;
      cudaEventCreate(&e);
      events.push_back(e);
      names.emplace_back();
    }
    names[next] = what;
    cudaEventRecord(events[next++], stream);
  });
  cudaEvent_t start;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
  std::map<std::string, std::vector<float>> per_run;
  for (int i = 0; i < iters; ++i) {
    next = 0;
    CUDA_RETURN_IF_ERROR(cudaEventRecord(start, stream));
    if (absl::Status s = fwd.RunStaged(); !s.ok()) return s;
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    std::map<std::string, float> sum;
    cudaEvent_t prev = start;
    for (size_t k = 0; k < next; ++k) {
      float t = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&t, prev, events[k]));
      sum[names[k]] += t;
      prev = events[k];
    }
    for (auto& [k, v] : sum) per_run[k].push_back(v);
  }
  fwd.set_launch_hook(nullptr);
  for (cudaEvent_t e : events) cudaEventDestroy(e);
  cudaEventDestroy(start);
  std::map<std::string, double> out;
  for (auto& [k, v] : per_run) out[k] = Median(v);
  return out;
}

}  // namespace

absl::Status RunCudaBenchmark(const BenchOptions& options) {
  if (CudaForward::DeviceCount() == 0) return absl::FailedPreconditionError("no CUDA device");
  const MmditConfig config = TargetConfig();
  const ModelWeights weights = ModelWeights::Deterministic(config, 1);
  std::vector<int> batches = options.batch_sizes;
  if (batches.empty()) batches = {1, 8, 64, 256, 512};
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  std::vector<CudaPrecision> precisions;
  if (options.precision == "bf16" || options.precision == "all") {
    precisions.push_back(CudaPrecision::kBf16);
  }
  if (options.precision == "fp32" || options.precision == "all") {
    precisions.push_back(CudaPrecision::kFp32Accurate);
  }
  if (precisions.empty()) {
    return absl::InvalidArgumentError("--precision must be bf16, fp32 or all; was " +
                                      options.precision);
  }
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, options.gpu));
  const double flops = FlopsPerSample(config, options.seq_len, options.context_len);
  absl::PrintF("device %d: %s, %d SMs; L=%d C=%d, %d layers, %.3f GFLOP/sample; "
               "median of %d runs after %d warm-up\n",
               options.gpu, prop.name, prop.multiProcessorCount, options.seq_len,
               options.context_len, config.num_layers, flops * 1e-9, options.timed_iters,
               options.warmup_iters);
  std::string table = absl::StrFormat(
      "%-5s %5s %8s %10s %10s %10s %12s %8s %7s %10s %s\n", "prec", "B", "tiles", "stream_ms",
      "graph_ms", "run_ms", "samples/s", "TFLOP/s", "%peak", "anchor_ms",
      "x faster than anchor");
  std::string breakdown;
  for (CudaPrecision precision : precisions) {
    const bool bf16 = precision == CudaPrecision::kBf16;
    for (int rows : {0}) {
      CudaForwardOptions fo;
      fo.device = options.gpu;
      fo.max_batch_size = max_batch;
      fo.max_seq_len = options.seq_len;
      fo.max_context_len = options.context_len;
      fo.precision = precision;
      fo.row_tile_rows = rows;
      // Tile-size overrides for measurements (CudaForwardOptions::row_tile_rows and
      // attn_tile_queries; 0 or unset: chosen by batch size).
      if (const char* v = std::getenv("MMDIT_BENCH_ROW_TILE_ROWS")) fo.row_tile_rows = std::atoi(v);
      if (const char* v = std::getenv("MMDIT_BENCH_ROW_CLUSTER_SPLIT")) {
        fo.row_cluster_split = std::atoi(v);
      }
      if (const char* v = std::getenv("MMDIT_BENCH_ATTN_TILE_QUERIES")) {
        fo.attn_tile_queries = std::atoi(v);
      }
      // 0 selects the kernels kept for comparison (CudaForwardOptions).
      if (const char* v = std::getenv("MMDIT_BENCH_WGMMA")) fo.use_wgmma = std::atoi(v) != 0;
      if (const char* v = std::getenv("MMDIT_BENCH_PERSISTENT_ATTENTION")) {
        fo.persistent_attention = std::atoi(v) != 0;
      }
      // 0: the mma.sync adaLN at every batch size (CudaForwardOptions::wgmma_adaln).
      if (const char* v = std::getenv("MMDIT_BENCH_WGMMA_ADALN")) {
        fo.wgmma_adaln = std::atoi(v) != 0;
      }
      // For the batches they take: 1 the one-launch forward (CudaForwardOptions::fused_forward),
      // 2 one launch per layer (CudaForwardOptions::fused_layers), 0 neither: one launch per
      // kernel (the default).
      if (const char* v = std::getenv("MMDIT_BENCH_FUSED")) {
        fo.fused_forward = std::atoi(v) == 1;
        fo.fused_layers = std::atoi(v) == 2;
      }
      // 0: a running softmax maximum everywhere (CudaForwardOptions::static_softmax_offsets).
      if (const char* v = std::getenv("MMDIT_BENCH_STATIC_OFFSETS")) {
        fo.static_softmax_offsets = std::atoi(v) != 0;
      }
      // 0: q, k, v and the attention output token by token everywhere
      // (CudaForwardOptions::head_major_attention).
      if (const char* v = std::getenv("MMDIT_BENCH_HEAD_MAJOR")) {
        fo.head_major_attention = std::atoi(v) != 0;
      }
      // The residual stream between the wgmma row kernels: 0 fp32, 1 bf16 at every batch size
      // (CudaForwardOptions::bf16_residual; unset: by batch size).
      if (const char* v = std::getenv("MMDIT_BENCH_BF16_RESIDUAL")) {
        fo.bf16_residual = std::atoi(v);
      }
      // 0: each kernel waits for the whole previous one (CudaForwardOptions::per_sample_sync).
      if (const char* v = std::getenv("MMDIT_BENCH_SAMPLE_SYNC")) {
        fo.per_sample_sync = std::atoi(v) != 0;
      }
      // 0: Run() launches every kernel instead of replaying cached graphs (run_ms;
      // CudaForwardOptions::graph_cache_size).
      if (const char* v = std::getenv("MMDIT_BENCH_GRAPH_CACHE")) {
        fo.graph_cache_size = std::atoi(v);
      }
      // The host threads of Run()'s copies (run_ms; CudaForwardOptions::copy_threads).
      if (const char* v = std::getenv("MMDIT_BENCH_COPY_THREADS")) {
        fo.copy_threads = std::atoi(v);
      }
      absl::StatusOr<std::unique_ptr<CudaForward>> fwd = CudaForward::Create(weights, fo);
      if (!fwd.ok()) return fwd.status();
      CudaForward& f = **fwd;
      for (int b : batches) {
        BenchInputs in = MakeBenchInputs(config, b, options.seq_len,
                                         options.context_len, /*seed=*/4321);
        if (absl::Status s = f.Stage(in.samples); !s.ok()) return s;
        const std::string label = absl::StrFormat("%s B=%d", bf16 ? "bf16" : "fp32", b);
        if (absl::Status s = f.CaptureGraph(); !s.ok()) return s;
        absl::StatusOr<std::pair<double, double>> times = TimeAlternating(
            f.stream(), options.warmup_iters, options.timed_iters, [&] { return f.RunStaged(); },
            [&] { return f.ReplayGraph(); }, label + " stream", label + " graph");
        if (!times.ok()) return times.status();
        const double stream_ms = times->first, graph_ms = times->second;
        if (absl::Status s = f.FetchStaged(in.samples); !s.ok()) return s;
        for (float v : in.x_out) {
          if (!std::isfinite(v)) return absl::InternalError("non-finite output");
        }
        const double best = std::min(stream_ms, graph_ms);
        const double tflops = flops * b / (best * 1e-3) * 1e-12;
        const double anchor = AnchorMs(bf16, b);
        // Row tile rows (x CTAs per tile when split over a cluster) / attention tile queries, F
        // when the forward is one launch, L one launch per layer, S with per-sample sync.
        const std::string tiles =
            absl::StrCat(f.tile_rows(),
                         f.row_cluster_split() > 1 ? absl::StrCat("x", f.row_cluster_split())
                                                   : std::string(),
                         "/", f.tile_queries(), f.fused() ? "F" : "",
                         f.fused_layers() ? "L" : "",
                         f.per_sample_sync() ? "S" : "");
        absl::StatusOr<double> run_ms =
            TimeRun(f, in.samples, options.warmup_iters, options.timed_iters);
        if (!run_ms.ok()) return run_ms.status();
        table += absl::StrFormat(
            "%-5s %5d %8s %10.4f %10.4f %10.4f %12.0f %8.1f %6.1f%% %10s %s\n",
            bf16 ? "bf16" : "fp32", b, tiles, stream_ms, graph_ms, *run_ms, b / (best * 1e-3),
            tflops,
            100.0 * tflops / kBf16PeakTflops,
            anchor > 0 ? absl::StrFormat("%.3f", anchor) : std::string("-"),
            anchor > 0 ? absl::StrFormat("%.1fx", anchor / best) : std::string("-"));
        absl::StatusOr<std::map<std::string, double>> parts =
            Breakdown(f, std::max(3, options.timed_iters / 5));
        if (!parts.ok()) return parts.status();
        breakdown += absl::StrFormat("%-5s B=%-4d", bf16 ? "bf16" : "fp32", b);
        for (const auto& [name, ms] : *parts) {
          const int launches = name == "adaln" || name == "fused" ? 1
                               : name == "row" ? (f.fused_layers() ? 1 : config.num_layers + 1)
                                               : config.num_layers;
          breakdown += absl::StrFormat("  %s %.4f ms (%.1f us/launch)", name, ms,
                                       1e3 * ms / launches);
        }
        breakdown += "\n";
        std::fflush(stdout);
      }
    }
  }
  absl::PrintF("\nper-kernel breakdown (events between launches, summed over the forward):\n%s",
               breakdown);
  absl::PrintF("\n%s", table);
  return absl::OkStatus();
}

}  // namespace mmdit
