// The load tester behind mmdit-loadgen: N concurrent clients, each with its own connection, send
// requests of a fixed shape to one server address until a request count or a duration runs out,
// and the latencies are summarised as throughput and percentiles.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/inference_client.h"

namespace mmdit {

class LoadGenerator {
 public:
  struct Options {
    std::string address = "127.0.0.1:8001";  // the only address this sends to
    std::string model = "mmdit";
    int concurrency = 4;                       // clients sending at once
    int64_t max_requests = 1000;               // stop after this many requests in all …
    absl::Duration max_duration = absl::Seconds(30);  // … or after this long, whichever first
    int batch_size = 1;                        // B of each request
    int seq_len = 186;                         // L
    int context_len = 64;                      // C
    int dim = 128;                             // D
    TensorEncoding encoding = TensorEncoding::kRaw;
    absl::Duration timeout = absl::Seconds(60);  // gRPC deadline of each request
    // Every client connects before the clock starts, within this long in all.
    absl::Duration connect_timeout = absl::Seconds(30);
    uint64_t seed = 1;                         // the random inputs
  };

  struct Report {
    int64_t succeeded = 0;
    int64_t failed = 0;
    std::map<std::string, int64_t> failures;  // by status code name
    std::string first_error;
    absl::Duration elapsed;
    double requests_per_second = 0;
    double samples_per_second = 0;
    // Of successful requests.
    absl::Duration latency_mean, latency_p50, latency_p90, latency_p99, latency_max;
  };

  static absl::StatusOr<std::unique_ptr<LoadGenerator>> Create(const Options& options);
  // Blocks until the bound is reached; fails only when a client could not be set up or connected
  // (Unavailable after connect_timeout). Connections are made before the measured run, so a
  // connection attempt that fails and is retried costs no requests and no latency.
  absl::StatusOr<Report> Run();

 private:
  explicit LoadGenerator(const Options& options) : options_(options) {}
  const Options options_;
};

// A few lines of text: counts, throughput, latency percentiles in milliseconds.
std::string FormatReport(const LoadGenerator::Options& options, const LoadGenerator::Report& r);

}  // namespace mmdit
