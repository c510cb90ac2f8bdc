// mmdit-bench: times the forward pass on a GPU (the fused CUDA forward) or on this machine's CPU
// cores, at the batch sizes asked for, and prints a table (samples/s, TFLOP/s, ratio to the
// PyTorch anchors of PERF.md).
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "tools/bench/bench_options.h"
#include "tools/bench/benchmarks.h"
#ifdef MMDIT_HAVE_CUDA
#include "kernels/cuda/cuda_forward.h"
#endif

ABSL_FLAG(std::string, device, "",
          "cuda or cpu; empty: cuda when this build has it and a GPU is visible, else cpu");
ABSL_FLAG(std::string, batch_sizes, "",
          "Comma-separated batch sizes to time; empty: 1,8,64,256,512 on a GPU, 1,8,32 on the CPU");
ABSL_FLAG(int, seq_len, 186, "L: x tokens per sample");
ABSL_FLAG(int, context_len, 64, "C: context tokens per sample");
ABSL_FLAG(std::string, precision, "all", "GPU precision: bf16, fp32 (the 1e-5 mode) or all");
ABSL_FLAG(int, warmup_iters, 10, "Untimed runs before timing");
ABSL_FLAG(int, timed_iters, 50, "Timed runs; the median is reported");
ABSL_FLAG(int, cpu_threads, 0, "CPU worker threads; 0: every core");
ABSL_FLAG(int, gpu, 0, "CUDA device ordinal");

int main(int argc, char** argv) {
  // --help lists this file's flags: Abseil would look for a file named after the binary, whose
  // dashes are this file's underscores. It records paths without their leading '/'.
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = [](absl::string_view path) {
    return absl::EndsWith(__FILE__, path);
  };
  usage.contains_help_flags = usage.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  mmdit::BenchOptions options;
  options.seq_len = absl::GetFlag(FLAGS_seq_len);
  options.context_len = absl::GetFlag(FLAGS_context_len);
  options.precision = absl::GetFlag(FLAGS_precision);
  options.warmup_iters = absl::GetFlag(FLAGS_warmup_iters);
  options.timed_iters = absl::GetFlag(FLAGS_timed_iters);
  options.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  options.gpu = absl::GetFlag(FLAGS_gpu);
  if (options.seq_len < 1 || options.context_len < 1 || options.timed_iters < 1 ||
      options.warmup_iters < 0) {
    std::fprintf(stderr, "--seq_len, --context_len, --timed_iters must be positive\n");
    return 2;
  }
  std::string device = absl::GetFlag(FLAGS_device);
  if (device.empty()) {
#ifdef MMDIT_HAVE_CUDA
    device = mmdit::CudaForward::DeviceCount() > 0 ? "cuda" : "cpu";
#else
    device = "cpu";
#endif
  }
  std::string batch_sizes = absl::GetFlag(FLAGS_batch_sizes);
  if (batch_sizes.empty()) batch_sizes = device == "cuda" ? "1,8,64,256,512" : "1,8,32";
  for (absl::string_view part : absl::StrSplit(batch_sizes, ',', absl::SkipEmpty())) {
    int b = 0;
    if (!absl::SimpleAtoi(part, &b) || b < 1) {
      std::fprintf(stderr, "--batch_sizes: '%s' is not a positive integer\n",
                   std::string(part).c_str());
      return 2;
    }
    options.batch_sizes.push_back(b);
  }
  absl::Status status;
  if (device == "cuda") {
#ifdef MMDIT_HAVE_CUDA
    status = mmdit::RunCudaBenchmark(options);
#else
    status = absl::UnimplementedError("this build has no CUDA forward; use --device=cpu");
#endif
  } else if (device == "cpu") {
    status = mmdit::RunCpuBenchmark(options);
  } else {
    status = absl::InvalidArgumentError("--device must be cuda or cpu; was " + device);
  }
  if (!status.ok()) {
    std::fprintf(stderr, "mmdit-bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
