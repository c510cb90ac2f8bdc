// mmdit-server: serves the models of a model repository (or the built-in model) over the Open
// Inference Protocol (gRPC) with /metrics and health endpoints over HTTP. SIGTERM or SIGINT
// drains: new requests get UNAVAILABLE, queued and running ones finish, then it exits 0.
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/server.h"

#ifdef MMDIT_HAVE_GPU_WORKER
#include "server/gpu_worker.h"
#endif

ABSL_FLAG(std::string, model_repository, "",
          "Model repository: DIR/<model>/config.pbtxt and DIR/<model>/<version>/model.safetensors. "
          "Empty: serve the built-in model (MODEL.md's target config, deterministic weights).");
ABSL_FLAG(std::string, host, "0.0.0.0",
          "Address both endpoints bind to: 0.0.0.0 for every interface, 127.0.0.1 for loopback.");
ABSL_FLAG(int, grpc_port, 8001, "gRPC (Open Inference Protocol) port; 0 picks a free one.");
ABSL_FLAG(int, http_port, 8002,
          "HTTP port of /metrics, /v2/health/live and /v2/health/ready; 0 picks a free one, "
          "-1 disables HTTP.");
ABSL_FLAG(int, exit_timeout_secs, 30,
          "On SIGTERM/SIGINT, how long queued and running requests may take to finish before "
          "they are cancelled.");
ABSL_FLAG(int, max_receive_message_bytes, 256 << 20,
          "Largest gRPC request accepted (bytes). The default holds a batch of 512 samples at "
          "L=186, C=64, D=128 in FP32 with a mask (about 83 MB).");
ABSL_FLAG(int, max_send_message_bytes, 256 << 20,
          "Largest gRPC response sent (bytes); 512 samples at L=186, C=64, D=128 FP32 are "
          "about 64 MB.");
ABSL_FLAG(int, cpu_threads, 0, "Threads of each CPU worker's forward; 0 = all cores.");
ABSL_FLAG(int, max_queue_size, 1024,
          "Requests waiting per model when its config sets no dynamic_batching.max_queue_size; "
          "beyond it requests get UNAVAILABLE at once.");
ABSL_FLAG(std::string, port_file, "",
          "If set, once ready write 'grpc_port=N' and 'http_port=M' lines to this file (for "
          "scripts and tests that start the server on port 0).");

namespace {

bool WritePortFile(const std::string& path, int grpc_port, int http_port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << "grpc_port=" << grpc_port << "\nhttp_port=" << http_port << "\n";
    if (!out) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Serves MMDiT models over the Open Inference Protocol.\n"
      "  mmdit-server [--model_repository=DIR] [--grpc_port=8001] [--http_port=8002]");
  // --help lists this file's flags: Abseil would look for a file named after the binary, whose
  // dashes are this file's underscores. It records paths without their leading '/'.
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = [](absl::string_view path) {
    return absl::EndsWith(__FILE__, path);
  };
  usage.contains_help_flags = usage.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);

  // Block the stop signals before any thread starts, so that every thread inherits the mask and
  // only sigwait() below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

#ifdef MMDIT_HAVE_GPU_WORKER
  mmdit::RegisterGpuWorkers();
#endif

  mmdit::Server::Options options;
  options.model_repository = absl::GetFlag(FLAGS_model_repository);
  options.address = absl::GetFlag(FLAGS_host);
  options.grpc_port = absl::GetFlag(FLAGS_grpc_port);
  options.http_port = absl::GetFlag(FLAGS_http_port);
  options.max_receive_message_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  options.max_send_message_bytes = absl::GetFlag(FLAGS_max_send_message_bytes);
  options.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  options.default_max_queue_size = absl::GetFlag(FLAGS_max_queue_size);
  const int exit_timeout_secs = absl::GetFlag(FLAGS_exit_timeout_secs);
  if (exit_timeout_secs < 0) {
    std::cerr << "mmdit-server: --exit_timeout_secs must not be negative; was "
              << exit_timeout_secs << "\n";
    return 2;
  }

  absl::StatusOr<std::unique_ptr<mmdit::Server>> server = mmdit::Server::Create(options);
  if (!server.ok()) {
    std::cerr << "mmdit-server: " << server.status().message() << "\n";
    return 1;
  }
  if (absl::Status s = (*server)->Start(); !s.ok()) {
    std::cerr << "mmdit-server: " << s.message() << "\n";
    (*server)->Shutdown(absl::ZeroDuration());
    return 1;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() &&
      !WritePortFile(port_file, (*server)->grpc_port(), (*server)->http_port())) {
    std::cerr << "mmdit-server: cannot write --port_file " << port_file << "\n";
    (*server)->Shutdown(absl::ZeroDuration());
    return 1;
  }
  std::cerr << "mmdit-server: ready" << std::endl;

  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::cerr << "mmdit-server: " << (signal == SIGTERM ? "SIGTERM" : "SIGINT")
            << ": draining (up to " << exit_timeout_secs << " s)" << std::endl;
  (*server)->Shutdown(absl::Seconds(exit_timeout_secs));
  std::cerr << "mmdit-server: stopped" << std::endl;
  return 0;
}
